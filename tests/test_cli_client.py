"""`mux adapters ...`, `mux rollout ...` and `mux stats` against a real `mux serve` (tiny model, keys for an admin
and two tenants): tables by default, the server's JSON with --json, the server's message and exit status 1 on a
refusal."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import httpx
import pytest

from conftest import free_port, run_server, write_policy
from mux import cli, client
from mux.client import adapters, rollout

KEYS = {"admin": "admin-k", "acme": "acme-k", "beta": "beta-k"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_adapters):
    root = tmp_path_factory.mktemp("cli-repo")
    shutil.copytree(tiny_adapters["r8-mlp"], root / "beta" / "mlp")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir, repo):
    policy = write_policy(tmp_path_factory.mktemp("p") / "policy.toml", KEYS)
    with run_server(tiny_dir, repo, "--policy", str(policy), "--max-loras", "2") as base:
        yield base


def mux(server: str, who: str | None, *args: str, **env: str | None) -> subprocess.CompletedProcess:
    """`mux ARGS` as a user types it: --url unless the environment gives it, --key for `who` (a name in KEYS, or a
    key as is)."""
    flags = [] if "MUX_URL" in env else ["--url", server]
    flags += ["--key", KEYS.get(who, who)] if who else []
    return subprocess.run(
        [sys.executable, "-m", "mux.cli", *args, *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in {**os.environ, **env}.items() if v is not None},
    )


def ok(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stderr
    return out.stdout


def refused(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 1 and out.stdout == "", (out.stdout, out.stderr)
    assert out.stderr.startswith("mux: ") and all(w in out.stderr for w in words), out.stderr


def test_upload_list_show_rm(server, tiny_adapters):
    out = ok(mux(server, "acme", "adapters", "upload", str(tiny_adapters["r4-attn"]), "--name", "acme/bot"))
    assert out.startswith("uploaded acme/bot version 1 (rank 4, ")
    listing = ok(mux(server, "acme", "adapters", "list"))
    header, *rows = listing.splitlines()
    assert header.split() == ["ID", "VERSION", "RANK", "TARGETS", "SIZE", "SHA256", "CREATED"]
    assert [r.split()[:3] for r in rows] == [["acme/bot", "1", "4"]]  # beta's adapter is not acme's to see
    assert " k,o,q,v " in rows[0]  # the target modules, sorted, without `_proj`
    shown = ok(mux(server, "acme", "adapters", "show", "bot"))  # a plain name: the one this key can see
    fields = dict(line.split(None, 1) for line in shown.splitlines())
    meta = httpx.get(f"{server}/v1/adapters/acme/bot", headers={"Authorization": "Bearer acme-k"}).json()
    assert fields["rank"] == "4" and fields["sha256"] == meta["sha256"] and fields["source"] == "upload"
    assert ok(mux(server, "acme", "adapters", "rm", "acme/bot")) == "deleted acme/bot\n"
    assert ok(mux(server, "acme", "adapters", "list")) == "no adapters\n"


def test_json_is_the_servers(server, tiny_adapters):
    ok(mux(server, "beta", "adapters", "upload", str(tiny_adapters["r2-down"]), "--name", "down"))
    headers = {"Authorization": "Bearer beta-k"}
    listed = json.loads(ok(mux(server, "beta", "adapters", "list", "--json")))
    assert listed == httpx.get(f"{server}/v1/adapters", headers=headers).json()
    assert {m["id"] for m in listed["data"]} == {"beta/down", "beta/mlp"}
    shown = json.loads(ok(mux(server, "beta", "adapters", "show", "beta/down", "--json")))
    assert shown == httpx.get(f"{server}/v1/adapters/beta/down", headers=headers).json()
    second = json.loads(
        ok(mux(server, "beta", "adapters", "upload", str(tiny_adapters["r4-all"]), "--name", "down", "--json"))
    )
    assert second["id"] == "beta/down" and second["version"] == 2 and second["rank"] == 4
    assert json.loads(ok(mux(server, "beta", "adapters", "rm", "down", "--json"))) == {
        "id": "beta/down",
        "deleted": True,
    }


def test_url_and_key_from_the_environment(server):
    out = mux(server, None, "adapters", "list", MUX_URL=server, MUX_API_KEY=KEYS["beta"])
    assert ok(out).splitlines()[1].startswith("beta/mlp ")
    refused(mux(server, None, "adapters", "list", MUX_URL=server, MUX_API_KEY=None), "401", "missing API key")


def test_refusals_exit_1_with_the_servers_message(server, tiny_adapters, tmp_path):
    refused(mux(server, "acme", "adapters", "show", "beta/mlp"), "404", "`beta/mlp` does not exist")
    refused(mux(server, "acme", "adapters", "show", "mlp"), "no adapter named 'mlp'")
    refused(mux(server, "not-a-key", "adapters", "list"), "401", "invalid API key")
    refused(mux(server, "acme", "stats"), "403", "admin key")
    refused(mux(server, "acme", "adapters", "rm", "beta/mlp"), "404")  # another tenant's: as if absent
    refused(mux(server, "acme", "adapters", "upload", str(tmp_path), "--name", "x"), "missing", "adapter_config.json")
    (tmp_path / "adapter_config.json").write_text("{nope")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    refused(mux(server, "acme", "adapters", "upload", str(tmp_path), "--name", "x"), "400", "not valid JSON")
    refused(mux(server, "acme", "adapters", "upload", str(tiny_adapters["r4-attn"]), "--name", "a/../b"), "400")
    # the admin sees both tenants' `mlp`
    ok(mux(server, "admin", "adapters", "upload", str(tiny_adapters["r8-mlp"]), "--name", "acme/mlp"))
    refused(mux(server, "admin", "adapters", "show", "mlp"), "ambiguous", "acme/mlp, beta/mlp")
    admin = {"Authorization": "Bearer admin-k"}
    assert httpx.post(f"{server}/admin/adapters/acme/mlp/pin", headers=admin).json()["done"]
    refused(mux(server, "acme", "adapters", "rm", "mlp"), "409", "pinned")
    assert httpx.post(f"{server}/admin/adapters/acme/mlp/unpin", headers=admin).json()["done"]
    assert ok(mux(server, "acme", "adapters", "rm", "mlp")) == "deleted acme/mlp\n"
    refused(mux(f"http://127.0.0.1:{free_port()}", None, "adapters", "list"), "GET http://127.0.0.1:", "refused")


def test_no_activate_sends_activate_false(server, tiny_adapters):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.read())
        return httpx.Response(201, json={"id": "acme/bot", "version": 1, "rank": 4, "bytes": 1, "sha256": "0" * 64})

    fake = httpx.Client(base_url="http://mux.test", transport=httpx.MockTransport(handler))
    for flags in ((), ("--no-activate",)):
        args = _parse(["adapters", "upload", str(tiny_adapters["r4-attn"]), "--name", "acme/bot", *flags])
        assert client.run(args, http=fake) == 0
    plain, no_activate = seen
    field = b'Content-Disposition: form-data; name="activate"\r\n\r\nfalse\r\n'
    assert field not in plain and field in no_activate
    assert b'name="adapter_model.safetensors"' in no_activate and b'name="name"\r\n\r\nacme/bot' in no_activate
    # the real server stores it as the next version and leaves the traffic where it was
    src = str(tiny_adapters["r4-attn"])
    ok(mux(server, "acme", "adapters", "upload", src, "--name", "staged"))
    out = mux(server, "acme", "adapters", "upload", src, "--name", "staged", "--no-activate")
    assert ok(out).startswith("uploaded acme/staged version 2 ")
    shown = json.loads(ok(mux(server, "acme", "adapters", "show", "staged", "--json")))
    assert shown["traffic"]["weights"] == {"1": 100} and [v["version"] for v in shown["versions"]] == [1, 2]
    ok(mux(server, "acme", "adapters", "rm", "staged"))


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mux")
    client.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_upload_progress_bar(server, tiny_adapters):
    src = str(tiny_adapters["r16-all"])
    out = mux(server, "acme", "adapters", "upload", src, "--name", "big", "--progress")
    assert ok(out).startswith("uploaded acme/big version 1 ")
    assert "big: 100%" in out.stderr  # tqdm, on stderr: stdout stays the one result line
    size = sum((tiny_adapters["r16-all"] / f).stat().st_size for f in adapters.FILES)
    assert size < adapters.PROGRESS_BYTES  # forced here: small uploads and pipes get no bar by default
    quiet = mux(server, "acme", "adapters", "upload", src, "--name", "big")
    assert ok(quiet).startswith("uploaded acme/big version 2 ") and quiet.stderr == ""
    ok(mux(server, "acme", "adapters", "rm", "big"))


def test_stats_table_and_json(server):
    beta = {"Authorization": "Bearer beta-k"}
    body = {"model": "beta/mlp", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    assert httpx.post(f"{server}/v1/completions", json=body, headers=beta, timeout=60).status_code == 200
    table = ok(mux(server, "admin", "stats"))
    assert [line.split()[0] for line in table.splitlines()[:4]] == ["TIER", "device", "host", "disk"]
    assert "2 a step" in table  # --max-loras 2
    assert "engine: " in table and "hits: device" in table and "load p50/p95 ms:" in table
    top = table[table.index("ADAPTER") :].splitlines()
    assert top[0].split()[:3] == ["ADAPTER", "VERSION", "TIER"] and any(r.startswith("beta/mlp ") for r in top[1:])
    assert len(ok(mux(server, "admin", "stats", "--top", "1")).split("ADAPTER", 1)[1].splitlines()) == 2
    stats = json.loads(ok(mux(server, "admin", "stats", "--json")))
    assert set(stats["tiers"]) == {"device", "host", "disk"} and stats["tiers"]["device"]["capacity"] == 2
    assert any(a["id"] == "beta/mlp" and a["uses"] >= 1 for a in stats["adapters"])


@pytest.mark.parametrize("as_json", [True, False])
def test_stats_watch_redraws_until_interrupted(server, as_json):
    command = [sys.executable, "-m", "mux.cli", "stats", "--watch", "0.2", "--url", server, "--key", KEYS["admin"]]
    proc = subprocess.Popen([*command, *(["--json"] if as_json else [])], stdout=subprocess.PIPE, text=True)
    try:
        if as_json:
            frames = [json.loads(proc.stdout.readline()) for _ in range(3)]  # one JSON line each time
            assert all(set(f["tiers"]) == {"device", "host", "disk"} for f in frames)
        else:
            starts = 0
            while starts < 3:
                line = proc.stdout.readline()
                assert line, "the watch ended by itself"
                starts += line.startswith("TIER")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def canary(server, tiny_adapters):
    """acme/canary: version 1 serving, version 2 stored with --no-activate."""
    ok(mux(server, "acme", "adapters", "upload", str(tiny_adapters["r4-attn"]), "--name", "canary"))
    ok(mux(server, "acme", "adapters", "upload", str(tiny_adapters["r8-mlp"]), "--name", "canary", "--no-activate"))
    return "acme/canary"


def columns(table: str) -> list[list[str]]:
    """A table's lines as cells (columns are two or more spaces apart)."""
    return [re.split(r"\s{2,}", line) for line in table.splitlines()]


def test_rollout_split_show_promote_rollback(server, canary):
    acme = {"Authorization": "Bearer acme-k"}
    out = ok(mux(server, "acme", "rollout", "split", "canary", "1=90", "2=10"))
    assert out == "acme/canary: v1 90%, v2 10% (stable v1)\n"
    with httpx.Client() as http:
        for i in range(4):
            body = {"model": "canary", "prompt": "Hello", "max_tokens": 2, "user": f"u{i}"}
            assert http.post(f"{server}/v1/completions", json=body, headers=acme, timeout=60).status_code == 200
        state = http.get(f"{server}/v1/adapters/{canary}", headers=acme).json()
    table, fields = ok(mux(server, "acme", "rollout", "show", "canary")).split("\n\n")
    header, *rows = columns(table)
    assert header == ["VERSION", "WEIGHT", "SHA256", "RANK", "CREATED", "IN FLIGHT", *rollout.FIGURES]
    v1, v2 = state["versions"]
    assert [r[:4] for r in rows] == [
        ["1 (stable)", "90%", v1["sha256"][:12], "4"],
        ["2", "10%", v2["sha256"][:12], "8"],
    ]
    assert [r[6:8] for r in rows] == [[str(v["figures"]["requests"]), "0"] for v in (v1, v2)]
    assert v1["figures"]["requests"] + v2["figures"]["requests"] == 4 and rows[0][8].replace(".", "").isdigit()
    assert fields.splitlines()[:2] == ["stable       v1", "rollback to  v1"] and "guard" not in fields
    shown = json.loads(ok(mux(server, "acme", "rollout", "show", canary, "--json")))
    assert shown == {k: state[k] for k in ("id", "versions", "traffic")}  # what every rollout route answers

    guard = ["--guard-min-requests", "20", "--guard-max-error-rate", "0.1"]
    split = json.loads(ok(mux(server, "acme", "rollout", "split", "canary", "v1=50", "v2=50", *guard, "--json")))
    assert split["traffic"]["guard"] == {"max_error_rate": 0.1, "max_ttft_p99_ratio": 2.0, "min_requests": 20}
    shown = ok(mux(server, "acme", "rollout", "show", "canary"))
    assert "\nguard        all traffic back to v1 once a canary served 20 requests, if its error rate > 0.1 " in shown
    promoted = ok(mux(server, "acme", "rollout", "promote", "canary", "v2"))
    assert promoted == "acme/canary: v2 100% (stable v2)\n"
    assert ok(mux(server, "acme", "rollout", "rollback", "canary")) == "acme/canary: v1 100% (stable v1)\n"
    stats = ok(mux(server, "admin", "stats"))
    header, *rows = columns(stats[stats.index("ROLLOUT") :])
    assert header == ["ROLLOUT", "VERSION", "WEIGHT", *rollout.FIGURES]
    assert rows == [["acme/canary", "1 (stable)", "100%", "0", "0", "-", "-"]]  # figures count from the last change


def test_rollout_refusals(server, canary, capsys):
    before = ok(mux(server, "acme", "rollout", "show", canary, "--json"))
    refused(mux(server, "acme", "rollout", "split", "canary", "1=60", "2=30"), "400", "must sum to 100; they sum to 90")
    refused(mux(server, "acme", "rollout", "split", "canary", "1=50", "v1=50"), "version 1 is given twice")
    refused(mux(server, "acme", "rollout", "promote", canary, "7"), "400", "version 7 does not exist")
    refused(
        mux(server, "acme", "rollout", "split", canary, "1=100", "--guard-min-requests", "0"), "400", "min_requests"
    )
    for verb in (["show"], ["split", "1=100"], ["promote", "1"], ["rollback"]):  # not beta's: as if absent
        refused(mux(server, "beta", "rollout", verb[0], canary, *verb[1:]), "404", "`acme/canary` does not exist")
    refused(mux(server, "beta", "rollout", "show", "canary"), "no adapter named 'canary'")
    for argv, message in (
        (["split", "canary", "v1=abc"], "argument VERSION=PERCENT: 'v1=abc': give VERSION=PERCENT with an integer"),
        (["split", "canary", "1=9.5"], "'1=9.5': give VERSION=PERCENT"),
        (["promote", "canary", "two"], "argument version: 'two' is not a version: give N or vN"),
    ):  # argparse's refusals (status 2), before anything is sent
        with pytest.raises(SystemExit) as exit_:
            cli.main(["rollout", *argv, "--url", server])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert ok(mux(server, "acme", "rollout", "show", canary, "--json")) == before


def test_the_client_commands_are_in_mux_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("serve", "hash-key", "adapters", "rollout", "stats"))
