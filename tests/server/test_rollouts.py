"""Rollouts through a real server: upload without activating, split, sticky callers, promote, rollback, `@N`
pinning on every protocol, the version header, per-version figures, the guard, and bad input changing nothing."""

from __future__ import annotations

import concurrent.futures
import json
import shutil

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_server, write_policy

KEYS = {"admin": "admin-k", "acme": "acme-k", "beta": "beta-k"}
PROMPT = "Hello world"
GREEDY = {"max_tokens": 4, "temperature": 0}
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return tmp_path_factory.mktemp("rollout-repo")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir, repo):
    policy = write_policy(tmp_path_factory.mktemp("p") / "policy.toml", KEYS)
    with run_server(tiny_dir, repo, "--policy", str(policy), "--max-loras", "4") as base:
        yield base


@pytest.fixture(scope="module")
def peft_text(tiny_dir):
    """Greedy text of PeftModel(base, adapter) for PROMPT, computed once per adapter directory."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    seen: dict = {}

    def text(adapter) -> str:
        if adapter not in seen:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter).eval()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=GREEDY["max_tokens"], do_sample=False)
            seen[adapter] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return seen[adapter]

    return text


def auth(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def upload(server, who, name, src, activate=None):
    fields = {"name": (None, name), **({"activate": (None, activate)} if activate is not None else {})}
    files = {f: (f, (src / f).read_bytes()) for f in FILES}
    r = httpx.post(f"{server}/v1/adapters", files={**fields, **files}, headers=auth(who), timeout=60)
    assert r.status_code == 201, r.text
    return r.json()


def complete(client, server, model, who="acme", **extra):
    headers = {**auth(who), **extra.pop("headers", {})}
    body = {"model": model, "prompt": PROMPT, **GREEDY, **extra}
    return client.post(f"{server}/v1/completions", json=body, headers=headers, timeout=60)


def served(r) -> tuple[int, str]:
    assert r.status_code == 200, r.text
    return int(r.headers["x-mux-adapter-version"]), r.json()["choices"][0]["text"]


def put_traffic(server, adapter, body, who="acme"):
    return httpx.put(f"{server}/v1/adapters/{adapter}/traffic", json=body, headers=auth(who), timeout=30)


def act(server, adapter, action, body=None, who="acme"):
    return httpx.post(f"{server}/v1/adapters/{adapter}/{action}", json=body, headers=auth(who), timeout=30)


def test_canary_split_is_sticky_weighted_and_serves_each_versions_weights(server, tiny_adapters, peft_text):
    v1, v2 = tiny_adapters["r4-attn"], tiny_adapters["r8-mlp"]
    assert upload(server, "acme", "bot", v1)["version"] == 1
    meta = upload(server, "acme", "bot", v2, activate="false")
    assert meta["version"] == 2 and meta["activate"] is False
    with httpx.Client() as client:
        assert served(complete(client, server, "bot")) == (1, peft_text(v1))  # stored, traffic unchanged
        shown = client.get(f"{server}/v1/adapters/acme/bot", headers=auth("acme")).json()
        assert [v["version"] for v in shown["versions"]] == [1, 2] and shown["traffic"]["weights"] == {"1": 100}
        assert all(len(v["sha256"]) == 64 and v["rank"] in (4, 8) and v["created"] for v in shown["versions"])

        state = put_traffic(server, "acme/bot", {"weights": {"1": 90, "2": 10}})
        assert state.status_code == 200, state.text
        assert state.json()["traffic"]["weights"] == {"1": 90, "2": 10}

        def one(i: int) -> tuple[int, int, str]:
            return (i, *served(complete(client, server, "bot", user=f"user-{i}")))

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(1000)))
        share = sum(version == 2 for _, version, _ in results) / len(results)
        assert 0.07 <= share <= 0.13, share
        expected = {1: peft_text(v1), 2: peft_text(v2)}
        assert expected[1] != expected[2]
        assert all(text == expected[version] for _, version, text in results)
        first = {i: version for i, version, _ in results}
        for i in range(0, 1000, 25):  # the same caller always gets the same version
            assert served(complete(client, server, "bot", user=f"user-{i}"))[0] == first[i]
            header = {"x-mux-session": f"user-{i}"}  # the header is the same key on any protocol
            assert served(complete(client, server, "bot", headers=header))[0] == first[i]

        figures = {v["version"]: v["figures"] for v in state_of(client, server, "acme/bot")["versions"]}
        assert figures[1]["requests"] + figures[2]["requests"] >= 1000 and figures[2]["errors"] == 0
        assert figures[2]["ttft_p99_s"] is not None
        metrics = client.get(f"{server}/metrics", headers=auth("admin")).text
        assert 'mux_requests_total{adapter="acme/bot",finish_reason="length",version="2"}' in metrics


def state_of(client, server, adapter, who="acme") -> dict:
    r = client.get(f"{server}/v1/adapters/{adapter}", headers=auth(who))
    assert r.status_code == 200, r.text
    return r.json()


def test_promote_rollback_pinning_and_blue_green_on_every_protocol(server, tiny_adapters, peft_text):
    v1, v2 = tiny_adapters["r16-all"], tiny_adapters["r8-qv"]
    upload(server, "acme", "pr", v1)
    upload(server, "acme", "pr", v2, activate="false")
    expected = {1: peft_text(v1), 2: peft_text(v2)}
    with httpx.Client() as client:
        r = act(server, "acme/pr", "promote", {"version": 2})
        assert r.status_code == 200 and r.json()["traffic"]["weights"] == {"2": 100}, r.text
        assert {served(complete(client, server, "pr", user=f"u{i}")) for i in range(20)} == {(2, expected[2])}
        r = act(server, "acme/pr", "rollback")
        assert r.status_code == 200 and r.json()["traffic"]["weights"] == {"1": 100}, r.text
        assert served(complete(client, server, "pr")) == (1, expected[1])

        # blue/green: a 0/100 split switches at once; rollback returns to the stable version
        assert put_traffic(server, "acme/pr", {"weights": {"1": 0, "2": 100}}).status_code == 200
        assert {served(complete(client, server, "pr", user=f"u{i}"))[0] for i in range(20)} == {2}
        assert act(server, "acme/pr", "rollback", {}).json()["traffic"]["weights"] == {"1": 100}

        # `@N` pins a version whatever the split says, on every protocol, streams included
        assert served(complete(client, server, "acme/pr@2")) == (2, expected[2])
        stream = client.post(
            f"{server}/v1/completions",
            json={"model": "pr@2", "prompt": PROMPT, **GREEDY, "stream": True},
            headers=auth("acme"),
        )
        assert stream.status_code == 200 and stream.headers["x-mux-adapter-version"] == "2"
        kserve = client.post(
            f"{server}/v2/models/acme/pr@2/generate",
            json={"text_input": PROMPT, "parameters": GREEDY},
            headers=auth("acme"),
        )
        assert kserve.status_code == 200, kserve.text
        assert kserve.headers["x-mux-adapter-version"] == "2" and kserve.json()["text_output"] == expected[2]
        body = {"inputs": PROMPT, "parameters": {"adapter_id": "acme/pr@2", "max_new_tokens": 4}}
        lorax = client.post(f"{server}/generate", json=body, headers=auth("acme"))
        assert lorax.status_code == 200, lorax.text
        assert lorax.headers["x-mux-adapter-version"] == "2" and lorax.json()["generated_text"] == expected[2]
        lorax = client.post(
            f"{server}/generate",
            json={**body, "parameters": {**body["parameters"], "adapter_id": "acme/pr"}},
            headers=auth("acme"),
        )
        assert lorax.headers["x-mux-adapter-version"] == "1"
        base = client.post(f"{server}/v1/completions", json={"prompt": PROMPT, **GREEDY}, headers=auth("acme"))
        assert base.status_code == 200 and "x-mux-adapter-version" not in base.headers


BAD_SPLITS = [
    ({"weights": {"1": 60, "2": 30}}, "sum to 100"),
    ({"weights": {"1": 110, "2": -10}}, "integer percent"),
    ({"weights": {"1": 50.5, "2": 49.5}}, "integer percent"),
    ({"weights": {"1": 50, "9": 50}}, "version 9 does not exist"),
    ({"weights": {}}, "non-empty"),
    ({"weights": {"one": 100}}, "version numbers"),
    ({}, "non-empty"),
    ({"weights": {"1": 100}, "guard": {"max_error_rate": 2}}, "max_error_rate"),
    ({"weights": {"1": 100}, "guard": {"min_requests": 0}}, "min_requests"),
    ({"weights": {"1": 100}, "guard": {"max_ttft_p99_ratio": 10**400}}, "max_ttft_p99_ratio"),
    ({"weights": {"1": 100}, "guard": {"typo": 1}}, "unknown guard"),
    ({"weights": {"1": 100}, "extra": 1}, "unknown fields"),
]


@pytest.fixture(scope="module")
def split_adapter(server, repo, tiny_adapters):
    upload(server, "acme", "bad", tiny_adapters["r4-all"])
    upload(server, "acme", "bad", tiny_adapters["r2-down"], activate="false")
    assert put_traffic(server, "acme/bad", {"weights": {"1": 80, "2": 20}}).status_code == 200
    return repo / "acme" / "bad" / "traffic.json"


@pytest.mark.parametrize(("body", "reason"), BAD_SPLITS)
def test_bad_splits_are_400_and_change_nothing(server, split_adapter, body, reason):
    before = split_adapter.read_bytes()
    r = put_traffic(server, "acme/bad", body)
    assert r.status_code == 400 and reason in r.json()["error"]["message"], r.text
    assert split_adapter.read_bytes() == before


def test_bad_rollout_requests_are_refused_and_change_nothing(server, split_adapter, tiny_adapters):
    before = split_adapter.read_bytes()
    with httpx.Client() as client:
        for who in ("beta",):  # another tenant: the adapter does not exist for it
            assert put_traffic(server, "acme/bad", {"weights": {"1": 100}}, who=who).status_code == 404
            assert act(server, "acme/bad", "promote", {"version": 2}, who=who).status_code == 404
            assert act(server, "acme/bad", "rollback", who=who).status_code == 404
            assert client.get(f"{server}/v1/adapters/acme/bad", headers=auth(who)).status_code == 404
            assert complete(client, server, "acme/bad@1", who=who).status_code == 404
        assert act(server, "acme/bad", "promote", {"version": 7}).status_code == 400
        assert act(server, "acme/bad", "promote", {"version": "2"}).status_code == 400
        assert act(server, "acme/bad", "rollback", {"why": 1}).status_code == 400
        assert put_traffic(server, "acme/nothing", {"weights": {"1": 100}}).status_code == 404
        assert complete(client, server, "acme/nothing@1").status_code == 404
        assert complete(client, server, "acme/bad@9").status_code == 404
        assert complete(client, server, "acme/bad@x").status_code == 400
        assert complete(client, server, "bad", headers={"x-mux-session": "a b"}).status_code == 400
        assert complete(client, server, "bad", headers={"x-mux-session": "x" * 300}).status_code == 400
        assert complete(client, server, "bad", user=7).status_code == 400
        # a version its split serves cannot be deleted; a version outside it can
        r = client.delete(f"{server}/v1/adapters/acme/bad@2", headers=auth("acme"))
        assert r.status_code == 409 and "traffic split" in r.json()["error"]["message"], r.text
        assert split_adapter.read_bytes() == before
        upload(server, "acme", "bad", tiny_adapters["r8-qv"], activate="false")
        r = client.delete(f"{server}/v1/adapters/acme/bad@3", headers=auth("acme"))
        assert r.status_code == 200 and r.json() == {"id": "acme/bad", "version": 3, "deleted": True}
        assert not (split_adapter.parent / "v3").exists()
        assert split_adapter.read_bytes() == before
        r = httpx.post(
            f"{server}/v1/adapters",
            files={
                "name": (None, "fresh"),
                "activate": (None, "false"),
                **{f: (f, (tiny_adapters["r8-qv"] / f).read_bytes()) for f in FILES},
            },
            headers=auth("acme"),
        )
        assert r.status_code == 400 and "first" in r.json()["error"]["message"]
        assert not (split_adapter.parent.parent / "fresh").exists()


def test_the_guard_rolls_a_failing_canary_back_and_stable_callers_never_see_an_error(server, repo, tiny_adapters):
    upload(server, "acme", "guarded", tiny_adapters["r4-attn"])
    upload(server, "acme", "guarded", tiny_adapters["r8-mlp"], activate="false")
    guard = {"max_error_rate": 0.05, "max_ttft_p99_ratio": 50, "min_requests": 10}
    r = put_traffic(server, "acme/guarded", {"weights": {"1": 50, "2": 50}, "guard": guard})
    assert r.status_code == 200, r.text
    (repo / "acme" / "guarded" / "v2" / "adapter_model.safetensors").write_bytes(b"broken on disk")
    outcomes = []
    with httpx.Client() as client:
        for i in range(200):
            r = complete(client, server, "guarded", user=f"g{i}")
            outcomes.append((r.status_code, r.headers.get("x-mux-adapter-version")))
            if state_of(client, server, "acme/guarded")["traffic"]["weights"] == {"1": 100}:
                break
        state = state_of(client, server, "acme/guarded")["traffic"]
        assert state["weights"] == {"1": 100} and "error rate" in state["rollback_reason"], state
        assert state["history"][-1]["action"] == "guard"
        failed = [o for o in outcomes if o[0] != 200]
        assert len(failed) >= 10 and all(version != "1" for _, version in failed)  # only the canary failed
        assert all(complete(client, server, "guarded", user=f"g{i}").status_code == 200 for i in range(20))
        stats = client.get(f"{server}/admin/stats", headers=auth("admin")).json()
        rollout = next(r for r in stats["rollouts"] if r["id"] == "acme/guarded")
        assert rollout["traffic"]["rollback_reason"] == state["rollback_reason"]


def test_splits_and_history_survive_a_restart(tiny_dir, tiny_adapters, tmp_path):
    root = tmp_path / "repo"
    for v, src in enumerate(("r4-attn", "r8-mlp"), 1):
        (root / "t" / "a" / f"v{v}").mkdir(parents=True)
        for f in FILES:
            shutil.copy(tiny_adapters[src] / f, root / "t" / "a" / f"v{v}" / f)
        meta = {"id": "t/a", "version": v, "activate": v == 1}  # v2: stored without taking traffic
        (root / "t" / "a" / f"v{v}" / "meta.json").write_text(json.dumps(meta))
    (root / "t" / "a" / "current").symlink_to("v1")
    with run_server(tiny_dir, root) as base:
        assert put_traffic(base, "t/a", {"weights": {"1": 70, "2": 30}}).status_code == 200
        assert act(base, "t/a", "promote", {"version": 2}).status_code == 200
    with run_server(tiny_dir, root) as base, httpx.Client() as client:
        state = state_of(client, base, "t/a")["traffic"]
        assert state["weights"] == {"2": 100} and state["rollback_to"] == 1
        assert [h["action"] for h in state["history"]] == ["split", "promote"]
        assert served(complete(client, base, "t/a"))[0] == 2
