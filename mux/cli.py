"""Command line: `mux serve`, `mux batch` (mux/batch_cli.py), `mux hash-key`; the HTTP client commands `mux adapters`,
`mux rollout`, `mux stats` (mux/client/)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from dataclasses import replace
from pathlib import Path

from mux import batch_cli, client

REPO_ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"
RAY_FLAGS = ("replicas", "ray_address", "min_replicas", "max_replicas", "target_ongoing_requests")  # any: on Ray


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


class Refused(Exception):
    """The command line or the policy file is wrong: printed as `mux: <message>`, exit status 2."""


def engine_setup(args: argparse.Namespace):
    """(policy, EngineConfig) from the engine flags `serve` and `batch` share (raises Refused)."""
    from mux.config import CacheConfig, EngineConfig, ModelConfig
    from mux.errors import MuxError
    from mux.policy import load_policy

    try:
        policy = load_policy(
            args.policy,
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            max_lora_bytes=args.max_lora_bytes,
            max_cpu_adapter_bytes=args.max_cpu_adapter_bytes,
            stream_interval=getattr(args, "stream_interval", None),
            grpc_port=getattr(args, "grpc_port", None),
            quantization=args.quantization,
        )
        model = ModelConfig(
            model=args.model,
            served_model_name=args.served_model_name,
            dtype=args.dtype,
            quantization=policy.quantization,
            device=args.device,
            enforce_eager=args.enforce_eager,
            backend=args.backend,
        )
    except (MuxError, ValueError) as e:
        raise Refused(str(e)) from None
    config = EngineConfig(
        model=model,
        lora=policy.lora,
        cache=CacheConfig(kv_cache_bytes=args.kv_cache_bytes, prefix_caching=args.enable_prefix_caching),
        scheduler=policy.scheduler,
    )
    return policy, config


def checked_auth(args: argparse.Namespace, policy):
    """The policy's keys; with none, a bind beyond loopback is refused unless --insecure."""
    from mux.server.auth import Auth

    auth = Auth(policy.admin_keys, policy.tenant_keys or {}, policy.public)
    if not auth.enabled and not _is_loopback(args.host) and not args.insecure:
        raise Refused(f"refusing to bind {args.host}: no API keys are configured; use --insecure to serve openly")
    return auth


def server_state(args: argparse.Namespace):
    """The ServerState of `mux serve`'s flags (raises Refused); on Ray, each replica builds its own from them."""
    from mux.engine.engine import Engine, freeze_heap
    from mux.server.app import ServerState
    from mux.server.limits import Limits

    policy, config = engine_setup(args)
    auth = checked_auth(args, policy)
    allowed = tuple(Path(p) for p in args.allowed_lora_dir)
    limits = Limits(policy.limits, policy.tenant_limits)

    def make_engine() -> Engine:
        engine = Engine(config)
        freeze_heap()  # this process keeps the engine for life
        return engine

    grpc = replace(policy.grpc, host=args.host)  # one address for both servers
    return ServerState(
        make_engine,
        Path(args.adapter_dir),
        policy.pinned,
        auth,
        allowed,
        limits,
        policy.stream_interval,
        Path(args.batch_dir) if args.batch_dir else None,
        policy.batch,
        grpc,
    )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from mux.server.app import create_app

    if any(getattr(args, flag) is not None for flag in RAY_FLAGS):
        try:
            from mux.ray.app import serve_on_ray
        except ImportError as e:
            raise Refused(f"Ray Serve is not installed ({e}): pip install 'lora-mux[ray]'") from None
        return serve_on_ray(args)
    state = server_state(args)
    grpc = state.grpc
    also = f" and gRPC on {args.host}:{grpc.port}" if grpc.port is not None else ""
    print(
        f"mux: serving {args.model or 'SmolLM2-135M-Instruct (embedded)'} with "
        f"{len(state.repository.ids())} adapters from {args.adapter_dir} on http://{args.host}:{args.port}{also} "
        f"(ready at /ready)",
        flush=True,
    )
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _engine_flags(s: argparse.ArgumentParser) -> None:
    """The model, adapters and engine: the flags `serve` and `batch` share."""
    s.add_argument("--model", default=None, help="local HF model directory or .gguf file (default: embedded SmolLM2)")
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--adapter-dir", default=str(REPO_ADAPTERS))
    s.add_argument("--policy", default=None, help="policy file (TOML; default policies/default.toml)")
    s.add_argument("--max-loras", type=int, default=None, help="distinct adapters in one step (overrides the policy)")
    s.add_argument("--max-lora-rank", type=int, default=None, help="the largest adapter rank accepted (default 64)")
    s.add_argument("--max-lora-bytes", type=int, default=None, help="device pool bytes (default: max-loras x rank 16)")
    s.add_argument("--max-cpu-adapter-bytes", type=int, default=None, help="host tier byte bound")
    s.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    s.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the K/V of prompts' shared first blocks within a tenant and adapter (vLLM's flag; default on)",
    )
    s.add_argument(
        "--dtype",
        default="auto",
        help="auto (CUDA: fp16; CPU: fp32, with the linears' weights in bf16 where they measure faster), float32, "
        "float16, bfloat16 (on a CPU: the linears' weights only)",
    )
    s.add_argument(
        "--quantization",
        choices=("none", "int8", "int4"),
        default=None,
        help="the decoder layers' linears as weight-only int8 or int4, adapters unchanged (CPU; overrides the "
        "policy's [model] quantization; default none)",
    )
    s.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:N")
    s.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "torch"),
        help="auto: mux's kernels, picked by measuring on the machine; torch: torch's and transformers' own on the CPU",
    )
    s.add_argument(
        "--enforce-eager",
        action="store_true",
        help="decode steps through the model's own forward: no CUDA graphs (CUDA), no decode loop of C calls (CPU)",
    )
    s.add_argument("--log-level", default="info")


def _ray_flags(s: argparse.ArgumentParser) -> None:
    """`mux serve` on Ray Serve (mux/ray/, the `ray` extra): any of these flags selects it."""
    r = s.add_argument_group("Ray Serve (pip install 'lora-mux[ray]')")
    r.add_argument("--replicas", type=int, default=None, help="engine replicas behind one ingress (Ray Serve)")
    r.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local Ray)")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound (0: scale to zero)")
    r.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound: turns autoscaling on")
    r.add_argument(
        "--target-ongoing-requests", type=float, default=None, help="autoscaling: requests in flight per replica"
    )
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves for each replica")
    r.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves for each replica (1: one each)")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mux", description="one base model, many LoRA adapters")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the HTTP server")
    _engine_flags(s)
    s.add_argument(
        "--batch-dir", default=None, help="batch jobs' files, state and output (default: <adapter-dir>/.batches)"
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve KServe v2 over gRPC (Triton's GRPCInferenceService) on this port, at --host "
        "(overrides the policy's [grpc] port; default: off)",
    )
    s.add_argument(
        "--stream-interval",
        type=int,
        default=None,
        help="OpenAI streams: send tokens this many at a time after the first (overrides the policy; default 1)",
    )
    s.add_argument(
        "--allowed-lora-dir",
        action="append",
        default=[],
        help="directory /v1/load_lora_adapter may read from (repeatable; the adapter dir always is)",
    )
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without API keys")
    _ray_flags(s)
    b = sub.add_parser("batch", help="run a batch file (OpenAI's Batch API format) in-process, with no server")
    _engine_flags(b)
    batch_cli.add_flags(b)
    h = sub.add_parser("hash-key", help="print the sha256:<hex> form of an API key for the policy file")
    h.add_argument("key")
    client.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in client.COMMANDS:
        return client.run(args)
    if args.command == "hash-key":
        from mux.server.auth import hash_key

        print(hash_key(args.key))
        return 0
    logging.basicConfig(level=args.log_level.upper())
    try:
        return serve(args) if args.command == "serve" else batch_cli.run(args, engine_setup)
    except Refused as e:
        print(f"mux: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
