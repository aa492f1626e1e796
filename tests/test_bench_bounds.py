"""The analytic bound the adapter-scaling benchmark reports next to its measured batch sizes."""

from bench.adapter_scaling import pinned_batch_bound


def test_pinned_batch_bound():
    assert pinned_batch_bound(8, "zipf", 16) is None  # every adapter fits in the slots
    assert pinned_batch_bound(1000, "uniform", 16) == 16  # uniform draws almost never repeat an adapter
    zipf = [pinned_batch_bound(p, "zipf", 16) for p in (32, 128, 512, 1000)]
    assert zipf == sorted(zipf, reverse=True) and zipf[-1] == 19  # hot adapters share slots; fewer as the tail grows


def test_a_rerun_of_the_day_never_overwrites_results(tmp_path, monkeypatch):
    import json

    from bench import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    first = common.save("x", {"run": 1}, "one")
    second = common.save("x", {"run": 2}, "two")
    assert first != second and second.stem == f"{first.stem}-2"
    assert json.loads(first.read_text()) == {"run": 1} and first.with_suffix(".md").read_text() == "one\n"
    assert common.new_stem("x") == f"{first.stem}-3"
