"""Crash safety with real processes: `kill -9` the server while uploads, re-uploads, evictions and completions
are in flight, restart it on the same repository, and check that nothing acknowledged was lost, nothing half
written is served, and serving resumes with the same answers."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time

import httpx
import pytest

from conftest import start_server
from mux.lora.repository import STAGING, AdapterRepository

GREEDY = {"max_tokens": 6, "temperature": 0}
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture
def repo(tmp_path, tiny_adapters):
    root = tmp_path / "repo"
    for i, src in enumerate(["r4-attn", "r8-mlp", "r16-all", "r4-all", "r8-qv"]):
        shutil.copytree(tiny_adapters[src], root / "t" / f"hand{i}")
    return root


def _complete(base: str, model: str) -> str:
    r = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "Hello", **GREEDY}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


class Background:
    """Threads running requests against the server until `stop` (or the exit of the `with` block); a request
    the killed server cannot answer is let go."""

    def __init__(self, base: str, *workers) -> None:
        self.base = base
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in workers]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _loop(self, body) -> None:
        i = 0
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    body(client, i)
                except httpx.HTTPError:  # the server was killed under us
                    time.sleep(0.05)
                i += 1


class Traffic(Background):
    """Background uploads (re-uploads of a few names), completions and admin evictions until `stop`."""

    def __init__(self, base: str, sources: list) -> None:
        super().__init__(base, self._upload, self._complete, self._evict)
        self.sources = sources
        self.acked: list[dict] = []  # meta of every upload the server answered 201 to

    def _upload(self) -> None:
        def one(client, i):
            src = self.sources[i % len(self.sources)]
            files = {f: (f, (src / f).read_bytes()) for f in FILES}
            r = client.post(f"{self.base}/v1/adapters", files={"name": (None, f"t/up{i % 3}"), **files})
            if r.status_code == 201:
                self.acked.append(r.json())

        self._loop(one)

    def _complete(self) -> None:
        def one(client, i):
            client.post(f"{self.base}/v1/completions", json={"model": f"t/hand{i % 5}", "prompt": "Hi", **GREEDY})

        self._loop(one)

    def _evict(self) -> None:
        def one(client, i):
            client.post(f"{self.base}/admin/adapters/t/hand{i % 5}/evict")
            time.sleep(0.01)

        self._loop(one)


def test_kill_9_under_uploads_evictions_and_load_loses_nothing(tiny_dir, tiny_adapters, repo):
    sources = [tiny_adapters["r4-attn"], tiny_adapters["r8-mlp"]]
    proc, base = start_server(tiny_dir, repo, "--max-loras", "2")
    expected = {f"t/hand{i}": _complete(base, f"t/hand{i}") for i in range(5)}
    acked: list[dict] = []
    for delay in (0.8, 1.5, 0.3):  # kill at different points of the traffic
        with Traffic(base, sources) as traffic:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        acked += traffic.acked
        proc, base = start_server(tiny_dir, repo, "--max-loras", "2")  # restart on the same repository
        _check_repository(repo, acked)
        for model, text in expected.items():  # serving resumes, with the same answers
            assert _complete(base, model) == text
        for i in range(3):
            if (repo / "t" / f"up{i}" / "current").exists():
                _complete(base, f"t/up{i}")
    proc.kill()
    proc.wait()
    assert acked, "no upload was acknowledged: the traffic did not run"


def _check_repository(root, acked: list[dict]) -> None:
    repository = AdapterRepository(root)
    assert not (root / STAGING).exists()  # interrupted uploads are gone
    for adapter_id in repository.ids():  # every adapter served is complete and matches its checksum
        assert repository.verify(adapter_id), adapter_id
    for meta in acked:  # every acknowledged upload is still there, unchanged
        version_dir = root / meta["id"] / f"v{meta['version']}"
        assert json.loads((version_dir / "meta.json").read_text())["sha256"] == meta["sha256"]
        assert repository.meta(meta["id"])["version"] >= meta["version"]
    for adapter_dir in (root / "t").iterdir():  # nothing unpublished or half-linked is left
        current = adapter_dir / "current"
        newest = int(current.readlink().name[1:]) if current.is_symlink() else 0
        for entry in adapter_dir.iterdir():
            assert not entry.name.startswith(".current-"), entry
            if entry.name.startswith("v"):
                assert int(entry.name[1:]) <= newest, entry


def test_recover_removes_what_a_crash_between_move_and_publish_leaves(tmp_path, tiny_adapters):
    root = tmp_path / "repo"
    repository = AdapterRepository(root)
    for _ in range(2):
        staged = repository.staging_dir()
        for f in FILES:
            shutil.copy(tiny_adapters["r4-attn"] / f, staged / f)
        repository.install("t", "a", staged, {})
    # a third upload moved in as v3 but the process died before `current` was switched to it
    shutil.copytree(root / "t" / "a" / "v2", root / "t" / "a" / "v3")
    (root / "t" / "a" / ".current-dead").symlink_to("v3")
    # a first upload of another name that never published, and an upload still being received
    shutil.copytree(root / "t" / "a" / "v2", root / "t" / "b" / "v1")
    (repository.staging_dir() / "adapter_model.safetensors").write_bytes(b"half")
    removed = repository.recover()
    assert len(removed) == 4
    assert sorted(p.name for p in (root / "t" / "a").iterdir()) == ["current", "v1", "v2"]
    assert not (root / "t" / "b").exists() and not (root / STAGING).exists()
    assert repository.ids() == ["t/a"] and repository.meta("t/a")["version"] == 2 and repository.verify("t/a")


class SplitChanges(Background):
    """Background split changes and promotes of t/a (versions 1-3), and completions, until `stop`. `attempts` holds
    the weights each change asked for, in order; `acked` the indexes of those the server answered 200 to."""

    def __init__(self, base: str) -> None:
        super().__init__(base, self._change, self._complete)
        self.attempts: list[dict] = []
        self.acked: list[int] = []

    def _change(self) -> None:
        def one(client, i):
            if i % 3 == 2:
                weights, action, body = {str(1 + i % 3): 100}, "promote", {"version": 1 + i % 3}
            else:
                weights = {"1": 100 - i % 50, "2": i % 50 // 2, "3": i % 50 - i % 50 // 2}
                action, body = "traffic", {"weights": weights}
            self.attempts.append(weights)
            send = client.post if action == "promote" else client.put
            r = send(f"{self.base}/v1/adapters/t/a/{action}", json=body)
            assert r.status_code == 200, r.text
            self.acked.append(len(self.attempts) - 1)

        self._loop(one)

    def _complete(self) -> None:
        def one(client, i):
            body = {"model": "t/a", "prompt": "Hi", "user": str(i), **GREEDY}
            client.post(f"{self.base}/v1/completions", json=body)

        self._loop(one)


def test_kill_9_during_split_changes_and_promotes_leaves_one_state(tiny_dir, tiny_adapters, tmp_path):
    root = tmp_path / "repo"
    proc, base = start_server(tiny_dir, root)
    for i, src in enumerate(["r4-attn", "r8-mlp", "r16-all"]):
        files = {f: (f, (tiny_adapters[src] / f).read_bytes()) for f in FILES}
        fields = {"name": (None, "t/a"), "activate": (None, "true" if i == 0 else "false")}
        assert httpx.post(f"{base}/v1/adapters", files={**fields, **files}, timeout=30).status_code == 201
    for delay in (0.7, 0.3):
        with SplitChanges(base) as changes:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert changes.acked, "no split change was acknowledged: the traffic did not run"
        proc, base = start_server(tiny_dir, root)
        state = httpx.get(f"{base}/v1/adapters/t/a", timeout=30).json()
        weights = state["traffic"]["weights"]
        # the last acknowledged change or one asked for after it: never a mix, never a missing version
        assert weights in changes.attempts[changes.acked[-1] :], (weights, changes.attempts[changes.acked[-1] :])
        assert sum(weights.values()) == 100 and {int(v) for v in weights} <= {1, 2, 3}
        assert (root / "t" / "a" / "current").readlink().name == f"v{state['traffic']['stable']}"
        served = set()
        for i in range(30):  # every request is served, by a version the split names
            r = httpx.post(f"{base}/v1/completions", json={"model": "t/a", "prompt": "Hi", "user": f"s{i}", **GREEDY})
            assert r.status_code == 200, r.text
            served.add(r.headers["x-mux-adapter-version"])
        assert served <= {v for v, w in weights.items() if w > 0}
    proc.kill()
    proc.wait()


def test_kill_9_mid_batch_resumes_without_losing_or_repeating_a_line(tiny_dir, tmp_path):
    root = tmp_path / "repo"
    proc, base = start_server(tiny_dir, root)
    body = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
    lines = [
        {"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions", "body": {"prompt": f"Item {i}", **body}}
        for i in range(120)
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    file_id = httpx.post(f"{base}/v1/files", files={"purpose": (None, "batch"), "file": ("in.jsonl", data)}).json()[
        "id"
    ]
    create = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    batch_id = httpx.post(f"{base}/v1/batches", json=create).json()["id"]
    deadline = time.time() + 60
    while httpx.get(f"{base}/v1/batches/{batch_id}").json()["request_counts"]["completed"] < 10:
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    output = root / ".batches" / "batches" / batch_id / "output.jsonl"
    before = {json.loads(x)["custom_id"]: json.loads(x)["id"] for x in output.read_bytes().splitlines()[:-1]}
    assert before, "nothing was written before the kill"
    proc, base = start_server(tiny_dir, root)
    while (batch := httpx.get(f"{base}/v1/batches/{batch_id}").json())["status"] != "completed":
        assert time.time() < deadline + 60, batch
        time.sleep(0.1)
    records = [
        json.loads(x) for x in httpx.get(f"{base}/v1/files/{batch['output_file_id']}/content").content.splitlines()
    ]
    ids = [r["custom_id"] for r in records]
    assert sorted(ids) == sorted(x["custom_id"] for x in lines)  # every line once: none lost, none twice
    by_id = {r["custom_id"]: r["id"] for r in records}
    assert all(by_id[c] == i for c, i in before.items())  # lines done before the kill were not run again
    assert batch["request_counts"] == {"total": 120, "completed": 120, "failed": 0}
    proc.kill()
    proc.wait()
