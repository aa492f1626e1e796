"""Batch jobs through the `openai` SDK against a real server: files, batches, outputs equal to the online route's
answers, bad lines, validation failures, tenants, cancel, expiry, limits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest

from conftest import run_server, write_policy

KEYS = {"admin": "admin-k", "acme": "acme-k", "beta": "beta-k"}
ADAPTERS = ("r4-attn", "r8-mlp", "r16-all", "r8-qv")
PROMPTS = [f"Line {i} says hello to" for i in range(10)]
GREEDY = {"max_tokens": 4, "temperature": 0}
BATCH_LIMITS = "[batch]\nmax_file_bytes = 200000\nmax_lines = 300\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return tmp_path_factory.mktemp("batch-repo")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir, tiny_adapters, repo):
    root = repo
    for name in ADAPTERS:
        shutil.copytree(tiny_adapters[name], root / "acme" / name)
    shutil.copytree(tiny_adapters["r4-all"], root / "beta" / "theirs")
    policy = write_policy(tmp_path_factory.mktemp("p") / "policy.toml", KEYS, tail=BATCH_LIMITS)
    with run_server(tiny_dir, root, "--policy", str(policy), "--max-loras", "4") as base:
        yield base


def sdk(server, who: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEYS[who], max_retries=0)


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def line(custom_id: str, body: dict, url: str = "/v1/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def run_batch(client: openai.OpenAI, data: bytes, endpoint="/v1/completions", window="24h", wait=True):
    upload = client.files.create(file=("input.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window=window)
    deadline = time.time() + 120
    while wait and batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.time() < deadline, batch
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    return batch


def read_lines(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    return {r["custom_id"]: r for r in map(json.loads, client.files.content(file_id).text.splitlines())}


def test_sdk_batch_over_four_adapters_and_the_base_equals_the_online_answers(server):
    client = sdk(server, "acme")
    models = [f"acme/{a}" for a in ADAPTERS] + ["tiny"]
    lines = [line(f"req-{i}", {"model": models[i % 5], "prompt": PROMPTS[i % 10], **GREEDY}) for i in range(200)]
    batch = run_batch(client, jsonl(lines))
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 200 and batch.request_counts.completed == 200
    assert batch.error_file_id is None and batch.in_progress_at and batch.completed_at
    out = read_lines(client, batch.output_file_id)
    assert sorted(out) == sorted(f"req-{i}" for i in range(200))
    online: dict[tuple, str] = {}
    for i, sent in enumerate(lines):
        key = (sent["body"]["model"], sent["body"]["prompt"])
        if key not in online:
            online[key] = client.completions.create(**sent["body"]).choices[0].text
        record = out[f"req-{i}"]
        assert record["response"]["status_code"] == 200 and record["error"] is None
        body = record["response"]["body"]
        assert body["object"] == "text_completion" and body["model"] == key[0]
        assert body["choices"][0]["text"] == online[key]
    info = client.files.retrieve(batch.output_file_id)
    assert info.purpose == "batch_output" and info.bytes > 0


def test_chat_lines_and_bad_lines_get_the_online_routes_status_codes(server):
    client = sdk(server, "acme")
    chat = "/v1/chat/completions"
    good = {"messages": [{"role": "user", "content": "Hi"}], **GREEDY}
    lines = [
        line("ok-base", good, chat),
        line("ok-adapter", {**good, "model": "acme/r8-mlp"}, chat),
        line("unknown", {**good, "model": "acme/missing"}, chat),
        line("foreign", {**good, "model": "beta/theirs"}, chat),
        line("too-long", {"messages": [{"role": "user", "content": "word " * 5000}], **GREEDY}, chat),
        line("bad-sampling", {**good, "temperature": -1}, chat),
        line("stream", {**good, "stream": True}, chat),
    ]
    batch = run_batch(client, jsonl(lines), endpoint=chat)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 5)
    out, errors = read_lines(client, batch.output_file_id), read_lines(client, batch.error_file_id)
    assert sorted(out) == ["ok-adapter", "ok-base"]
    assert out["ok-base"]["response"]["body"]["choices"][0]["message"]["content"] == (
        client.chat.completions.create(model="tiny", **good).choices[0].message.content
    )
    codes = {k: v["response"]["status_code"] for k, v in errors.items()}
    assert codes == {"unknown": 404, "foreign": 404, "too-long": 400, "bad-sampling": 400, "stream": 400}
    assert "does not exist" in errors["foreign"]["response"]["body"]["error"]["message"]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (
            b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n{not json\n',
            "invalid_json_line",
        ),
        (jsonl([line("a", {"prompt": "x"}), line("a", {"prompt": "y"})]), "duplicate_custom_id"),
        (jsonl([line("a", {"prompt": "x"}, "/v1/chat/completions")]), "mismatched_endpoint"),
        (jsonl([{**line("a", {"prompt": "x"}), "method": "GET"}]), "invalid_method"),
        (jsonl([line(f"l{i}", {"prompt": "x"}) for i in range(301)]), "too_many_requests"),
        (b"\n\n", "empty_file"),
    ],
)
def test_a_bad_file_fails_validation_as_a_whole_before_any_work(server, data, code):
    batch = run_batch(sdk(server, "acme"), data)
    assert batch.status == "failed" and batch.failed_at, batch
    assert code in [e.code for e in batch.errors.data]
    assert batch.request_counts.completed == 0 and batch.output_file_id is None


def test_bad_requests_are_refused_with_the_right_status(server, repo):
    client = sdk(server, "acme")
    upload = client.files.create(file=("input.jsonl", jsonl([line("a", {"prompt": "x"})])), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="48h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h", metadata={"k": 1}
        )
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    headers = {"Authorization": f"Bearer {KEYS['acme']}"}
    for query in ("limit=0", "limit=101", "limit=x"):
        assert httpx.get(f"{server}/v1/batches?{query}", headers=headers).status_code == 400
    r = httpx.post(f"{server}/v1/batches", json=[upload.id], headers=headers)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/files", files={"purpose": (None, "batch")}, headers=headers)
    assert r.status_code == 400 and "`file`" in r.json()["error"]["message"]
    assert not list((repo / ".batches" / ".staging").glob("upload-*"))  # refused uploads leave nothing
    r = httpx.post(
        f"{server}/v1/files",
        files={"purpose": (None, "batch"), "file": ("big.jsonl", b"x" * 250_000)},
        headers={"Authorization": f"Bearer {KEYS['acme']}"},
    )
    assert r.status_code == 413, r.text


def test_tenants_see_and_cancel_only_their_own(server):
    acme, beta, admin = sdk(server, "acme"), sdk(server, "beta"), sdk(server, "admin")
    run_batch(acme, jsonl([line("a", {"prompt": "x", **GREEDY})]))  # so that one page of one has more
    batch = run_batch(acme, jsonl([line("a", {"prompt": "x", **GREEDY})]))
    for call in (
        lambda: beta.batches.retrieve(batch.id),
        lambda: beta.batches.cancel(batch.id),
        lambda: beta.files.retrieve(batch.input_file_id),
        lambda: beta.files.content(batch.output_file_id),
        lambda: beta.files.delete(batch.input_file_id),
        lambda: beta.batches.create(
            input_file_id=batch.input_file_id, endpoint="/v1/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [b.id for b in beta.batches.list()]
    assert batch.input_file_id not in [f.id for f in beta.files.list()]
    assert admin.batches.retrieve(batch.id).id == batch.id and batch.id in [b.id for b in admin.batches.list(limit=100)]
    page = acme.batches.list(limit=1)
    assert [b.id for b in page.data] == [batch.id] and page.has_more  # newest first
    assert acme.files.delete(batch.input_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(batch.input_file_id)


def _engine_idle(server) -> bool:
    stats = httpx.get(f"{server}/admin/stats", headers={"Authorization": f"Bearer {KEYS['admin']}"}).json()
    return stats["engine"]["running"] == 0 and stats["engine"]["waiting"] == 0


def test_cancel_stops_the_batch_and_keeps_its_output_so_far(server):
    client = sdk(server, "acme")
    long = {"max_tokens": 200, "temperature": 0, "ignore_eos": True}
    lines = [line(f"c{i}", {"model": "acme/r4-attn", "prompt": PROMPTS[i % 10], **long}) for i in range(300)]
    batch = run_batch(client, jsonl(lines), wait=False)
    deadline = time.time() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < 1:
        assert time.time() < deadline
        time.sleep(0.1)
    stats = httpx.get(f"{server}/admin/stats", headers={"Authorization": f"Bearer {KEYS['admin']}"}).json()
    live = {b["id"]: b for b in stats["batches"]["live"]}
    assert live[batch.id]["tenant"] == "acme" and live[batch.id]["total"] == 300
    assert client.batches.cancel(batch.id).status == "cancelling"
    while (batch := client.batches.retrieve(batch.id)).status == "cancelling":
        assert time.time() < deadline
        time.sleep(0.1)
    assert batch.status == "cancelled" and batch.cancelled_at and batch.request_counts.completed < 300
    assert len(read_lines(client, batch.output_file_id)) == batch.request_counts.completed
    time.sleep(0.5)
    assert _engine_idle(server)


def test_a_batch_past_its_window_expires_with_its_partial_output(server):
    client = sdk(server, "acme")
    long = {"max_tokens": 200, "temperature": 0, "ignore_eos": True}
    # a few short lines that finish at once, then 56,000 tokens: far more than any machine here makes in 3 s
    short = {**long, "max_tokens": 2}
    lines = [line(f"e{i}", {"model": "acme/r8-qv", "prompt": PROMPTS[i % 10], **short}) for i in range(20)]
    lines += [line(f"e{i}", {"model": "acme/r8-qv", "prompt": PROMPTS[i % 10], **long}) for i in range(20, 300)]
    batch = run_batch(client, jsonl(lines), window="3s")
    assert batch.status == "expired" and batch.expired_at, batch
    assert 0 < batch.request_counts.completed < 300
    assert len(read_lines(client, batch.output_file_id)) == batch.request_counts.completed
    time.sleep(0.5)
    assert _engine_idle(server)
    stats = httpx.get(f"{server}/admin/stats", headers={"Authorization": f"Bearer {KEYS['admin']}"}).json()
    assert stats["batches"]["by_status"]["expired"] >= 1 and stats["batches"]["lines_completed"] > 0
    metrics = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"}).text
    assert 'mux_batches{status="expired"}' in metrics and 'mux_batch_lines_total{outcome="completed"}' in metrics


def _same(record: dict) -> tuple:
    """A line's outcome without the ids and times that differ between two runs."""
    body = {k: v for k, v in record["response"]["body"].items() if k not in ("id", "created")}
    return record["response"]["status_code"], body


def test_mux_batch_in_process_and_on_a_server_writes_what_the_servers_batch_writes(server, repo, tiny_dir, tmp_path):
    models = [f"acme/{a}" for a in ADAPTERS] + ["tiny", "acme/missing"]
    lines = [line(f"r{i}", {"model": models[i % 6], "prompt": PROMPTS[i % 10], **GREEDY}) for i in range(24)]
    lines.append(line("bad-sampling", {"prompt": "x", "max_tokens": 4, "temperature": -1}))
    batch = run_batch(sdk(server, "admin"), jsonl(lines))
    assert batch.status == "completed" and batch.request_counts.failed == 5
    online = read_lines(sdk(server, "admin"), batch.output_file_id)
    online.update(read_lines(sdk(server, "admin"), batch.error_file_id))
    (tmp_path / "in.jsonl").write_bytes(jsonl(lines))
    command = [sys.executable, "-m", "mux.cli", "batch", "-i", str(tmp_path / "in.jsonl"), "-o"]
    command += [str(tmp_path / "out.jsonl"), "--model", str(tiny_dir), "--served-model-name", "tiny"]
    command += ["--adapter-dir", str(repo), "--dtype", "float32", "--kv-cache-bytes", str(64 << 20)]
    done = subprocess.run([*command, "--log-level", "warning"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr  # some lines failed
    assert "25 lines, 20 completed, 5 failed" in done.stderr
    offline = [json.loads(raw) for raw in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in offline] == [sent["custom_id"] for sent in lines]  # the input's order
    assert all(_same(r) == _same(online[r["custom_id"]]) for r in offline)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # its work store is gone

    remote = [*command[:8], "--url", server, "--key", KEYS["acme"], "--progress"]  # -i in -o out, on the server
    remote[remote.index("-o") + 1] = str(tmp_path / "remote.jsonl")
    done = subprocess.run(remote, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "completed: 25 lines, 20 completed, 5 failed" in done.stderr, done.stderr
    assert "lines: 100%" in done.stderr  # the progress bar
    by_server = [json.loads(raw) for raw in (tmp_path / "remote.jsonl").read_text().splitlines()]
    assert [_same(r) for r in by_server] == [_same(r) for r in offline]
    (tmp_path / "remote.jsonl").unlink()

    (tmp_path / "bad.jsonl").write_bytes(jsonl([lines[0], lines[0]]))
    command[command.index("-o") + 1] = str(tmp_path / "never.jsonl")
    command[command.index("-i") + 1] = str(tmp_path / "bad.jsonl")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "the custom_id 'r0' is used twice" in done.stderr
    assert not (tmp_path / "never.jsonl").exists()
