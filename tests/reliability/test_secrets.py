"""No secret reaches the logs: a server at debug log level sees good, wrong and malformed keys, and its whole
output holds none of them (keys are only ever hashed)."""

from __future__ import annotations

import httpx

from conftest import server_output, start_server, write_policy


def test_keys_never_appear_in_the_server_output(tmp_path, tiny_dir):
    admin, tenant, wrong = "admin-SECRET-1f2e", "tenant-SECRET-9a8b", "wrong-SECRET-7c6d"
    policy = tmp_path / "policy.toml"
    write_policy(policy, {"admin": admin, "acme": tenant})
    (tmp_path / "repo").mkdir()
    proc, base = start_server(tiny_dir, tmp_path / "repo", "--policy", str(policy), "--log-level", "debug")
    try:
        body = {"prompt": "hi", "max_tokens": 2}
        for key in (admin, tenant, wrong, f"{wrong}-extra", "x"):
            headers = {"Authorization": f"Bearer {key}"}
            httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=30)
            httpx.get(f"{base}/admin/stats", headers=headers, timeout=30)
        assert httpx.get(f"{base}/admin/stats", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        output = server_output(proc)
    assert "SECRET" not in output
    assert "POST /v1/completions" in output  # the access log was on: the test looked at real log lines
