"""The dashboard in a real headless browser (the OS's Chromium, driven by Playwright) and /admin/history over HTTP,
on one server with keys: the page asks for the key, shows the tiers, adapters, charts and rollouts, updates them,
logs no JavaScript error, and says so when a key is refused."""

from __future__ import annotations

import re
import shutil
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from conftest import run_server, write_policy
from mux.server.history import History

CHROMIUM = Path("/usr/bin/chromium")
KEYS = {"admin": "admin-secret", "acme": "acme-secret", "beta": "beta-secret"}
ADAPTERS = {"acme/attn": "r4-attn", "acme/mlp": "r8-mlp", "beta/qv": "r8-qv"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir, tiny_adapters):
    root = tmp_path_factory.mktemp("repo")
    for adapter_id, src in ADAPTERS.items():
        shutil.copytree(tiny_adapters[src], root / adapter_id)
    policy = write_policy(tmp_path_factory.mktemp("policy") / "policy.toml", KEYS)
    pool = str(4 * 32 << 10)  # 4 pages of the tiny model's 32 KiB: its 3 adapters take 5, so evictions
    with run_server(tiny_dir, root, "--policy", str(policy), "--max-loras", "2", "--max-lora-bytes", pool) as base:
        yield base


def complete(server: str, model: str, n: int = 1) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEYS["admin"], max_retries=0)
    for _ in range(n):
        client.completions.create(model=model, prompt="Hello there", max_tokens=4, temperature=0)


def upload(server: str, name: str, src: Path, activate: bool = True) -> None:
    fields = {"name": (None, name), **({} if activate else {"activate": (None, "false")})}
    files = {f.name: (f.name, f.read_bytes()) for f in (src / "adapter_config.json", src / "adapter_model.safetensors")}
    r = httpx.post(f"{server}/v1/adapters", files={**fields, **files}, headers=auth("admin"), timeout=60)
    assert r.status_code == 201, r.text


def auth(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def get(server: str, path: str, who: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS.get(who, who)}"} if who else {}
    return httpx.get(f"{server}{path}", headers=headers, timeout=30)


# ---- /admin/history ---------------------------------------------------------------------------------
def test_history_needs_the_admin_key(server):
    assert get(server, "/admin/history").status_code == 401
    assert get(server, "/admin/history", "wrong-key").status_code == 401
    assert get(server, "/admin/history", "acme").status_code == 403
    assert get(server, "/admin/history", "admin").status_code == 200


def test_history_points(server):
    complete(server, "acme/attn", 2)
    body = {"points": []}
    for _ in range(30):  # a point every 2 s
        body = get(server, "/admin/history", "admin").json()
        if body["points"] and body["points"][-1]["generated_tokens"] >= 8:
            break
        time.sleep(0.25)
    assert body["interval_s"] == 2.0 and body["max_points"] == 450 and body["now"] >= body["points"][-1]["t"]
    point = body["points"][-1]
    assert set(point) == {
        "t",
        "tokens_per_s",
        "generated_tokens",
        "running",
        "waiting",
        "ttft_p50_s",
        "ttft_count",
        "loads",
        "evictions",
        "faults",
    }
    assert point["generated_tokens"] >= 8 and point["loads"]["disk_to_host"] >= 1
    assert set(point["faults"]) == {"step", "loop"} and set(point["evictions"]) == {"device_to_host", "host_to_disk"}
    assert any(p["ttft_count"] and p["ttft_p50_s"] > 0 for p in body["points"])


def fake_state(ttfts: deque[float]) -> SimpleNamespace:
    """Just what History reads: an engine whose generated-token count grows by 10 per sample."""
    generated = iter(range(0, 10_000, 10))
    counters = {"loads": {"disk_to_host": 1}, "evictions": {"device_to_host": 0}}
    engine = SimpleNamespace(
        stats=lambda: {
            "generated_tokens": next(generated),
            "tokens_per_s": 7.0,
            "running": 1,
            "waiting": 2,
            "faults": {"step": 0, "loop": 0},
        },
        adapters=SimpleNamespace(counters=counters),
    )
    return SimpleNamespace(engine=engine, metrics=SimpleNamespace(recent_ttft=ttfts))


def test_history_is_bounded_and_drains_ttft():
    ttfts = deque([0.3, 0.1, 0.2])
    history = History(fake_state(ttfts), max_points=3)
    first = history.sample()
    assert first["tokens_per_s"] == 7.0  # no earlier point: the engine's own rate
    assert first["ttft_p50_s"] == 0.2 and first["ttft_count"] == 3 and not ttfts
    for _ in range(4):
        last = history.sample()
    assert len(history.points) == 3 and history.points[-1] is last
    assert last["ttft_p50_s"] is None and last["ttft_count"] == 0 and last["tokens_per_s"] > 0
    assert History(SimpleNamespace(engine=None)).sample() is None  # while the model loads


# ---- the page -------------------------------------------------------------------------------------
def test_the_page_needs_no_key_and_fetches_nothing_from_elsewhere(server):
    r = get(server, "/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp and "'sha256-" in csp
    assert re.findall(r'(?:src|href)="([^"]*)"', r.text) == ["data:,"]  # the empty favicon; no script/style URL


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM} (Debian's `chromium` package, which .ci/run installs): no browser to test in")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))  # the OS's build: `playwright install` never runs
        yield b
        b.close()


def enter_key(page, key: str) -> None:
    page.fill("#key", key)
    page.click("#login button[type=submit]")


def cell(page, adapter_id: str, column: str) -> str:
    return page.inner_text(f'#adapters tbody tr[data-id="{adapter_id}"] td[data-key="{column}"]')


def wait_until(page, predicate: str, arg=None, timeout_s: float = 10.0) -> None:
    """Poll `predicate` (a JS function of `arg`) from here: Playwright's wait_for_function evals a string in the
    page, which the page's Content-Security-Policy (no 'unsafe-eval') refuses."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(predicate, arg):
        assert time.monotonic() < deadline, f"not true within {timeout_s} s: {predicate}"
        time.sleep(0.1)


def test_dashboard_in_a_browser(server, browser, tmp_path, tiny_adapters):
    for adapter_id in ADAPTERS:
        complete(server, adapter_id)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    console, errors = [], []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    # no key yet, then a wrong one, then a tenant's: the prompt says why each time
    page.goto(f"{server}/dashboard")
    page.wait_for_selector("#login:not([hidden])")
    assert "needs the admin key" in page.inner_text("#login-msg")
    enter_key(page, "not-a-key")
    refused = "(code) => document.querySelector('#login-msg').textContent.includes(`admin key refused (${code}`)"
    wait_until(page, refused, 401)
    enter_key(page, KEYS["acme"])
    wait_until(page, refused, 403)
    assert page.is_hidden("#main")

    # the admin key: tiers, adapters and charts appear
    enter_key(page, KEYS["admin"])
    page.wait_for_selector("#main:not([hidden])")
    wait_until(page, "() => document.querySelectorAll('#adapters tbody tr').length === 3")
    assert page.evaluate("sessionStorage.getItem('mux-admin-key')") == KEYS["admin"]
    assert KEYS["admin"] not in page.url
    assert " / " in page.inner_text('[data-card="device pool"] .value')  # bytes used / the pool's
    assert cell(page, "acme/attn", "version") == "0" and cell(page, "beta/qv", "uses") == "1"
    tokens, used = page.inner_text('[data-card="generated tokens"] .value'), int(cell(page, "acme/attn", "uses"))

    # more requests: the figures update by themselves
    complete(server, "acme/attn", 2)
    updated = """([uses, tokens]) => document.querySelector('tr[data-id="acme/attn"] td[data-key="uses"]')
        .textContent === String(uses) && document.querySelector('[data-card="generated tokens"] .value')
        .textContent !== tokens"""
    wait_until(page, updated, [used + 2, tokens])  # the page refreshes every 2 s
    # two history points (2 s apart) make a line; the sampler and the page's refresh each wait 2 s, longer on a
    # loaded 2-core machine (10 s ran out once in a full run). TTFT has a point only for an interval with a
    # request: the base model gets one every half second until two intervals in a row have had one.
    line = "(id) => document.querySelector(`#chart-${id} path.line`).getAttribute('d').includes('L')"
    deadline = time.monotonic() + 30.0
    while not page.evaluate(line, "ttft"):
        assert time.monotonic() < deadline, "no TTFT line within 30 s"
        complete(server, "tiny")
        time.sleep(0.5)
    for chart in ("throughput", "queue", "tiers", "faults"):
        wait_until(page, line, chart, timeout_s=30.0)
    assert int(page.inner_text('[data-card="evictions"] .value')) >= 1

    # a canary split: the rollouts section shows both versions, their weights and their figures
    assert page.is_hidden("#rollouts") is False and "no adapter has a traffic split" in page.inner_text("#rollouts")
    upload(server, "acme/canary", tiny_adapters["r4-all"])
    upload(server, "acme/canary", tiny_adapters["r2-down"], activate=False)
    r = httpx.put(
        f"{server}/v1/adapters/acme/canary/traffic", json={"weights": {"1": 80, "2": 20}}, headers=auth("acme")
    )
    assert r.status_code == 200, r.text
    complete(server, "acme/canary", 4)
    rollout = '[data-rollout="acme/canary"]'
    served = f"""() => [...document.querySelectorAll('{rollout} td[data-key="requests"]')]
        .reduce((n, td) => n + Number(td.textContent), 0) === 4"""
    wait_until(page, served)
    rows = page.locator(f"{rollout} tbody tr")
    assert rows.evaluate_all("rows => rows.map(r => r.dataset.version)") == ["1", "2"]
    assert page.locator(f"{rollout} td[data-key=weight]").all_inner_texts() == ["80%", "20%"]
    assert page.inner_text(f"{rollout} tr.stable td[data-key=version]").split() == ["v1", "stable"]
    assert page.inner_text(f"{rollout} h3") == "acme/canary" and page.locator(f"{rollout} .reason").count() == 0
    assert "stable v1 · rollback to v1 · no guard" in page.inner_text(f"{rollout} .facts")

    # sort by a header, filter by tenant
    page.click('#adapters th[data-key="uses"]')  # uses was sorted descending: now ascending
    uses = [int(u) for u in page.locator('#adapters tbody td[data-key="uses"]').all_inner_texts()]
    assert uses == sorted(uses)
    page.screenshot(path=tmp_path / "dashboard.png", full_page=True)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    page.fill("#tenant-filter", "beta")
    assert page.locator("#adapters tbody tr").evaluate_all("rows => rows.map(r => r.dataset.id)") == ["beta/qv"]

    refused = re.compile(r"Failed to load resource: the server responded with a status of 40[13]")
    assert errors == [] and [m for m in console if not refused.match(m)] == []
    page.close()


ROLLED_BACK = {
    "id": "acme/<img src=x>",  # tenant data: shown as text, never parsed as HTML
    "versions": [
        {"version": 1, "weight": 100, "in_flight": 0, "figures": {"requests": 40, "errors": 0, "error_rate": 0.0}},
        {"version": 2, "weight": 0, "in_flight": 0, "figures": {"requests": 10, "errors": 10, "error_rate": 1.0}},
        {"version": 3, "weight": 0, "in_flight": 0},  # stored, outside the split: not listed
    ],
    "traffic": {
        "weights": {"1": 100, "2": 0},
        "stable": 1,
        "rollback_to": 1,
        "guard": {"max_error_rate": 0.05, "max_ttft_p99_ratio": 2.0, "min_requests": 10},
        "rollback_reason": "guard: version 2 failed 10 of 10 requests (error rate 1.000 > 0.05)",
        "updated": 0,
        "history": [],
    },
}


def test_an_open_server_needs_no_key_and_new_stats_get_sections(server, browser):
    """The page as an open server (no keys) answers it, with a rollout the guard rolled back and a running batch:
    the answers are this server's own, served to the page by the browser's request interception."""
    stats = get(server, "/admin/stats", "admin").json()
    stats["rollouts"] = [ROLLED_BACK]
    now = int(time.time())
    stats["batches"] = {
        "by_status": {"in_progress": 1, "completed": 4, "failed": 1},
        "lines_completed": 1234,
        "lines_failed": 5,
        "tokens_per_s": 56.25,
        "live": [
            {"id": "batch_1", "tenant": "acme", "status": "in_progress", "endpoint": "/v1/completions"}
            | {"created_at": now - 120, "expires_at": now + 3600, "total": 10, "completed": 2, "failed": 1}
        ],
    }
    history = get(server, "/admin/history", "admin").json()
    sent = []

    def answer(route):
        sent.append(route.request.headers.get("authorization"))
        route.fulfill(json=stats if route.request.url.endswith("/admin/stats") else history)

    page = browser.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.route("**/admin/*", answer)
    page.goto(f"{server}/dashboard")
    page.wait_for_selector("#batch-live td")
    assert page.is_hidden("#login") and sent and set(sent) == {None}
    rollout = page.locator("#rollouts .rollout")
    assert rollout.count() == 1 and rollout.get_attribute("data-rollout") == ROLLED_BACK["id"]
    assert rollout.locator("h3").inner_text() == ROLLED_BACK["id"] and page.locator("#rollouts img").count() == 0
    reason = ROLLED_BACK["traffic"]["rollback_reason"]
    assert rollout.locator(".reason[role=alert]").inner_text() == f"rolled back: {reason}"
    assert rollout.locator("tbody tr").all_inner_texts() == [
        "v1 stable\t100%\t40\t0\t0.0%\t–\t–\t–",
        "v2\t0%\t10\t10\t100.0%\t–\t–\t–",
    ]
    assert rollout.locator("td.bad").count() == 2  # v2's errors and error rate
    cards = page.locator("#batch-cards .card .value").all_inner_texts()
    assert cards == ["1", "5", "1,234", "56.3"]
    assert "1 failed" in page.locator("[data-card='batch ended'] .detail").inner_text()
    row = page.locator("#batch-live tbody tr").all_inner_texts()
    assert row == ["batch_1\tacme\tin_progress\t/v1/completions\t3 / 10\t1\t2 min ago\tin 60 min"]
    assert errors == []
    page.close()
