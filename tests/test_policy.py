"""The policy file: defaults, overrides, and clear errors for bad files."""

from __future__ import annotations

import pytest

from mux.errors import MuxError
from mux.policy import DEFAULT_POLICY, load_policy


def test_default_policy_file_loads():
    p = load_policy()
    assert DEFAULT_POLICY.is_file()
    assert p.lora.eviction_policy == "lru" and p.lora.max_loras == 16 and p.pinned == ()
    assert p.lora.max_lora_rank == 64 and p.lora.max_lora_bytes is None  # the pool: derived from the model


def test_values_and_overrides(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text(
        '[eviction]\npolicy = "cost"\n[tiers]\nmax_loras = 4\nmax_lora_bytes = 9000\nmax_cpu_adapter_bytes = 1000\n'
        '[scheduler]\nmax_num_seqs = 8\n[pinned]\nadapters = ["acme/a"]\n'
    )
    p = load_policy(f, max_loras=None, max_cpu_adapter_bytes=5000, max_lora_bytes=7000)
    assert (p.lora.eviction_policy, p.lora.max_loras, p.lora.max_cpu_adapter_bytes) == ("cost", 4, 5000)
    assert p.lora.max_lora_bytes == 7000
    assert p.scheduler.max_num_seqs == 8 and p.pinned == ("acme/a",)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[eviction]\npolicy = "fifo"\n', "unknown eviction policy"),
        ("[tiers]\nmax_slots = 3\n", "max_slots"),
        ("[tiers]\nmax_loras = 0\n", "max_loras"),
        ("[tiers]\nmax_lora_bytes = 0\n", "max_lora_bytes must be ≥ 1"),
        ("[tiers]\nmax_lora_rank = 5000\n", "max_lora_rank must be ≤ 4096"),
        ('[admin]\nkeys = ["plain-secret"]\n', "hashed"),
        ('[tenants."a b"]\nkeys = []\n', "tenants"),
        ("not toml [", "policy file"),
        ('[pinned]\nadapters = "x"\n', "list"),
        ("[limits]\nmax_concurrent = 0\n", "positive integer"),
        ("[limits]\nrequests_per_day = 5\n", "requests_per_day"),
        ("[scheduler]\nrequest_timeout_s = 0\n", "request_timeout_s"),
    ],
)
def test_bad_policy_files_are_refused(tmp_path, text, match):
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(MuxError, match=match):
        load_policy(f)


def test_a_bad_override_is_named_as_one():
    """A CLI flag's bad value is not blamed on the policy file alone."""
    with pytest.raises(MuxError, match=r"with overrides max_lora_rank: max_lora_rank must be ≤ 4096, got 5000"):
        load_policy(None, max_loras=None, max_lora_rank=5000)


def test_tenant_limits_inherit_the_default(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text(
        "[limits]\nmax_concurrent = 4\ntokens_per_minute = 1000\n"
        "[tenants.acme]\nkeys = []\nmax_concurrent = 16\n[tenants.small]\nkeys = []\n"
        "[scheduler]\nrequest_timeout_s = 30\n"
    )
    p = load_policy(f)
    assert (p.limits.max_concurrent, p.limits.tokens_per_minute) == (4, 1000)
    assert (p.tenant_limits["acme"].max_concurrent, p.tenant_limits["acme"].tokens_per_minute) == (16, 1000)
    assert p.tenant_limits["small"] == p.limits and p.scheduler.request_timeout_s == 30


def test_missing_file(tmp_path):
    with pytest.raises(MuxError, match="does not exist"):
        load_policy(tmp_path / "nope.toml")


def test_stream_interval_from_the_file_and_the_flag(tmp_path):
    assert load_policy().stream_interval == 1
    f = tmp_path / "p.toml"
    f.write_text("[streaming]\ninterval = 4\n")
    assert load_policy(f).stream_interval == 4
    assert load_policy(f, stream_interval=None).stream_interval == 4
    assert load_policy(f, stream_interval=2).stream_interval == 2


@pytest.mark.parametrize("value", ["0", "1025", "2.5", '"4"', "true"])
def test_bad_stream_interval_is_refused(tmp_path, value):
    f = tmp_path / "p.toml"
    f.write_text(f"[streaming]\ninterval = {value}\n")
    with pytest.raises(MuxError, match="stream interval"):
        load_policy(f)
    with pytest.raises(MuxError, match="stream interval"):
        load_policy(None, stream_interval=0)  # the flag is checked as the file is


def test_unknown_streaming_key_is_refused(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("[streaming]\nstream_tokens = 2\n")
    with pytest.raises(MuxError, match="stream_tokens"):
        load_policy(f)
