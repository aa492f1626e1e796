"""Shared by benchmarks and tests: random PEFT adapters, prompts, machine description, result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from mux.runtime.picks import has_flags

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL = ATTN + MLP
RESULTS = Path(__file__).parent / "results"

_WORDS = (
    "the model serves many adapters at once while each tenant sends requests about weather history music "
    "cooking travel science football poetry markets gardens rivers trains and distant stars"
).split()


def make_adapter(
    base_dir: Path,
    out: Path,
    r: int = 8,
    alpha: float = 16,
    targets=ALL,
    use_rslora: bool = False,
    seed: int = 0,
    std: float = 0.1,
    base=None,
    **extra,
) -> Path:
    """A PEFT LoRA adapter with random A and B (PEFT's B=0 init would make it a no-op), saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = base or AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora, lora_dropout=0.0, **extra
    )
    peft_model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    peft_model.save_pretrained(out)
    peft_model.unload()  # give the base model back untouched
    return out


def tiny_config(family: str = "llama", vocab_size: int = 49152):
    """A 2-layer, hidden-64 config of one family (GQA: 4 query heads over 2 KV heads); SmolLM2's vocabulary."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    return cls(**common)


def build_tiny_model(out: Path, family: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random-weight model directory (with `tokenizer_dir`'s tokenizer), for tests and device checks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; scale up so logits differ visibly between tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def group_rows(token_slots: list[int]) -> dict[int, list[int]]:
    """slot -> the token rows using it (slot -1: no adapter, left out), as the runner hands them to the kernel."""
    groups: dict[int, list[int]] = {}
    for row, slot in enumerate(token_slots):
        if slot >= 0:
            groups.setdefault(slot, []).append(row)
    return groups


def prompts(n: int, words: int = 24, seed: int = 0) -> list[str]:
    """n distinct prompts of about `words` words (≈30 tokens for SmolLM2)."""
    import random

    rnd = random.Random(seed)
    return [" ".join(rnd.choice(_WORDS) for _ in range(words)).capitalize() + "." for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 1] (NaN for no values): one definition for every benchmark."""
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return {
        "cpu": cpu,
        # what the kernel picks depend on (mux/model/linear_picks.py): AMX and AVX512-BF16 make bf16 weights pay
        "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if has_flags(f)],
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
    }


def best_time(fn, reps: int = 5) -> float:
    """Seconds of the fastest of `reps` calls of fn (after one warm-up call): this machine is noisy."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def new_stem(name: str) -> str:
    """`<date>-<name>-<host>` in bench/results, or with -2, -3, ... after it when a run of the day has that name:
    a rerun never overwrites results already written (and maybe committed)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = f"{time.strftime('%Y-%m-%d')}-{name}-{platform.node() or 'host'}"
    stem, n = base, 1
    while (RESULTS / f"{stem}.md").exists() or (RESULTS / f"{stem}.json").exists():
        n += 1
        stem = f"{base}-{n}"
    return stem


def save(name: str, data: dict, table: str) -> Path:
    stem = new_stem(name)
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    return RESULTS / f"{stem}.json"


def write_random_adapter(
    base_dir: Path,
    out: Path,
    r: int = 8,
    alpha: float = 16,
    targets=ALL,
    seed: int = 0,
    std: float = 0.1,
    dtype=torch.float32,
    use_rslora: bool = False,
) -> Path:
    """A PEFT-format LoRA adapter written directly (no model load): milliseconds, for hundreds of adapters."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "q_proj": (h, cfg.num_attention_heads * head_dim),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (cfg.num_attention_heads * head_dim, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    parent = {
        "q_proj": "self_attn",
        "k_proj": "self_attn",
        "v_proj": "self_attn",
        "o_proj": "self_attn",
        "gate_proj": "mlp",
        "up_proj": "mlp",
        "down_proj": "mlp",
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for t in targets:
            fan_in, fan_out = shapes[t]
            prefix = f"base_model.model.model.layers.{layer}.{parent[t]}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(r, fan_in, generator=gen) * std).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, r, generator=gen) * std).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "use_rslora": use_rslora,
        "bias": "none",
        "lora_dropout": 0.0,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def harness():
    """tests/conftest.py, whose `start_server` and `free_port` the serving benches use: a real `mux serve` on a
    loopback port, as the tests run it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import conftest

    return conftest


def adapter_repository(model_dir: Path, prefix: str, n: int = 16) -> tuple[Path, list[Path]]:
    """A fresh adapter directory of `n` rank-8 adapters `bench/a<i>` (seed i): (the directory, their paths)."""
    root = Path(tempfile.mkdtemp(prefix=prefix)) / "repo"
    paths = [write_random_adapter(model_dir, root / "bench" / f"a{i}", r=8, seed=i, std=0.02) for i in range(n)]
    return root, paths
