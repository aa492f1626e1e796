"""The GPU check script's kernel check runs on any device: keep it working where CI can run it (the CPU)."""

from bench.gpu_check import check_ops


def test_gpu_check_ops_pass_on_cpu():
    results = check_ops("cpu")
    assert set(results) == {"wave_float32", "gathered_float32", "wave_float16", "gathered_float16"}
    assert all(r["ok"] for r in results.values()), results
