"""Traffic splits: the weighted, sticky choice of a version, the state changes, and refusals of bad input."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from mux.errors import Conflict, InvalidRequest
from mux.lora.repository import AdapterRepository
from mux.lora.splits import Guard, Split, parse_guard, parse_weights

FILES = ("adapter_config.json", "adapter_model.safetensors")


def test_sessions_split_by_weight_and_keep_their_version():
    split = Split.single(1).with_weights({1: 90, 2: 10}, None)
    picks = {f"user-{i}": split.choose("t/a", f"user-{i}") for i in range(5000)}
    assert abs(Counter(picks.values())[2] / 5000 - 0.10) < 0.015
    assert all(split.choose("t/a", user) == version for user, version in picks.items())
    unkeyed = Counter(split.choose("t/a", None) for _ in range(5000))
    assert abs(unkeyed[2] / 5000 - 0.10) < 0.03


def test_raising_a_canary_only_moves_callers_onto_it():
    small = Split.single(1).with_weights({1: 95, 2: 5}, None)
    large = small.with_weights({1: 60, 2: 40}, None)
    for i in range(3000):
        if small.choose("t/a", str(i)) == 2:
            assert large.choose("t/a", str(i)) == 2


def test_zero_weights_get_nothing_and_adapters_hash_apart():
    split = Split.single(1).with_weights({1: 0, 2: 100}, None)
    assert {split.choose("t/a", str(i)) for i in range(200)} == {2}
    half = Split.single(1).with_weights({1: 50, 2: 50}, None)
    assert [half.choose("t/a", str(i)) for i in range(64)] != [half.choose("t/b", str(i)) for i in range(64)]


def test_promote_rollback_and_guard_transitions():
    split = Split.single(1).with_weights({1: 90, 2: 10}, Guard())
    assert (split.stable, split.rollback_to, split.canaries) == (1, 1, [2])
    assert split.rolled_back().weights == {1: 100}
    promoted = split.promoted(2)
    assert (promoted.weights, promoted.stable, promoted.rollback_to, promoted.guard) == ({2: 100}, 2, 1, None)
    back = promoted.rolled_back()
    assert (back.weights, back.stable) == ({1: 100}, 1) and back.rolled_back().weights == {1: 100}
    guarded = split.rolled_back("guard: too many errors")
    assert guarded.weights == {1: 100} and guarded.rollback_reason == "guard: too many errors"
    assert [h["action"] for h in guarded.history] == ["split", "guard"] and guarded.newest == 2
    assert Split.from_json(json.loads(json.dumps(promoted.to_json()))) == promoted


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        ({"1": 50, "2": 40}, "sum to 100"),
        ({"1": -1, "2": 101}, "integer percent"),
        ({"1": True, "2": 99}, "integer percent"),
        ({"1": 50.0, "2": 50}, "integer percent"),
        ({"3": 100}, "does not exist"),
        ({"01": 50, "1": 50}, "named twice"),
        ({"-1": 100}, "version numbers"),
        ({}, "non-empty"),
        ([1, 2], "non-empty"),
    ],
)
def test_bad_weights_are_refused(weights, reason):
    with pytest.raises(InvalidRequest, match=reason):
        parse_weights(weights, {1, 2})


@pytest.mark.parametrize(
    "guard",
    [
        {"max_error_rate": -0.1},
        {"max_error_rate": float("nan")},
        {"max_ttft_p99_ratio": 0.5},
        {"max_ttft_p99_ratio": 10**400},
        {"min_requests": 1.5},
        {"min_requests": 0},
        {"min_requests": True},
        {"extra": 1},
        "strict",
    ],
)
def test_bad_guards_are_refused(guard):
    with pytest.raises(InvalidRequest):
        parse_guard(guard)


def test_a_guard_takes_defaults_for_what_it_leaves_out():
    assert parse_guard({"min_requests": 5}) == Guard(min_requests=5)
    assert parse_guard(None) is None


def _stage(repo: AdapterRepository, src):
    staged = repo.staging_dir()
    for f in FILES:
        shutil.copy(src / f, staged / f)
    return staged


def test_recover_keeps_inactive_uploads_and_every_version_a_split_served(tmp_path, tiny_adapters):
    root = tmp_path / "repo"
    repo = AdapterRepository(root)
    src = tiny_adapters["r4-attn"]
    repo.install("t", "a", _stage(repo, src), {})
    repo.install("t", "a", _stage(repo, src), {})  # v2 takes all traffic
    repo.install("t", "a", _stage(repo, src), {}, activate=False)  # v3 stored only
    repo.update_split("t/a", lambda s, v: s.promoted(1))  # back to v1: v2 is older news, not unpublished
    (root / "t" / "a" / ".traffic.json-dead").write_text("{half")
    shutil.copytree(root / "t" / "a" / "v2", root / "t" / "a" / "v4")  # moved in, then the crash
    json_meta = json.loads((root / "t" / "a" / "v4" / "meta.json").read_text())
    (root / "t" / "a" / "v4" / "meta.json").write_text(json.dumps({**json_meta, "version": 4}))
    (root / "t" / "a" / "current").unlink()
    (root / "t" / "a" / "current").symlink_to("v2")  # the split said v1, `current` was not re-pointed yet
    removed = AdapterRepository(root).recover()
    assert sorted(p.rsplit("/", 1)[1] for p in removed) == [".staging", ".traffic.json-dead", "v4"]
    assert sorted(AdapterRepository(root).versions("t/a")) == [1, 2, 3]
    assert (root / "t" / "a" / "current").readlink().name == "v1"
    assert AdapterRepository(root).path("t/a") == root / "t" / "a" / "v1"


def test_versions_in_a_split_cannot_be_deleted(tmp_path, tiny_adapters):
    repo = AdapterRepository(tmp_path / "repo")
    for activate in (True, False, False):
        repo.install("t", "a", _stage(repo, tiny_adapters["r4-attn"]), {}, activate=activate)
    repo.update_split("t/a", lambda s, v: s.with_weights({1: 50, 2: 50}, None))
    for version in (1, 2):
        with pytest.raises(Conflict):
            repo.delete_version("t/a", version)
    repo.delete_version("t/a", 3)
    assert sorted(repo.versions("t/a")) == [1, 2]
    with pytest.raises(InvalidRequest):
        repo.install("t", "new", _stage(repo, tiny_adapters["r4-attn"]), {}, activate=False)
    assert not (tmp_path / "repo" / "t" / "new").exists()
