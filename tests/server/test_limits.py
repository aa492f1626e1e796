"""Per-tenant admission limits: in-flight count and tokens per minute, with a fake clock (no model)."""

from __future__ import annotations

import pytest

from mux.errors import InvalidRequest, Overloaded
from mux.server.limits import Limits, TenantLimit


class FakeStream:
    def __init__(self, prompt: int, generated: int) -> None:
        self.prompt_ids = [0] * prompt
        self.num_tokens = generated


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_in_flight_limit_per_tenant_and_release():
    limits = Limits(TenantLimit(max_concurrent=2), {"big": TenantLimit(max_concurrent=8)})
    key = limits.admit("acme", 2)
    streams = [FakeStream(3, 1), FakeStream(3, 1)]
    limits.track(key, streams, 2)
    with pytest.raises(Overloaded) as e:
        limits.admit("acme", 1)
    assert e.value.retry_after >= 1 and "acme" in str(e.value)
    limits.track(limits.admit("other", 2), [], 2)  # another tenant has its own count (released at once)
    limits.track(limits.admit("big", 8), [], 8)
    limits.finish(streams)
    limits.finish(streams)  # idempotent: a response ending twice releases once
    assert limits.in_flight("acme") == 0
    limits.admit("acme", 2)


def test_a_request_larger_than_the_limit_is_refused_not_retried():
    """n above max_concurrent can never be admitted: 400 (InvalidRequest), not a 429 the client retries forever."""
    limits = Limits(TenantLimit(max_concurrent=4))
    with pytest.raises(InvalidRequest, match="asks for 5 generations; tenant `acme` may have 4 in flight"):
        limits.admit("acme", 5)
    assert limits.in_flight("acme") == 0
    limits.admit("acme", 4)


def test_half_submitted_batch_releases_what_never_ran():
    limits = Limits(TenantLimit(max_concurrent=4))
    key = limits.admit(None, 4)
    limits.track(key, [FakeStream(1, 0)], 4)  # the 2nd prompt failed: 3 places come back now
    assert limits.in_flight(None) == 1 and limits.in_flight("default") == 1


def test_tokens_per_minute_window_slides():
    clock = Clock()
    limits = Limits(TenantLimit(tokens_per_minute=100), clock=clock)
    s = FakeStream(60, 50)
    limits.track(limits.admit("a", 1), [s], 1)
    limits.finish([s])  # 110 tokens used
    with pytest.raises(Overloaded) as e:
        limits.admit("a", 1)
    assert 1 <= e.value.retry_after <= 60
    clock.now += 61
    limits.admit("a", 1)  # the window moved past the old usage
