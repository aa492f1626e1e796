"""Adapter uploads through real multipart requests: good ones serve at once, bad ones leave nothing behind."""

from __future__ import annotations

import json
import pickle
import shutil
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_engine, run_server, write_policy
from mux.engine.sequence import SamplingParams

KEYS = {"admin": "admin-k", "acme": "acme-k", "beta": "beta-k"}
GREEDY = {"max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_adapters):
    root = tmp_path_factory.mktemp("upload-repo")
    shutil.copytree(tiny_adapters["r8-mlp"], root / "beta" / "mlp")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir, repo):
    policy = tmp_path_factory.mktemp("p") / "policy.toml"
    write_policy(policy, KEYS)
    with run_server(tiny_dir, repo, "--policy", str(policy), "--max-loras", "2") as base:
        yield base


def upload(server, who, name, files):
    fields = {"name": (None, name)} if name is not None else {}
    return httpx.post(
        f"{server}/v1/adapters", files={**fields, **files}, headers={"Authorization": f"Bearer {KEYS[who]}"}, timeout=60
    )


def adapter_files(path):
    return {f: (f, (path / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}


def complete(server, who, model, prompt="Hello world"):
    r = httpx.post(
        f"{server}/v1/completions",
        json={"model": model, "prompt": prompt, **GREEDY},
        headers={"Authorization": f"Bearer {KEYS[who]}"},
        timeout=60,
    )
    return r


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".staging" not in p.parts)


def test_good_upload_is_usable_at_once_and_matches_the_engine(server, tiny_dir, tiny_adapters):
    src = tiny_adapters["r4-attn"]
    r = upload(server, "acme", "bot", adapter_files(src))
    assert r.status_code == 201, r.text
    meta = r.json()
    assert meta["id"] == "acme/bot" and meta["version"] == 1 and meta["rank"] == 4 and len(meta["sha256"]) == 64
    assert set(meta["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    text = complete(server, "acme", "bot").json()["choices"][0]["text"]
    engine = make_engine(tiny_dir, max_loras=1, max_lora_rank=16)
    expected = engine.generate(["Hello world"], SamplingParams(**GREEDY), [src])[0].text
    assert text == expected


def test_reupload_makes_a_new_version_used_at_once(server, tiny_dir, tiny_adapters):
    assert upload(server, "acme", "swap", adapter_files(tiny_adapters["r4-attn"])).status_code == 201
    first = complete(server, "acme", "swap").json()["choices"][0]["text"]
    r = upload(server, "acme", "swap", adapter_files(tiny_adapters["r16-all"]))
    assert r.status_code == 201 and r.json()["version"] == 2
    second = complete(server, "acme", "swap").json()["choices"][0]["text"]
    engine = make_engine(tiny_dir, max_loras=1, max_lora_rank=16)
    expected = engine.generate(["Hello world"], SamplingParams(**GREEDY), [tiny_adapters["r16-all"]])[0].text
    assert second == expected != first


def _edited_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    return ("adapter_config.json", json.dumps(cfg).encode())


def _wrong_shape(path, tmp):
    t = load_file(path / "adapter_model.safetensors")
    k = next(k for k in sorted(t) if "lora_A" in k)
    t[k] = torch.zeros(t[k].shape[0], 65)
    save_file(t, tmp / "w.safetensors")
    return ("adapter_model.safetensors", (tmp / "w.safetensors").read_bytes())


def _edited_weights(path, tmp, a=lambda t: t, b=lambda t: t):
    t = load_file(path / "adapter_model.safetensors")
    t = {k: (a(v) if "lora_A" in k else b(v)).contiguous() for k, v in t.items()}
    save_file(t, tmp / "w.safetensors")
    return ("adapter_model.safetensors", (tmp / "w.safetensors").read_bytes())


@pytest.mark.parametrize(
    ("case", "status", "reason"),
    [
        ("pickle", 400, "pickle"),
        ("wrong_shape", 400, "do not match"),
        ("missing_file", 400, "missing file"),
        ("bad_json", 400, "not valid JSON"),
        ("dora", 400, "DoRA"),
        ("traversal_name", 400, "adapter names"),
        ("slash_traversal", 400, "adapter names"),
        ("oversize_config", 413, "too large"),
        ("no_name", 400, "name"),
        ("garbage_weights", 400, "safetensors"),
        ("base_model_name", 400, "collides with the base model"),
        ("non_utf8_name", 400, "adapter names"),
        ("huge_rank", 400, "exceeds max_lora_rank"),
        ("nan_weights", 400, "NaN"),
        ("other_base_model", 400, "do not match"),
    ],
)
def test_bad_uploads_are_refused_and_leave_nothing(server, repo, tiny_adapters, tmp_path, case, status, reason):
    src = tiny_adapters["r4-attn"]
    files, name = adapter_files(src), "bad"
    if case == "pickle":
        files = {
            "adapter_config.json": files["adapter_config.json"],
            "adapter_model.bin": ("adapter_model.bin", pickle.dumps({"a": 1})),
        }
    elif case == "wrong_shape":
        files["adapter_model.safetensors"] = _wrong_shape(src, tmp_path)
    elif case == "missing_file":
        del files["adapter_model.safetensors"]
    elif case == "bad_json":
        files["adapter_config.json"] = ("adapter_config.json", b"{nope")
    elif case == "dora":
        files["adapter_config.json"] = _edited_config(src, use_dora=True)
    elif case == "traversal_name":
        name = "../../etc"
    elif case == "slash_traversal":
        name = "acme/../../x"
    elif case == "oversize_config":
        files["adapter_config.json"] = ("adapter_config.json", b" " * (2 << 20))
    elif case == "no_name":
        name = None
    elif case == "garbage_weights":
        files["adapter_model.safetensors"] = ("adapter_model.safetensors", b"\x00" * 100)
    elif case == "base_model_name":
        name = "tiny"
    elif case == "non_utf8_name":
        name = b"caf\xe9"  # Latin-1 bytes, not UTF-8
    elif case == "huge_rank":
        rank_x64 = (lambda a: torch.cat([a] * 64), lambda b: torch.cat([b] * 64, dim=1))  # A [r, in], B [out, r]
        files["adapter_model.safetensors"] = _edited_weights(src, tmp_path, *rank_x64)
    elif case == "nan_weights":
        files["adapter_model.safetensors"] = _edited_weights(src, tmp_path, lambda a: a * float("nan"))
    elif case == "other_base_model":  # an adapter made for a wider model: its shapes name another base
        files["adapter_model.safetensors"] = _edited_weights(src, tmp_path, lambda a: torch.cat([a, a], dim=1))
    before = snapshot(repo)
    r = upload(server, "acme", name, files)
    assert r.status_code == status and reason in r.json()["error"]["message"], r.text
    assert snapshot(repo) == before
    assert not any((repo / ".staging").glob("*")) if (repo / ".staging").exists() else True
    assert complete(server, "acme", "tiny").status_code == 200  # still serving


def test_tenants_cannot_overwrite_or_delete_each_other(server, tiny_adapters):
    assert upload(server, "acme", "beta/mlp", adapter_files(tiny_adapters["r4-attn"])).status_code == 404
    headers = {"Authorization": f"Bearer {KEYS['acme']}"}
    assert httpx.delete(f"{server}/v1/adapters/beta/mlp", headers=headers).status_code == 404
    assert httpx.get(f"{server}/v1/adapters/beta/mlp", headers=headers).status_code == 404
    listed = {a["id"] for a in httpx.get(f"{server}/v1/adapters", headers=headers).json()["data"]}
    assert "beta/mlp" not in listed
    beta = {"Authorization": f"Bearer {KEYS['beta']}"}
    assert httpx.get(f"{server}/v1/adapters/beta/mlp", headers=beta).json()["id"] == "beta/mlp"


def test_delete_refused_while_pinned_then_allowed(server, repo, tiny_adapters):
    assert upload(server, "acme", "gone", adapter_files(tiny_adapters["r2-down"])).status_code == 201
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    assert httpx.post(f"{server}/admin/adapters/acme/gone/pin", headers=admin).status_code == 200
    acme = {"Authorization": f"Bearer {KEYS['acme']}"}
    assert httpx.delete(f"{server}/v1/adapters/acme/gone", headers=acme).status_code == 409
    assert httpx.post(f"{server}/admin/adapters/acme/gone/unpin", headers=admin).status_code == 200
    assert httpx.delete(f"{server}/v1/adapters/acme/gone", headers=acme).status_code == 200
    assert not (repo / "acme" / "gone").exists()
    assert complete(server, "acme", "gone").status_code == 404


def _tar(members, path):
    """members: (name, bytes) for files, or (name, ("symlink", target))."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _zip(members, path):
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _two(src, prefix=""):
    return [(prefix + f, (src / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")]


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_upload(server, tiny_adapters, tmp_path, kind):
    src = tiny_adapters["r8-qv"]
    make = _tar if kind == "tar" else _zip
    archive = make([*_two(src, "my-lora/"), ("my-lora/README.md", b"hi")], tmp_path / f"a.{kind}")
    r = upload(server, "acme", f"arch-{kind}", {"archive": (archive.name, archive.read_bytes())})
    assert r.status_code == 201, r.text
    assert complete(server, "acme", f"arch-{kind}").status_code == 200


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ("dotdot", "unsafe path"),
        ("absolute", "unsafe path"),
        ("symlink", "not a regular file"),
        ("bomb", "too large"),
        ("pickle", "pickle"),
        ("missing", "lacks"),
        ("deep", "nested too deep"),
    ],
)
def test_hostile_archives_are_refused_and_leave_nothing(server, repo, tiny_adapters, tmp_path, members, reason):
    src = tiny_adapters["r8-qv"]
    two = _two(src)
    cases = {
        "dotdot": [*two, ("../../evil.txt", b"x")],
        "absolute": [*two, ("/tmp/evil.txt", b"x")],
        "symlink": [two[0], ("adapter_model.safetensors", ("symlink", "/etc/passwd"))],
        "bomb": [(two[0][0], b" " * (8 << 20)), two[1]],  # 8 MB of spaces: ~8 KB compressed
        "pickle": [two[0], ("adapter_model.bin", b"\x80\x04K\x01.")],
        "missing": [two[0]],
        "deep": [(f"a/b/{n}", d) for n, d in two],
    }
    archive = _tar(cases[members], tmp_path / "bad.tar.gz")
    before = snapshot(repo)
    r = upload(server, "acme", "hostile", {"archive": (archive.name, archive.read_bytes())})
    assert r.status_code == 400 and reason in r.json()["error"]["message"], r.text
    assert snapshot(repo) == before and not (tmp_path.parent / "evil.txt").exists()
    assert not any((repo / ".staging").glob("*")) if (repo / ".staging").exists() else True


def test_garbage_archive(server, tmp_path):
    r = upload(server, "acme", "junk", {"archive": ("x.tar.gz", b"this is not an archive")})
    assert r.status_code == 400 and "archive" in r.json()["error"]["message"]


def test_zip_symlink_member_is_refused(server, tiny_adapters, tmp_path):
    import stat
    import zipfile

    src = tiny_adapters["r8-qv"]
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("adapter_config.json", (src / "adapter_config.json").read_bytes())
        link = zipfile.ZipInfo("adapter_model.safetensors")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    r = upload(server, "acme", "ziplink", {"archive": (path.name, path.read_bytes())})
    assert r.status_code == 400 and "not a regular file" in r.json()["error"]["message"]


def test_inflight_request_finishes_on_the_old_version(server, tiny_dir, tiny_adapters):
    """Invariant 6 across a re-upload: a stream started on v1 ends on v1; requests after v2 lands get v2."""
    v1, v2 = tiny_adapters["r4-all"], tiny_adapters["r16-attn-rslora"]
    assert upload(server, "acme", "live", adapter_files(v1)).status_code == 201
    headers = {"Authorization": f"Bearer {KEYS['acme']}"}
    body = {
        "model": "live",
        "prompt": "Hello world",
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    text = ""
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:  # wait until generation is under way, then publish v2
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
                break
        assert upload(server, "acme", "live", adapter_files(v2)).json()["version"] == 2
        admin = {"Authorization": f"Bearer {KEYS['admin']}"}
        rows = httpx.get(f"{server}/admin/stats", headers=admin).json()["adapters"]
        assert any(a["id"] == "acme/live" and a["version"] == 1 and a["in_flight"] == 1 for a in rows)  # overlap
        for line in lines:
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    engine = make_engine(tiny_dir, max_loras=1, max_lora_rank=16)
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    assert text == engine.generate(["Hello world"], params, [v1])[0].text
    after = complete(server, "acme", "live").json()["choices"][0]["text"]
    assert after == engine.generate(["Hello world"], SamplingParams(**GREEDY), [v2])[0].text


def test_listing_survives_a_hand_placed_adapter_without_weights(server, repo, tiny_adapters):
    broken = repo / "acme" / "pickled"
    broken.mkdir(parents=True)
    (broken / "adapter_config.json").write_bytes((tiny_adapters["r4-attn"] / "adapter_config.json").read_bytes())
    (broken / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    try:
        headers = {"Authorization": f"Bearer {KEYS['acme']}"}
        rows = {a["id"]: a for a in httpx.get(f"{server}/v1/adapters", headers=headers).json()["data"]}
        assert rows["acme/pickled"]["sha256"] is None and rows["acme/pickled"]["bytes"] == 0
        r = complete(server, "acme", "pickled")
        assert r.status_code == 400 and "pickle" in r.json()["error"]["message"]
    finally:
        shutil.rmtree(broken)


def test_disk_tier_counts_uploaded_versions(server, tiny_adapters):
    assert upload(server, "acme", "sized", adapter_files(tiny_adapters["r8-qv"])).status_code == 201
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    listed = httpx.get(f"{server}/v1/adapters", headers=admin).json()["data"]
    disk = httpx.get(f"{server}/admin/stats", headers=admin).json()["tiers"]["disk"]
    assert disk["count"] == len(listed) and disk["bytes"] >= sum(a["bytes"] for a in listed) > 0


def test_a_chunked_upload_over_the_limit_is_413_and_leaves_nothing(tmp_path, monkeypatch):
    """No Content-Length to check up front: the body is counted as it streams and refused at the limit."""
    import asyncio

    from starlette.requests import Request

    import mux.server.adapters as adapters
    from mux.lora.repository import AdapterRepository
    from mux.server.auth import Auth

    monkeypatch.setattr(adapters, "MAX_BODY_BYTES", 64 << 10)
    state = type("State", (), {"auth": Auth(), "repository": AdapterRepository(tmp_path)})()
    boundary = b"xyz"
    head = b'--xyz\r\nContent-Disposition: form-data; name="archive"; filename="a.tar.gz"\r\n\r\n'
    chunks = [head] + [b"\0" * (16 << 10)] * 64  # 1 MiB of file, never a closing boundary
    sent = []

    async def receive():
        sent.append(1)
        return {"type": "http.request", "body": chunks[len(sent) - 1], "more_body": len(sent) < len(chunks)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/adapters",
        "headers": [
            (b"content-type", b"multipart/form-data; boundary=" + boundary),
            (b"transfer-encoding", b"chunked"),
        ],
        "query_string": b"",
    }
    r = asyncio.run(adapters.AdapterRoutes(state).upload(Request(scope, receive)))
    assert r.status_code == 413 and b"too large" in r.body
    assert len(sent) < len(chunks)  # it stopped reading at the limit
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_delete_refused_while_a_request_waits_for_a_slot(server, tiny_adapters):
    """Queued, not yet in a slot (every slot pinned), the request still uses the adapter: 409, and it is served."""
    import threading

    admin, acme = ({"Authorization": f"Bearer {KEYS[w]}"} for w in ("admin", "acme"))
    for name in ("pin1", "pin2", "waits"):
        assert upload(server, "acme", name, adapter_files(tiny_adapters["r2-down"])).status_code == 201
    for name in ("pin1", "pin2"):  # the server has two slots
        assert httpx.post(f"{server}/admin/adapters/acme/{name}/pin", headers=admin).status_code == 200
    answer = {}
    waiter = threading.Thread(target=lambda: answer.update(r=complete(server, "acme", "waits")))
    waiter.start()
    try:
        for _ in range(200):
            if httpx.get(f"{server}/admin/stats", headers=admin).json()["engine"]["waiting"]:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the request never queued")
        assert httpx.delete(f"{server}/v1/adapters/acme/waits", headers=acme).status_code == 409
    finally:
        for name in ("pin1", "pin2"):
            httpx.post(f"{server}/admin/adapters/acme/{name}/unpin", headers=admin)
        waiter.join(timeout=60)
    assert answer["r"].status_code == 200, answer["r"].text
    assert httpx.delete(f"{server}/v1/adapters/acme/waits", headers=acme).status_code == 200
