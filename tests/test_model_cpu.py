"""mux/model/cpu.py: packed linears compute nn.Linear's output on every kernel a pick can choose (the C kernel over
fp32, bf16, int8 or int4 panels, oneDNN fp32 or bf16, torch's int8 and int4), whatever the shapes (an output count
off the panels, a width off the vectors, a bias, any row count); bf16 kernels over the bf16-rounded weights, int8 and
int4 ones over the dequantized weights (mux/model/quant.py)."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from mux.model import cpu, quant
from mux.model.cpu import PackedLinear, available_kernels, can_pack, pack_linears, pack_panels
from mux.runtime.picks import ROW_BUCKETS

pytestmark = pytest.mark.skipif(
    not can_pack(nn.Linear(2, 2)) or (shutil.which("cc") is None and shutil.which("gcc") is None),
    reason="no oneDNN or no C compiler",
)


KERNELS = available_kernels()


def rounded(linear: nn.Linear, kernel: str) -> nn.Linear:
    """The linear with its weight rounded to the kernel's weight format (the reference the kernel computes): bf16,
    or quantized (int4 in groups of 64, or of the whole width where 64 does not divide it), then dequantized."""
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    out.load_state_dict(linear.state_dict())
    fmt = cpu.KERNELS[kernel]
    if fmt in ("int8", "int4"):
        out.mux_quantized = quant.quantize(out.weight, fmt, 64 if out.in_features % 64 == 0 else out.in_features)
        out.weight.data = out.mux_quantized.dequantize()
    elif fmt == "bfloat16":
        out.weight.data = out.weight.data.to(torch.bfloat16).float()
    return out


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    ("features", "bias"), [((576, 192), False), ((37, 50), True), ((16, 7), False), ((64, 600), True)]
)
def test_packed_linears_equal_nn_linear_at_every_row_count(features, bias, kernel):
    """fp32 kernels within 1e-5 of nn.Linear; the C kernel over bf16 panels within 1e-5 of nn.Linear over the
    rounded weights (it sums in fp32); oneDNN's bf16 GEMM also rounds the input, to a bf16 tolerance."""
    if kernel == "torch_int4" and features[1] % 16:
        pytest.skip("torch's int4 kernel takes output features in multiples of 16 (the picks' self-check skips it)")
    torch.manual_seed(0)
    reference = rounded(nn.Linear(*features, bias=bias), kernel)
    packed = PackedLinear(reference, kernel)
    assert list(packed.layouts) == [kernel] and packed.weight_format == cpu.KERNELS[kernel]
    tol = 2e-2 if kernel == "onednn_bf16" else 1e-5
    for rows in (*range(1, 10), 15, 16, 17, 63, 64, 65, 130):  # passes of 6 or 8 rows, work items of 64
        x = torch.randn(rows, features[0])
        want = reference(x)
        assert torch.allclose(packed(x), want, rtol=tol, atol=tol * want.abs().max().item()), rows
        if kernel in cpu.C_FORMATS:  # a row's result does not depend on the call's other rows
            assert torch.equal(packed(x[:1]), packed(x)[:1]), rows
    x = torch.randn(2, 3, features[0])  # [B, T, in]: 6 rows
    assert packed(x).shape == (2, 3, features[1])
    assert torch.allclose(packed(x), reference(x), rtol=tol, atol=tol * 10)
    assert packed(torch.randn(0, features[0])).shape == (0, features[1])  # no rows: nothing to call


def test_each_row_bucket_is_served_by_its_pick_and_only_picked_layouts_are_kept():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    table = {b: ("c_bf16" if b <= 8 else "onednn_bf16") for b in ROW_BUCKETS}
    packed = PackedLinear(linear, table)
    assert sorted(packed.layouts) == ["c_bf16", "onednn_bf16"]
    assert [packed.kernel_for(r) for r in (1, 8, 9, 256, 4096)] == ["c_bf16"] * 2 + ["onednn_bf16"] * 3
    assert packed.c_kernel(8) is not None and packed.c_kernel(9) is None
    assert packed.weight_bytes == 2 * 64 * 48 * 2  # two bf16 layouts: the bytes of one fp32 copy
    reference = rounded(linear, "c_bf16")
    for rows in (1, 8, 9, 300):
        x = torch.randn(rows, 64)
        assert torch.allclose(packed(x), reference(x), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="unknown linear kernels"):
        PackedLinear(linear, "nope")


def test_a_row_s_output_does_not_depend_on_the_other_rows():
    """Each output is one in-order sum on one thread: the same row gives the same bits alone or in any batch."""
    torch.manual_seed(0)
    fast = PackedLinear(nn.Linear(300, 100), "c")
    batch = torch.randn(70, 300)
    alone = torch.cat([fast(batch[i : i + 1]) for i in range(70)])
    assert torch.equal(fast(batch), alone)
    assert torch.equal(fast(batch[5:12]), alone[5:12])


def test_panels_hold_sixteen_output_features_each_padded_with_zeros():
    weight = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)  # [out, in]
    panels = pack_panels(weight)
    assert panels.shape == (2, 3, 16)
    assert torch.equal(panels[0], weight[:16].T) and torch.equal(panels[1, :, :4], weight[16:].T)
    assert not panels[1, :, 4:].any()


def test_a_non_contiguous_input_is_made_contiguous_for_the_kernel():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    for kernel in ("c", "c_bf16"):
        fast = PackedLinear(linear, kernel)
        x = torch.randn(64, 2).T  # 2 rows, strided
        assert torch.allclose(fast(x), rounded(linear, kernel)(x), rtol=1e-5, atol=1e-5)


def test_an_input_of_the_wrong_width_is_refused_as_onednn_refuses_it():
    """The C kernel trusts its shapes: a wrong width must never reach it (it would read past the input)."""
    linear = nn.Linear(64, 32)
    for module in (PackedLinear(rounded(linear, k), k) for k in KERNELS):
        with pytest.raises(RuntimeError):
            module(torch.randn(1, 80))  # 80 // 64 = one row: without the check the kernel would take it


def test_pack_linears_replaces_every_linear_and_keeps_the_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 8, bias=False))
    want = model(torch.randn(2, 24, generator=torch.Generator().manual_seed(1)))
    assert pack_linears(model, lambda linear: "c") == 2
    assert sum(isinstance(m, PackedLinear) for m in model) == 2
    got = model(torch.randn(2, 24, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_engine_packs_its_linears_on_the_picked_kernels(tiny_dir):
    from mux.runtime import picks
    from tests.conftest import make_engine

    engine = make_engine(tiny_dir)
    packed = [m for m in engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.picks == engine.linear_plan.for_linear(m) for m in packed)
    assert all(m.weight_format == "float32" for m in packed)  # the tests' engines keep fp32 (conftest)
    report = engine.stats()["cpu_kernels"]  # what /admin/stats shows
    assert report["weight_dtype"] == "float32" and report["linears"]
    with picks.force("linear", "onednn"):
        engine = make_engine(tiny_dir)
    packed = [m for m in engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(list(m.layouts) == ["onednn"] for m in packed)
