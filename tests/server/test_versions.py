"""The rollout guard over per-version figures: error rate, TTFT p99 against the stable version, the window."""

from __future__ import annotations

import shutil

import pytest

from mux.lora.repository import AdapterRepository
from mux.lora.splits import Guard
from mux.server.versions import VersionFigures

FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture
def repo(tmp_path, tiny_adapters):
    repository = AdapterRepository(tmp_path / "repo")
    for activate in (True, False):
        staged = repository.staging_dir()
        for f in FILES:
            shutil.copy(tiny_adapters["r4-attn"] / f, staged / f)
        repository.install("t", "a", staged, {}, activate=activate)
    return repository


def split_with(repo, guard: Guard) -> None:
    repo.update_split("t/a", lambda s, v: s.with_weights({1: 90, 2: 10}, guard))


def test_a_slow_canary_is_rolled_back_against_the_stable_versions_ttft(repo):
    split_with(repo, Guard(max_error_rate=1.0, max_ttft_p99_ratio=2.0, min_requests=20))
    figures = VersionFigures(repo)
    for _ in range(50):
        figures.record("t/a", 1, True, 0.10, 1.0)
    for i in range(19):
        figures.record("t/a", 2, True, 0.25, 1.0)
        assert repo.split("t/a").weights == {1: 90, 2: 10}, i  # not before min_requests
    figures.record("t/a", 2, True, 0.25, 1.0)
    split = repo.split("t/a")
    assert split.weights == {1: 100} and "TTFT p99 250.0 ms > 2 x version 1's 100.0 ms" in split.rollback_reason


def test_a_canary_within_its_limits_stays_and_a_new_split_starts_a_new_window(repo):
    split_with(repo, Guard(max_error_rate=0.2, max_ttft_p99_ratio=3.0, min_requests=10))
    figures = VersionFigures(repo)
    for i in range(40):
        figures.record("t/a", 1, True, 0.10, 1.0)
        figures.record("t/a", 2, i % 10 != 0, 0.2, 1.0)  # 10% errors, 2x the TTFT: within the limits
    assert repo.split("t/a").weights == {1: 90, 2: 10}
    report = figures.report("t/a", repo.split("t/a"))
    assert report["2"]["requests"] == 40 and report["2"]["errors"] == 4 and report["2"]["error_rate"] == 0.1
    split_with(repo, None)  # changed: the figures start again
    assert figures.report("t/a", repo.split("t/a"))["2"]["requests"] == 0


def test_errors_past_the_limit_roll_back(repo):
    figures = VersionFigures(repo)
    figures.record("t/a", 1, False, None, None)  # no split: nothing kept, nothing changed
    assert repo.traffic("t/a") is None
    split_with(repo, Guard(min_requests=5))
    for _ in range(5):
        figures.record("t/a", 2, False, None, None)
    split = repo.split("t/a")
    assert split.weights == {1: 100} and "failed 5 of 5 requests" in split.rollback_reason
    assert split.history[-1]["action"] == "guard"
