"""Soak: a bounded mixed load on a loopback server, checking that nothing is lost and nothing leaks.

Workers run until a deadline: greedy completions and streams over more adapters than slots (each answer
checked against the one the server gave alone, before the load), streams dropped mid-way, re-uploads of the
same names (each followed by a request that must answer with the weights just uploaded), bad uploads and
bad requests (must be 4xx), over-limit bursts (429) and admin evictions. At the end the server must be idle:
no running sequence, every KV block free, no slot pinned by a request; resident memory is read at start
(after warm-up) and end.

    python -m bench.soak --duration 600             # SmolLM2, writes bench/results/reliability.md
    python -m bench.soak --duration 60 --tiny       # a tiny random model (what tests/reliability runs)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Report:
    sent: Counter = field(default_factory=Counter)  # kind -> requests sent
    status: Counter = field(default_factory=Counter)  # HTTP status -> count
    faults: Counter = field(default_factory=Counter)  # fault kind -> injected
    mismatches: list[str] = field(default_factory=list)  # greedy answers that differ from their reference
    unexpected: list[str] = field(default_factory=list)  # a 5xx, or a status the request should not get
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the run, server RSS MB)
    rss_start_mb: float = 0.0  # after warm-up: the first quarter of the run
    rss_end_mb: float = 0.0
    idle_at_end: dict = field(default_factory=dict)
    duration_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, kind: str, status: int, expected: tuple[int, ...] = (200,)) -> None:
        with self.lock:
            self.sent[kind] += 1
            self.status[status] += 1
            if status >= 500 or status not in expected:
                self.unexpected.append(f"{kind}: {status}")

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.unexpected and self.idle_at_end.get("idle", False)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Soak:
    def __init__(self, base: str, adapters: list[str], sources: list[Path], prompts: list[str], seed: int = 0) -> None:
        self.base, self.adapters, self.sources, self.prompts = base, adapters, sources, prompts
        self.report = Report()
        self.rnd = random.Random(seed)
        self.reference: dict[tuple[str, str], str] = {}  # (model, prompt) -> greedy text, computed alone

    # -- setup --------------------------------------------------------------------------------
    def references(self) -> None:
        with httpx.Client(timeout=120) as c:
            for model in self.adapters:
                for prompt in self.prompts:
                    self.reference[(model, prompt)] = self._text(c, model, prompt)
            for i, src in enumerate(self.sources):  # what an uploaded copy of each source must answer
                self._upload(c, f"soak/ref{i}", src)
                for prompt in self.prompts[:2]:
                    self.reference[(str(src), prompt)] = self._text(c, f"soak/ref{i}", prompt)

    def _text(self, c: httpx.Client, model: str, prompt: str) -> str:
        r = c.post(f"{self.base}/v1/completions", json={"model": model, "prompt": prompt, **GREEDY})
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    def _upload(self, c: httpx.Client, name: str, src: Path) -> httpx.Response:
        files = {f: (f, (src / f).read_bytes()) for f in FILES}
        return c.post(f"{self.base}/v1/adapters", files={"name": (None, name), **files})

    # -- workers ------------------------------------------------------------------------------
    def run(self, duration_s: float, pid: int, workers: int = 6) -> Report:
        """Load the server for `duration_s`, sampling its resident memory (process `pid`) as it goes."""
        start = time.monotonic()
        deadline = start + duration_s
        jobs = [self._completions, self._streams] * max(1, workers // 2 - 1)
        jobs += [self._cancels, self._uploads, self._faults, self._evictions]
        threads = [threading.Thread(target=self._loop, args=(job, deadline, i)) for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        while time.monotonic() < deadline:
            self.report.rss_mb.append((time.monotonic() - start, rss_mb(pid)))
            time.sleep(min(duration_s / 20, deadline - time.monotonic()) if deadline > time.monotonic() else 0)
        for t in threads:
            t.join()
        self.report.duration_s = time.monotonic() - start
        warm = [mb for t, mb in self.report.rss_mb if t >= duration_s / 4]
        self.report.rss_start_mb = warm[0] if warm else rss_mb(pid)
        return self.report

    def _loop(self, job, deadline: float, worker: int) -> None:
        rnd = random.Random(worker)
        with httpx.Client(timeout=120) as c:
            while time.monotonic() < deadline:
                job(c, rnd, worker)

    def _pick(self, rnd: random.Random) -> tuple[str, str]:
        return rnd.choice(self.adapters), rnd.choice(self.prompts)

    def _check(self, key, text: str, kind: str) -> None:
        if text != self.reference[key]:
            with self.report.lock:
                self.report.mismatches.append(f"{kind} {key}: {text!r} != {self.reference[key]!r}")

    def _completions(self, c, rnd, worker) -> None:
        model, prompt = self._pick(rnd)
        r = c.post(f"{self.base}/v1/completions", json={"model": model, "prompt": prompt, **GREEDY})
        self.report.count("completion", r.status_code)
        if r.status_code == 200:
            self._check((model, prompt), r.json()["choices"][0]["text"], "completion")

    def _streams(self, c, rnd, worker) -> None:
        model, prompt = self._pick(rnd)
        body = {"model": model, "prompt": prompt, "stream": True, **GREEDY}
        with c.stream("POST", f"{self.base}/v1/completions", json=body) as r:
            self.report.count("stream", r.status_code)
            if r.status_code != 200:
                return
            text = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += [ch.get("text", "") for ch in json.loads(line[6:])["choices"]]
        self._check((model, prompt), "".join(text), "stream")

    def _cancels(self, c, rnd, worker) -> None:
        model, prompt = self._pick(rnd)
        body = {"model": model, "prompt": prompt, "stream": True, **GREEDY, "max_tokens": 64}
        with httpx.Client(timeout=120) as fresh, fresh.stream("POST", f"{self.base}/v1/completions", json=body) as r:
            self.report.count("cancelled stream", r.status_code)
            for i, _ in enumerate(r.iter_lines()):
                if i >= rnd.randint(1, 6):
                    break  # closing the connection mid-stream is the cancel
        with self.report.lock:
            self.report.faults["client disconnects mid-stream"] += 1

    def _uploads(self, c, rnd, worker) -> None:
        i = rnd.randrange(len(self.sources))
        name = f"soak/up{rnd.randrange(3)}"  # re-uploads of the same few names
        r = self._upload(c, name, self.sources[i])
        self.report.count("upload", r.status_code, (201,))
        if r.status_code == 201:  # only this thread writes these names: the new version answers at once
            prompt = rnd.choice(self.prompts[:2])
            r = c.post(f"{self.base}/v1/completions", json={"model": name, "prompt": prompt, **GREEDY})
            self.report.count("completion after upload", r.status_code)
            if r.status_code == 200:
                self._check((str(self.sources[i]), prompt), r.json()["choices"][0]["text"], "after upload")

    def _faults(self, c, rnd, worker) -> None:
        kind = rnd.choice(["garbage upload", "truncated upload", "bad json", "over context", "unknown adapter"])
        if kind in ("garbage upload", "truncated upload"):
            src = self.sources[0]
            weights = (src / FILES[1]).read_bytes()
            blob = rnd.randbytes(512) if kind == "garbage upload" else weights[: len(weights) // 2]
            files = {FILES[0]: (FILES[0], (src / FILES[0]).read_bytes()), FILES[1]: (FILES[1], blob)}
            r = c.post(f"{self.base}/v1/adapters", files={"name": (None, "soak/bad"), **files})
        elif kind == "bad json":
            r = c.post(f"{self.base}/v1/completions", content=b"{nope", headers={"Content-Type": "application/json"})
        elif kind == "over context":
            r = c.post(f"{self.base}/v1/completions", json={"prompt": "hi", "max_tokens": 10**7})
        else:
            r = c.post(f"{self.base}/v1/completions", json={"model": "nobody/x", "prompt": "hi"})
        self.report.count(kind, r.status_code, (400, 404))
        with self.report.lock:
            self.report.faults[kind] += 1
        time.sleep(0.05)

    def _evictions(self, c, rnd, worker) -> None:
        model = rnd.choice(self.adapters)
        r = c.post(f"{self.base}/admin/adapters/{model}/evict")
        self.report.count("admin evict", r.status_code)
        with self.report.lock:
            self.report.faults["admin evictions"] += 1
        time.sleep(0.1)

    # -- end ----------------------------------------------------------------------------------
    def wait_idle(self, timeout: float = 30.0) -> dict:
        self.report.idle_at_end = wait_idle(self.base, timeout=timeout)
        return self.report.idle_at_end


def wait_idle(base: str, headers: dict | None = None, timeout: float = 30.0) -> dict:
    """Poll /admin/stats until no sequence runs or waits, every KV block is free and no slot is pinned by a
    request; returns that state (with `idle` False if `timeout` passed first)."""
    deadline = time.monotonic() + timeout
    while True:
        s = httpx.get(f"{base}/admin/stats", headers=headers, timeout=30).json()
        e, dev = s["engine"], s["tiers"]["device"]
        state = {
            "running": e["running"],
            "waiting": e["waiting"],
            "kv_blocks_free": e["kv_blocks"]["free"],
            "kv_blocks_total": e["kv_blocks"]["total"],
            "slots_pinned": dev["pinned"],
            "finished": e["finished"],
        }
        state["idle"] = (
            e["running"] == e["waiting"] == dev["pinned"] == 0 and state["kv_blocks_free"] == state["kv_blocks_total"]
        )
        if state["idle"] or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def setup_repository(root: Path, model_dir: Path, n_adapters: int, n_sources: int = 2) -> tuple[list[str], list]:
    """`n_adapters` random rank-4..16 adapters under soak/aN, plus upload sources kept outside the repository."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.common import ALL, ATTN, make_adapter

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    root.mkdir(parents=True, exist_ok=True)
    sources_dir = root.parent / "upload-sources"
    ids = []
    for i in range(n_adapters):
        targets = ALL if i % 2 else ATTN
        make_adapter(model_dir, root / "soak" / f"a{i}", r=(4, 8, 16)[i % 3], targets=targets, seed=i, base=base)
        ids.append(f"soak/a{i}")
    sources = [make_adapter(model_dir, sources_dir / f"s{i}", r=8, seed=100 + i, base=base) for i in range(n_sources)]
    return ids, sources


def _growth(samples: list[tuple[float, float]], since_s: float) -> float:
    later = [mb for t, mb in samples if t >= since_s]
    return later[-1] - later[0] if len(later) > 1 else 0.0


def write_markdown(report: Report, config: dict, machine: dict, path: Path) -> None:
    total = sum(report.sent.values())
    lines = [
        "# Reliability: soak run",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['device']}.",
        f"Config: {', '.join(f'{k}={v}' for k, v in config.items())}.",
        f"Duration: {report.duration_s:.0f} s. Requests sent: {total}. Result: "
        + ("**nothing lost, nothing leaked**." if report.ok else "**FAILED** (see below)."),
        "",
        "| requests | sent |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(report.sent.items())],
        "",
        "| faults injected | count |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(report.faults.items())],
        "",
        "| HTTP status | count |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(report.status.items())],
        "",
        f"- 5xx answers: {sum(v for k, v in report.status.items() if k >= 500)}",
        f"- unexpected statuses: {len(report.unexpected)} {report.unexpected[:5]}",
        f"- greedy answers different from their reference: {len(report.mismatches)} {report.mismatches[:3]}",
        f"- resident memory of the server after warm-up (a quarter into the run): {report.rss_start_mb:.0f} MB; "
        f"at the end: {report.rss_end_mb:.0f} MB ({report.rss_end_mb - report.rss_start_mb:+.0f} MB); samples "
        f"(s: MB): {', '.join(f'{t:.0f}: {mb:.0f}' for t, mb in report.rss_mb)}",
        f"- over the last half of the run: {_growth(report.rss_mb, report.duration_s / 2):+.0f} MB",
        f"- state at the end: {report.idle_at_end}",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--adapters", type=int, default=24)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "reliability.md"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from bench.common import build_tiny_model, machine, prompts
    from conftest import start_server  # the same real-process launcher the tests use
    from mux.model.loader import default_model_dir

    work = Path(tempfile.mkdtemp(prefix="mux-soak-"))
    try:
        model_dir = default_model_dir()
        if args.tiny:
            model_dir = build_tiny_model(work / "tiny", "llama", model_dir)
        ids, sources = setup_repository(work / "repo", model_dir, args.adapters)
        host_bytes = (200 << 10) if args.tiny else (64 << 20)  # a few adapters: the rest come back from disk
        extra = ("--max-loras", str(args.slots), "--max-cpu-adapter-bytes", str(host_bytes))
        proc, base = start_server(model_dir, work / "repo", *extra)
        try:
            soak = Soak(base, ids, sources, prompts(6, words=12))
            soak.references()
            print(f"soak: {len(ids)} adapters on {args.slots} slots for {args.duration:.0f} s ...", flush=True)
            report = soak.run(args.duration, proc.pid)
            soak.wait_idle()
            report.rss_end_mb = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        config = {
            "model": "tiny" if args.tiny else "SmolLM2-135M",
            "adapters": len(ids),
            "slots": args.slots,
            "host tier bytes": host_bytes,
        }
        write_markdown(report, config, machine(), Path(args.out))
        print(Path(args.out).read_text())
        sys.exit(0 if report.ok else 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
