"""Per-adapter metric labels stay bounded: past MAX_ADAPTER_LABELS adapters, the rest share "_other"."""

from __future__ import annotations

from mux.server import metrics
from mux.server.metrics import OTHER, Metrics


def test_adapter_labels_are_bounded(monkeypatch):
    monkeypatch.setattr(metrics, "MAX_ADAPTER_LABELS", 3)
    m = Metrics(state=None)
    assert [m.label(f"t/a{i}") for i in range(5)] == ["t/a0", "t/a1", "t/a2", OTHER, OTHER]
    assert m.label("t/a1") == "t/a1"  # a name seen early keeps its own series
