"""Keys, tenants and admin routes on a real server: tenant A never sees or uses tenant B's adapters."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import openai
import pytest

from conftest import run_server, write_policy

KEYS = {"admin": "admin-secret", "acme": "acme-secret", "beta": "beta-secret"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir, tiny_adapters):
    root = tmp_path_factory.mktemp("repo")
    layout = [
        ("acme", "attn", "r4-attn"),
        ("acme", "all", "r16-all"),
        ("beta", "mlp", "r8-mlp"),
        ("beta", "qv", "r8-qv"),
        ("demo", "pub", "r4-all"),
    ]
    for tenant, name, src in layout:
        shutil.copytree(tiny_adapters[src], root / tenant / name)
    policy = tmp_path_factory.mktemp("policy") / "policy.toml"
    write_policy(policy, KEYS, tail='[public]\nadapters = ["demo/*"]\n')
    with run_server(tiny_dir, root, "--policy", str(policy), "--max-loras", "2") as base:
        yield base


def client(server, who):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEYS.get(who, "wrong"), max_retries=0)


def call(server, path, key=None, method="GET"):
    req = urllib.request.Request(f"{server}{path}", method=method, data=b"" if method == "POST" else None)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_no_key_or_bad_key_is_401(server):
    assert call(server, "/v1/models")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        client(server, "nobody").models.list()
    assert call(server, "/health")[0] == 200  # liveness needs no key


def test_tenants_see_only_their_own_and_public_adapters(server):
    acme = {m.id for m in client(server, "acme").models.list().data}
    beta = {m.id for m in client(server, "beta").models.list().data}
    assert acme == {"tiny", "acme/attn", "acme/all", "demo/pub"}
    assert beta == {"tiny", "beta/mlp", "beta/qv", "demo/pub"}
    assert len({m.id for m in client(server, "admin").models.list().data}) == 6


def test_tenant_cannot_use_another_tenants_adapter(server):
    acme = client(server, "acme")
    for model in ("beta/mlp", "beta/qv", "mlp"):  # plain "mlp" means acme/mlp, which does not exist
        with pytest.raises(openai.NotFoundError):
            acme.completions.create(model=model, prompt="Hi", max_tokens=2)
    full = acme.completions.create(model="acme/attn", prompt="Hi", max_tokens=3, temperature=0)
    plain = acme.completions.create(model="attn", prompt="Hi", max_tokens=3, temperature=0)
    assert full.choices[0].text == plain.choices[0].text
    assert acme.completions.create(model="demo/pub", prompt="Hi", max_tokens=2).choices


def test_admin_routes_refuse_tenant_keys(server):
    assert call(server, "/admin/stats", KEYS["acme"])[0] == 403
    assert call(server, "/admin/stats")[0] == 401
    assert call(server, "/admin/adapters/acme/attn/evict", KEYS["beta"], "POST")[0] == 403
    assert call(server, "/v1/load_lora_adapter", KEYS["acme"], "POST")[0] == 403  # server-side paths: admin only


def test_stats_after_traffic_over_more_adapters_than_the_pool_holds(server):
    """--max-loras 2: a pool of two rank-16 adapters' bytes (8 pages of 4 ranks) for ranks 4, 16, 8, 8, 4 (10
    pages): qv evicts attn, pub evicts all (least recent), attn comes back."""
    admin = client(server, "admin")
    used = ["acme/attn", "acme/all", "beta/mlp", "beta/qv", "demo/pub", "acme/attn"]
    for adapter in set(used):  # from an empty pool, whatever the module's earlier tests loaded
        call(server, f"/admin/adapters/{adapter}/evict", KEYS["admin"], "POST")
    before = call(server, "/admin/stats", KEYS["admin"])[1]["counters"]["evictions"]["device_to_host"]
    for model in used:
        admin.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0)
    status, stats = call(server, "/admin/stats", KEYS["admin"])
    assert status == 200
    device = stats["tiers"]["device"]
    assert device["capacity"] == 2 and device["used_bytes"] + device["free_bytes"] == device["capacity_bytes"]
    assert device["capacity_bytes"] == 8 * device["page_bytes"]
    assert stats["tiers"]["disk"]["count"] == 5 and stats["tiers"]["host"]["used_bytes"] > 0
    assert stats["counters"]["evictions"]["device_to_host"] - before == 2
    assert {"running", "waiting", "tokens_per_s"} <= set(stats["engine"])
    by_id = {a["id"]: a for a in stats["adapters"]}
    assert set(by_id) >= set(used)
    on_device = {i: a for i, a in by_id.items() if a["tier"] == "device"}
    assert sorted(on_device) == ["acme/attn", "beta/mlp", "beta/qv", "demo/pub"]
    assert [on_device[i]["rank"] for i in sorted(on_device)] == [4, 8, 8, 4]
    assert sum(a["device_bytes"] for a in on_device.values()) == device["used_bytes"] == 6 * device["page_bytes"]
    assert by_id["acme/attn"]["uses"] >= 2 and all(a["in_flight"] == 0 for a in by_id.values())
    assert set(stats["load_latency_s"]) == {"disk_to_host", "host_to_device"}


def test_admin_pin_evict_unpin(server):
    key = KEYS["admin"]
    assert call(server, "/admin/adapters/beta/qv/pin", key, "POST") == (
        200,
        {"id": "beta/qv", "action": "pin", "done": True},
    )
    assert call(server, "/admin/adapters/beta/qv/evict", key, "POST")[1]["done"] is False  # pinned
    stats = call(server, "/admin/stats", key)[1]
    assert {a["id"]: a for a in stats["adapters"]}["beta/qv"]["pinned"] is True
    assert call(server, "/admin/adapters/beta/qv/unpin", key, "POST")[1]["done"] is True
    assert call(server, "/admin/adapters/beta/qv/evict", key, "POST")[1]["done"] is True
    assert call(server, "/admin/adapters/beta/nope/pin", key, "POST")[0] == 404
    assert call(server, "/admin/adapters/beta/qv/explode", key, "POST")[0] == 404


def test_admin_resets_the_prefix_cache(server):
    acme = client(server, "acme")
    prompt = "Reply with one word, please, whatever the question is. " * 3 + "Which colour is the sky?"

    def cached_tokens() -> int:
        r = acme.completions.create(model="acme/attn", prompt=prompt, max_tokens=2, temperature=0)
        return r.usage.prompt_tokens_details.cached_tokens

    cached_tokens()
    assert cached_tokens() > 0
    for path in ("/admin/prefix_cache/reset", "/reset_prefix_cache"):  # ours, and vLLM's name for it
        assert call(server, path, KEYS["acme"], "POST")[0] == 403
        status, body = call(server, path, KEYS["admin"], "POST")
        assert status == 200 and body["forgotten_blocks"] > 0
        assert cached_tokens() == 0  # computed again (and cached again for the next reset)
    assert call(server, "/admin/stats", KEYS["admin"])[1]["engine"]["prefix_cache"]["hit_tokens"] > 0


def scrape(server) -> str:
    req = urllib.request.Request(f"{server}/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"})
    with urllib.request.urlopen(req) as r:
        return r.read().decode()


def test_metrics_prometheus_format(server):
    admin = client(server, "admin")
    admin.completions.create(model="acme/attn", prompt="Hello", max_tokens=3, temperature=0)
    list(admin.completions.create(model="demo/pub", prompt="Hello", max_tokens=3, stream=True))
    text = scrape(server)
    series = 'mux_requests_total{adapter="acme/attn",finish_reason="length",version="0"} '
    count = float(text.split(series)[1].split()[0])
    client(server, "acme").completions.create(model="attn", prompt="Hello", max_tokens=2, temperature=0)
    text = scrape(server)  # labelled by the adapter that served, not the name as typed: `attn` is acme/attn
    assert float(text.split(series)[1].split()[0]) == count + 1 and 'adapter="attn"' not in text
    assert 'mux_time_to_first_token_seconds_count{adapter="demo/pub",version="0"}' in text
    assert 'mux_generated_tokens_total{adapter="acme/attn"}' in text
    assert "mux_device_slots_capacity 2.0" in text and "mux_waiting_requests" in text
    assert 'mux_adapter_evictions_total{path="device_to_host"}' in text
    assert 'mux_adapter_loads_total{path="host_to_device"}' in text
    assert 'mux_engine_faults_total{where="step"} 0.0' in text and 'mux_engine_faults_total{where="loop"}' in text
    assert "mux_prefix_cache_queries_total" in text and "mux_prefix_cache_hits_total" in text
    assert "mux_kv_blocks_cached" in text
    assert call(server, "/metrics", KEYS["acme"])[0] == 403
