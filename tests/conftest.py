"""Shared fixtures: tiny random-weight models (hidden 64) and PEFT adapters built on the fly."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without CUDA, the Triton kernels (mux/triton_ops.py) are built for Triton's interpreter, so the tests can
    # run them on CPU tensors; the engine never calls them off CUDA. Set before mux/triton_ops.py is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import AutoModelForCausalLM

from bench.common import ALL, ATTN, MLP, build_tiny_model, make_adapter
from mux.model.loader import default_model_dir
from mux.server.auth import hash_key


@pytest.fixture(scope="session", autouse=True)
def fp32_weights():
    """Engines built in the tests keep fp32 weights unless a test asks for bf16 (`--dtype auto` may pick bf16 on a
    CPU where it measures faster, mux/model/linear_picks.py): the PEFT checks hold fp32 to 1e-3. Servers started by
    `start_server` get `--dtype float32` for the same reason."""
    from mux.runtime import picks

    with picks.force("weight_dtype", "float32"):
        yield


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", smollm2_dir)


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    """Adapters of different ranks, targets, alpha and rslora on the tiny Llama."""
    root = tmp_path_factory.mktemp("tiny-adapters")
    specs = {
        "r4-attn": dict(r=4, alpha=8, targets=ATTN, seed=1),
        "r8-mlp": dict(r=8, alpha=32, targets=MLP, seed=2),
        "r16-all": dict(r=16, alpha=7, targets=ALL, seed=3),
        "r8-all-rslora": dict(r=8, alpha=16, targets=ALL, use_rslora=True, seed=4),
        "r8-qv": dict(r=8, alpha=16, targets=["q_proj", "v_proj"], seed=5),
        "r4-all": dict(r=4, alpha=4, targets=ALL, seed=6),
        "r2-down": dict(r=2, alpha=5, targets=["down_proj"], seed=7),
        "r16-attn-rslora": dict(r=16, alpha=3, targets=ATTN, use_rslora=True, seed=8),
    }
    return {name: make_adapter(tiny_dir, root / name, **spec) for name, spec in specs.items()}


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def record_logits(engine) -> dict[str, list[torch.Tensor]]:
    """Wrap the engine's sampler so every sampled row's logits are kept, by request id."""
    seen: dict[str, list[torch.Tensor]] = {}
    sample = engine.sampler.sample

    def wrapped(logits, seqs):
        for row, seq in zip(logits, seqs, strict=True):
            seen.setdefault(seq.request_id, []).append(row.clone())
        return sample(logits, seqs)

    engine.sampler.sample = wrapped
    return seen


def peft_logits(base_dir: Path, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    """Reference logits [len(ids), V] of PeftModel(base, adapter) (or the plain base model) run alone."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def make_engine(model_dir: Path, model: dict | None = None, force: dict | None = None, **lora):
    """An engine on `model_dir`; `model`: ModelConfig fields, `lora`: LoRAConfig fields, `force`: internal choices
    forced while it is built (mux/runtime/picks.py's `choice` and `force`: {"attention": "sdpa"}, ...)."""
    from mux.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig
    from mux.engine.engine import Engine
    from mux.runtime import picks

    cache = CacheConfig(kv_cache_bytes=64 << 20)
    model_config = ModelConfig(model=str(model_dir), **(model or {}))
    with contextlib.ExitStack() as stack:
        for op, value in (force or {}).items():
            stack.enter_context(picks.force(op, value))
        return Engine(EngineConfig(model=model_config, lora=LoRAConfig(**lora), cache=cache))


def write_policy(path: Path, keys: dict[str, str], extra: dict[str, str] | None = None, tail: str = "") -> Path:
    """A policy file for a test server: keys["admin"] is the admin key, every other entry names a tenant and its
    key; extra[section] adds lines to that section; `tail` is appended as is (e.g. a [public] section)."""
    extra = extra or {}
    sections = [("admin" if who == "admin" else f"tenants.{who}", who, key) for who, key in keys.items()]
    text = "".join(
        f'[{section}]\nkeys = ["{hash_key(key)}"]\n' + (extra[who] + "\n" if who in extra else "")
        for section, who, key in sections
    )
    path.write_text(text + tail)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, adapter_dir: Path, *extra: str, port: int | None = None):
    """Start a real `mux serve` process on a loopback port; returns (process, base URL) once /ready answers."""
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "mux.cli",
        "serve",
        "--model",
        str(model_dir),
        "--served-model-name",
        "tiny",
        "--adapter-dir",
        str(adapter_dir),
        "--port",
        str(port),
        "--kv-cache-bytes",
        str(64 << 20),
        "--log-level",
        "warning",
        "--dtype",
        "float32",
        *extra,
    ]
    # The output goes to a file: a pipe nobody drains fills up after ~64 KiB of log lines, and then the server's
    # event loop blocks in its next log write (a fuzz run that logged tracebacks hung that way).
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed with the server: run_server, the callers)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.log = log
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=1) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"server did not become ready: {server_output(proc)}") from None
            time.sleep(0.2)


def server_output(proc: subprocess.Popen) -> str:
    """What a server from `start_server` has printed so far."""
    proc.log.seek(0)
    return proc.log.read()


@contextlib.contextmanager
def run_server(model_dir: Path, adapter_dir: Path, *extra: str):
    """A real `mux serve` process on a free loopback port; yields its base URL once /ready answers."""
    proc, base = start_server(model_dir, adapter_dir, *extra)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.log.close()
