"""mux on Ray Serve: one local Ray, two CPU replicas of the tiny model behind the ingress on 127.0.0.1, shared by
every test here (started once: Ray's start dominates). Affinity, the shared repository, keys and tenants at the
front door, aggregated stats, and a replica killed mid-traffic."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mux
from conftest import free_port, write_policy

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve")

KEYS = {"admin": "admin-k", "acme": "acme-k", "beta": "beta-k"}
PROMPT = "Hello world"
GREEDY = {"max_tokens": 4, "temperature": 0}
SLOTS = 2
HOST = 4  # host-tier adapters: a replica holds 4 without a disk read, so 8 fit in the two
MAX_SEQS = 4  # a replica's room: Ray's router sends it no more requests than its scheduler's sequences


def auth(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_adapters):
    root = tmp_path_factory.mktemp("ray-repo")
    for name, path in tiny_adapters.items():
        shutil.copytree(path, root / "acme" / name)
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_dir, repo):
    """The ingress's URL: two replicas, each with SLOTS device slots and HOST host-tier adapters."""
    from mux import cli
    from mux.ray import build

    tail = f"[tiers]\nmax_cpu_loras = {HOST}\n[scheduler]\nmax_num_seqs = {MAX_SEQS}\n"
    policy = write_policy(tmp_path_factory.mktemp("p") / "policy.toml", KEYS, tail=tail)
    port = free_port()
    flags = ["--model", str(tiny_dir), "--served-model-name", "tiny", "--adapter-dir", str(repo)]
    flags += ["--policy", str(policy), "--max-loras", str(SLOTS), "--kv-cache-bytes", str(16 << 20)]
    flags += ["--dtype", "float32", "--log-level", "warning", "--replicas", "2", "--replica-cpus", "1"]
    args = cli.parser().parse_args(["serve", *flags])
    source = str(Path(mux.__file__).resolve().parent.parent)  # this checkout, not whatever the venv points at
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": source}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(args), name="mux", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        until(lambda: len(stats(url)["replicas"]) == 2, "both replicas report")
        yield url
    finally:
        ray.shutdown()  # Serve's replicas go with it (a graceful serve.shutdown() first takes seconds more)


def until(check, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)
    return found


def stats(base: str) -> dict:
    r = httpx.get(f"{base}/admin/stats", headers=auth("admin"), timeout=30)
    assert r.status_code == 200 and r.headers["x-mux-replica"] == "ingress", r.text
    return r.json()


def complete(base: str, model: str, who: str = "acme", **extra) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, **GREEDY, **extra}
    return httpx.post(f"{base}/v1/completions", json=body, headers=auth(who), timeout=60)


def served(r: httpx.Response) -> tuple[str, str]:
    assert r.status_code == 200, r.text
    return r.headers["x-mux-replica"], r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def peft_text(tiny_dir):
    """Greedy text of PeftModel(base, adapter) for PROMPT."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids

    def text(adapter: Path) -> str:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter).eval()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=GREEDY["max_tokens"], do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    return text


def test_each_adapter_sticks_to_one_replica_and_loads_once_there(base, tiny_adapters, peft_text):
    names = sorted(tiny_adapters)
    served_by: dict[str, set[str]] = {}  # replica -> the adapters it served
    for name in names:  # warm-up: each adapter lands where the fewest are held
        served_by.setdefault(served(complete(base, f"acme/{name}"))[0], set()).add(name)
        time.sleep(0.3)  # the replica tells Ray's router what it holds (pushed every 0.1 s)
    seen: dict[str, set[str]] = {name: set() for name in names}
    texts: dict[str, set[str]] = {name: set() for name in names}
    for _ in range(3):
        for name in names:
            replica, text = served(complete(base, f"acme/{name}"))
            seen[name].add(replica)
            texts[name].add(text)
            served_by.setdefault(replica, set()).add(name)
    assert all(len(r) == 1 for r in seen.values()), seen
    assert len(served_by) == 2  # both replicas serve
    for name in names:
        assert texts[name] == {peft_text(tiny_adapters[name])}, name
    time.sleep(0.6)  # one report period
    per_replica = stats(base)["replicas"]
    for replica, figures in per_replica.items():
        loads = figures["counters"]["loads"]["disk_to_host"]
        assert loads <= len(served_by[replica]), (replica, loads, served_by[replica])  # once per adapter at most
        assert figures["tiers"]["device"]["capacity"] == SLOTS and figures["queue"]["waiting"] == 0
    assert served(complete(base, "tiny"))[0] in per_replica  # the base model: anywhere


def test_stats_add_up_the_replicas(base):
    s = stats(base)
    assert s["totals"]["replicas"] == len(s["replicas"]) == 2
    hits = sum(f["counters"]["hits"]["device"] for f in s["replicas"].values())
    assert s["totals"]["counters"]["hits"]["device"] == hits
    assert all(f["cold_start_s"]["ready"] > 0 and f["pid"] for f in s["replicas"].values())


def test_metrics_at_the_ingress_hold_every_replica_s_samples(base):
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{base}/metrics", headers=auth("admin"), timeout=30)
    assert r.status_code == 200 and r.headers["x-mux-replica"] == "ingress"
    families = {f.name: f for f in text_string_to_metric_families(r.text)}  # parses: one HELP/TYPE per family
    tokens = families["mux_generated_tokens"].samples
    assert len({s.labels["replica"] for s in tokens}) == 2 and all(s.value > 0 for s in tokens)
    assert httpx.get(f"{base}/metrics", timeout=30).status_code == 401  # admin only, as on one server


def upload(base: str, who: str, name: str, src: Path) -> httpx.Response:
    files = {f: (f, (src / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
    return httpx.post(f"{base}/v1/adapters", files={"name": (None, name), **files}, headers=auth(who), timeout=60)


def burst(base: str, model: str, n: int = 3 * MAX_SEQS) -> list[httpx.Response]:
    """More requests at once than one replica has room for: Ray's router spills them to the other one."""
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: complete(base, model, who="beta", max_tokens=48), range(n)))


def test_an_upload_is_served_by_both_replicas_and_never_its_old_version(base, tiny_adapters, peft_text):
    v1, v2 = tiny_adapters["r4-attn"], tiny_adapters["r16-all"]
    assert upload(base, "beta", "bot", v1).status_code == 201
    first = burst(base, "bot")
    assert {r.headers["x-mux-adapter-version"] for r in first} == {"1"}
    assert len({r.headers["x-mux-replica"] for r in first}) == 2
    r = upload(base, "beta", "bot", v2)
    assert r.status_code == 201 and r.json()["version"] == 2
    second = burst(base, "bot")  # at once: both replicas now hold version 1 and must not serve it
    assert {r.headers["x-mux-adapter-version"] for r in second} == {"2"}
    assert len({r.headers["x-mux-replica"] for r in second}) == 2
    expected = complete(base, "bot", who="beta")
    assert served(expected)[1] == peft_text(v2) != peft_text(v1)


def test_keys_and_tenants_hold_at_the_ingress(base):
    assert complete(base, "acme/r4-attn", who="beta").status_code == 404  # another tenant's: as if absent
    assert complete(base, "acme/nothing-here").status_code == 404
    r = httpx.post(f"{base}/v1/completions", json={"model": "acme/r4-attn", "prompt": PROMPT}, timeout=30)
    assert r.status_code == 401 and r.headers["x-mux-replica"]
    listed = httpx.get(f"{base}/v1/adapters", headers=auth("beta"), timeout=30).json()
    assert listed["data"] and all(a["id"].startswith("beta/") for a in listed["data"])
    assert httpx.get(f"{base}/admin/stats", headers=auth("acme"), timeout=30).status_code == 403
    r = httpx.delete(f"{base}/v1/adapters/acme/r4-attn", headers=auth("beta"), timeout=30)
    assert r.status_code == 404


def test_a_client_leaving_mid_stream_ends_its_generation_in_the_replica(base):
    body = {"model": "acme/r4-attn", "prompt": PROMPT, **GREEDY, "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=auth("acme"), timeout=60) as stream:
        assert next(stream.iter_lines()).startswith("data: ")
        replica = stream.headers["x-mux-replica"]
    # the engine stops it (its KV blocks and pin freed) instead of running on to max_tokens for nobody
    until(lambda: stats(base)["replicas"][replica]["engine"]["finished"].get("cancelled"), "it is cancelled", 10)


def test_a_killed_replica_fails_only_its_requests_and_comes_back(base):
    held = {}
    for name in ("r4-attn", "r8-mlp", "r16-all", "r8-qv"):
        held.setdefault(served(complete(base, f"acme/{name}"))[0], f"acme/{name}")
    assert len(held) == 2, held
    victim, survivor = sorted(held)
    pid = stats(base)["replicas"][victim]["pid"]
    long = {"max_tokens": 480, "ignore_eos": True}
    body = {"model": held[victim], "prompt": PROMPT, **GREEDY, **long, "stream": True}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        doomed = pool.submit(complete, base, held[victim], **long)
        time.sleep(0.2)  # it reaches the replica first; the stream's first token says both run
        with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=auth("acme"), timeout=60) as stream:
            lines = stream.iter_lines()
            assert stream.status_code == 200 and next(lines).startswith("data: ")
            os.kill(pid, signal.SIGKILL)
            others = [pool.submit(complete, base, held[survivor]) for _ in range(4)]
            rest = [line for line in lines if line]
        r = doomed.result()
        assert r.status_code == 503 and r.headers["retry-after"] and stream.headers["x-mux-replica"] == victim, r.text
        assert '"code": 503' in rest[-1]  # a stream that had begun ends with an error event
        assert all(served(f.result())[0] == survivor for f in others)
    until(lambda: set(stats(base)["replicas"]) - {victim, survivor}, "Ray starts a new replica", 90)
    assert complete(base, held[victim]).status_code == 200
