"""The OpenAPI document of the HTTP routes, served at /openapi.json (hand-written: small, and exact)."""

from __future__ import annotations

_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_JSON = {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}
_SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 0, "description": "≥ 1; 0 only with completions echo"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number"},
    "top_k": {"type": "integer"},
    "n": {"type": "integer", "minimum": 1, "maximum": 16},
    "seed": {"type": "integer"},
    "stream": {"type": "boolean"},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "stop_token_ids": {"type": "array", "items": {"type": "integer"}},
    "ignore_eos": {"type": "boolean"},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 2},
    "logit_bias": {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
    "logprobs": {
        "oneOf": [{"type": "boolean"}, {"type": "integer", "minimum": 0, "maximum": 20}],
        "description": "chat: a boolean (with top_logprobs); completions: how many alternatives",
    },
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
    "prompt_logprobs": {"type": "integer", "minimum": 0, "maximum": 20, "description": "vLLM's; not with stream"},
    "echo": {"type": "boolean", "description": "completions: the prompt precedes the text (max_tokens 0: only it)"},
}


def _op(summary: str, body: dict | None = None, ok: dict = _JSON, params: tuple[str, ...] = ()) -> dict:
    op: dict = {"summary": summary, "responses": {"200": ok, "4XX": _ERROR}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
    return op


def _json_body(properties: dict, required: list[str]) -> dict:
    return {"application/json": {"schema": {"type": "object", "properties": properties, "required": required}}}


def _lorax_body() -> dict:
    parameters = {
        "adapter_id": {"type": "string", "nullable": True, "description": "<tenant>/<name>; null or empty: base"},
        "adapter_source": {"type": "string", "nullable": True, "enum": ["local", None]},
        "max_new_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        "do_sample": {"type": "boolean"},
        "temperature": {"type": "number", "nullable": True},
        "top_p": {"type": "number", "nullable": True},
        "top_k": {"type": "integer", "nullable": True},
        "seed": {"type": "integer", "nullable": True},
        "stop": {"type": "array", "items": {"type": "string"}},
        "ignore_eos_token": {"type": "boolean"},
        "repetition_penalty": {"type": "number", "nullable": True},
        "frequency_penalty": {"type": "number", "nullable": True},
        "presence_penalty": {"type": "number", "nullable": True},
        "return_full_text": {"type": "boolean"},
        "details": {"type": "boolean"},
        "decoder_input_details": {"type": "boolean", "description": "details.prefill: the prompt's logprobs"},
        "return_k_alternatives": {"type": "integer", "minimum": 1, "maximum": 20, "nullable": True},
    }
    properties = {
        "inputs": {"type": "string"},
        "parameters": {"type": "object", "properties": parameters},
        "stream": {"type": "boolean"},
    }
    return _json_body(properties, ["inputs"])


def openapi_document() -> dict:
    adapter = ("tenant", "name")
    model = ("model",)  # KServe v2: the base model or an adapter id, slash included
    tensors = {
        "application/json": {"schema": {"type": "object", "required": ["inputs"]}},
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
            "description": "JSON header (Inference-Header-Content-Length bytes), then binary tensor data",
        },
    }
    sse = {"description": "text/event-stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    upload = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "activate": {"type": "boolean", "default": True},
                    "adapter_config.json": {"type": "string", "format": "binary"},
                    "adapter_model.safetensors": {"type": "string", "format": "binary"},
                },
            }
        }
    }
    messages = {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
            "required": ["role"],
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "lora-mux",
            "version": "0.1.0",
            "description": "One base model, many tenants' LoRA adapters (OpenAI, KServe v2 and LoRAX protocols).",
        },
        "components": {
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "object"}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/health": {"get": _op("liveness")},
            "/openapi.json": {"get": _op("this document")},
            "/ready": {"get": _op("model loaded")},
            "/v1/models": {"get": _op("base model and the caller's adapters")},
            "/v1/completions": {
                "post": _op(
                    "text completion",
                    _json_body({**_SAMPLING, "prompt": {"oneOf": [{"type": "string"}, {"type": "array"}]}}, ["prompt"]),
                )
            },
            "/v1/chat/completions": {
                "post": _op("chat completion", _json_body({**_SAMPLING, "messages": messages}, ["messages"]))
            },
            "/v1/adapters": {"get": _op("list adapters"), "post": _op("upload an adapter (new version)", upload)},
            "/v1/adapters/{tenant}/{name}": {
                "get": _op("adapter metadata, its versions and traffic split", params=adapter),
                "delete": _op("delete an adapter, or `name@N` one version (409 while in use or split)", params=adapter),
            },
            "/v1/adapters/{tenant}/{name}/traffic": {
                "put": _op(
                    "split traffic between versions",
                    _json_body({"weights": {"type": "object"}, "guard": {"type": "object"}}, ["weights"]),
                    params=adapter,
                )
            },
            "/v1/adapters/{tenant}/{name}/promote": {
                "post": _op(
                    "send all traffic to a version",
                    _json_body({"version": {"type": "integer"}}, ["version"]),
                    params=adapter,
                )
            },
            "/v1/adapters/{tenant}/{name}/rollback": {
                "post": _op(
                    "send all traffic back to the version stable before the last split or promote", params=adapter
                )
            },
            "/v1/files": {
                "get": _op("the caller's files (OpenAI Files API)"),
                "post": _op(
                    "upload a JSONL file for a batch (multipart `file`, `purpose=batch`)",
                    {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["file", "purpose"],
                                "properties": {
                                    "file": {"type": "string", "format": "binary"},
                                    "purpose": {"type": "string"},
                                },
                            }
                        }
                    },
                ),
            },
            "/v1/files/{file_id}": {
                "get": _op("a File object", params=("file_id",)),
                "delete": _op("delete a file", params=("file_id",)),
            },
            "/v1/files/{file_id}/content": {"get": _op("a file's content", params=("file_id",))},
            "/v1/batches": {
                "get": _op("the caller's batches, newest first (`after`, `limit`)"),
                "post": _op(
                    "create a batch job (OpenAI Batch API)",
                    _json_body(
                        {
                            "input_file_id": {"type": "string"},
                            "endpoint": {"type": "string"},
                            "completion_window": {"type": "string"},
                            "metadata": {"type": "object"},
                        },
                        ["input_file_id", "endpoint", "completion_window"],
                    ),
                ),
            },
            "/v1/batches/{batch_id}": {"get": _op("a Batch object", params=("batch_id",))},
            "/v1/batches/{batch_id}/cancel": {"post": _op("cancel a batch", params=("batch_id",))},
            "/v1/load_lora_adapter": {
                "post": _op(
                    "vLLM: install an adapter from an allowed server path",
                    _json_body(
                        {"lora_name": {"type": "string"}, "lora_path": {"type": "string"}}, ["lora_name", "lora_path"]
                    ),
                )
            },
            "/v1/unload_lora_adapter": {
                "post": _op(
                    "vLLM: remove an adapter that /v1/load_lora_adapter installed (others: 400, nothing deleted)",
                    _json_body({"lora_name": {"type": "string"}}, ["lora_name"]),
                )
            },
            "/admin/stats": {"get": _op("tiers, counters, latency, engine, adapters (admin)")},
            "/admin/history": {"get": _op("a point every 2 s for 15 min: throughput, TTFT, queue, tiers (admin)")},
            "/admin/adapters/{tenant}/{name}/{action}": {
                "post": _op("evict | pin | unpin (admin)", params=(*adapter, "action"))
            },
            "/admin/prefix_cache/reset": {"post": _op("drop the prefix cache's K/V blocks (admin)")},
            "/reset_prefix_cache": {"post": _op("vLLM: drop the prefix cache's K/V blocks (admin)")},
            "/metrics": {"get": _op("Prometheus metrics (admin)", ok={"description": "text exposition"})},
            "/dashboard": {"get": _op("the admin's page (no key; its data needs one)", ok={"description": "HTML"})},
            "/v2": {"get": _op("KServe v2: server metadata")},
            "/v2/health/live": {"get": _op("KServe v2: live (200, empty body)")},
            "/v2/health/ready": {"get": _op("KServe v2: ready (200) or loading (400)")},
            "/v2/models/{model}": {"get": _op("KServe v2: model metadata", params=model)},
            "/v2/models/{model}/ready": {"get": _op("KServe v2: model ready", params=model)},
            "/v2/models/{model}/config": {"get": _op("KServe v2: Triton model configuration", params=model)},
            "/v2/models/{model}/infer": {
                "post": _op("KServe v2: infer (text_input -> text_output, BYTES)", tensors, params=model)
            },
            "/v2/models/{model}/generate": {
                "post": _op(
                    "KServe v2 generate extension",
                    _json_body({"text_input": {"type": "string"}, "parameters": {"type": "object"}}, ["text_input"]),
                    params=model,
                )
            },
            "/v2/models/{model}/generate_stream": {
                "post": _op(
                    "KServe v2 generate extension, SSE",
                    _json_body({"text_input": {"type": "string"}, "parameters": {"type": "object"}}, ["text_input"]),
                    ok=sse,
                    params=model,
                )
            },
            "/": {"post": _op("LoRAX (lorax-client): a one-element list, or SSE with `stream`", _lorax_body())},
            "/generate": {"post": _op("LoRAX: generate", _lorax_body())},
            "/generate_stream": {"post": _op("LoRAX: generate, SSE", _lorax_body(), ok=sse)},
            "/info": {"get": _op("LoRAX: router info (model, dtype, device, length limits)")},
            "/v2/repository/models/{model}/load": {
                "post": _op("KServe v2 / Triton: read an adapter into host RAM now", params=model)
            },
            "/v2/repository/models/{model}/unload": {
                "post": _op("KServe v2 / Triton (admin): drop an adapter from device and host memory", params=model)
            },
            "/v2/repository/index": {
                "post": _op(
                    "KServe v2 / Triton: the models the caller may use, each READY",
                    _json_body({"ready": {"type": "boolean"}}, []),
                )
            },
        },
    }
