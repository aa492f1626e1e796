"""The GPU check script runs on any device: keep its checks working where CI can run them (the CPU)."""

import dataclasses

from bench.gpu_check import check_engine, check_ops, processed_sampling_equal
from mux.engine.sequence import PromptLogprob
from mux.engine.stream import Completion


def test_gpu_check_ops_pass_on_cpu():
    results = check_ops("cpu")
    layouts = ("blocks", "gathered", "per_token")
    assert set(results) == {f"{layout}_{dtype}" for layout in layouts for dtype in ("float32", "float16")}
    assert all(r["ok"] for r in results.values()), results


def test_gpu_check_ops_check_both_triton_lora_paths(monkeypatch):
    """Where the kernels serve, the per-token case is checked through the engine's pick and through each of the
    two Triton paths (here in Triton's interpreter, one config each: the timing that picks needs a GPU)."""
    import pytest
    import torch

    from mux import triton_ops

    if triton_ops.triton is None or torch.cuda.is_available():
        pytest.skip("needs triton, and no CUDA (there gpu_check itself runs this)")
    monkeypatch.setattr(triton_ops, "serves", lambda device: True)
    monkeypatch.setattr("bench.gpu_check.check_paged_attention", lambda device: {})  # tested in test_triton_ops
    with triton_ops._untuned():
        results = check_ops("cpu", features=(40, 24))  # small: the interpreter runs each program in Python
    for name in ("per_token", "per_token_two_kernels", "per_token_one_kernel"):
        for dtype in ("float32", "float16"):
            assert results[f"{name}_{dtype}"]["ok"], (name, dtype, results)


def test_gpu_check_engine_part_runs_on_cpu(tmp_path, smollm2_dir):
    results = check_engine("cpu", smollm2_dir, tmp_path)
    half = results.pop("half_precision")
    assert set(half) == {"float16", "bfloat16"}
    assert all(0 <= v <= 1 for h in half.values() for v in h.values())
    assert results == {
        "tokens_equal_peft": True,
        "processed_equal_cpu": True,
        "prefix_cache": {"hit_tokens": 4 * 32, "tokens_equal_peft": True},  # each prompt's 2 blocks, the 2nd time
        "pinned_host_copies": None,
        "copy_stream": None,
        "decode_graphs": 0,
    }


def test_processed_sampling_equal_detects_each_difference():
    base = Completion(
        "r",
        [1, 2],
        None,
        token_ids=[3, 4],
        logprobs=[-0.5, -1.0],
        top=[((3, -0.5), (8, -2.0)), None],
        prompt_logprobs=[None, PromptLogprob(-3.0, 4, ((9, -1.0),))],
    )
    assert processed_sampling_equal([base], [dataclasses.replace(base, logprobs=[-0.5004, -1.0])])
    variants = [
        dict(token_ids=[3, 5]),
        dict(logprobs=[-0.5, -1.1]),
        dict(top=[((8, -2.0), (3, -0.5)), None]),
        dict(top=[((3, -0.5), (8, -2.5)), None]),
        dict(top=[None, None]),
        dict(prompt_logprobs=None),
        dict(prompt_logprobs=[None, PromptLogprob(-3.0, 5, ((9, -1.0),))]),
        dict(prompt_logprobs=[None, PromptLogprob(-3.0, 4, ((10, -1.0),))]),
        dict(prompt_logprobs=[None, PromptLogprob(-3.5, 4, ((9, -1.0),))]),
    ]
    for change in variants:
        assert not processed_sampling_equal([base], [dataclasses.replace(base, **change)]), change


def test_step_breakdown_times_prefill_and_decode_apart_and_unpatches(tiny_dir):
    from bench.gpu_profile import step_breakdown
    from conftest import make_engine
    from mux.engine.sequence import SamplingParams

    engine = make_engine(tiny_dir)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    phases = step_breakdown(engine, [[5, 6, 7], [8, 9, 10]], params, [None, None])
    assert phases["prefill"]["steps"] >= 1 and phases["decode"]["steps"] == 3
    assert all(v >= 0 for row in phases.values() for v in row.values())
    assert "run" not in vars(engine.runner) and "_postprocess" not in vars(engine)  # the methods are back
    assert "_push_pending" not in vars(engine) and "push_pending_ms" in phases["decode"]
    assert len(engine.generate([[5, 6]], params)[0].token_ids) == 4
