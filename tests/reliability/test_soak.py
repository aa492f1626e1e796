"""A CI-sized soak (bench/soak.py, about a minute): completions, streams, dropped streams, re-uploads of the
same names, bad uploads and requests, and evictions across more adapters than slots on a real server. Zero
5xx, every greedy answer equal to its reference, the server idle at the end, resident memory flat."""

from __future__ import annotations

from bench.common import prompts
from bench.soak import Soak, rss_mb, setup_repository
from conftest import start_server


def test_soak(tmp_path, tiny_dir):
    ids, sources = setup_repository(tmp_path / "repo", tiny_dir, n_adapters=10)
    proc, base = start_server(tiny_dir, tmp_path / "repo", "--max-loras", "3", "--max-cpu-adapter-bytes", "150000")
    try:
        soak = Soak(base, ids, sources, prompts(4, words=10))
        soak.references()
        report = soak.run(40, proc.pid)
        soak.wait_idle()
        report.rss_end_mb = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not report.unexpected, report.unexpected[:5]  # no 5xx, every fault got its 4xx
    assert not report.mismatches, report.mismatches[:3]
    assert report.idle_at_end["idle"], report.idle_at_end  # no running sequence, KV all free, no pin left
    assert report.sent["completion"] and report.sent["stream"] and report.sent["upload"]
    assert report.faults["client disconnects mid-stream"] and report.faults["admin evictions"]
    assert report.idle_at_end["finished"].get("cancelled", 0) > 0
    assert report.rss_end_mb - report.rss_start_mb < 48, report.rss_mb  # flat after warm-up (noise: a few MB)
