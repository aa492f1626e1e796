"""mux/model/cpu.py: packed linears compute nn.Linear's output, on the C kernel (weights in panels) or on oneDNN,
whatever the shapes (an output count off the panels, a width off the vectors, a bias, any row count)."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from mux import native
from mux.model.cpu import PackedLinear, can_pack, pack_linears, pack_panels

pytestmark = pytest.mark.skipif(
    not can_pack(nn.Linear(2, 2)) or (shutil.which("cc") is None and shutil.which("gcc") is None),
    reason="no oneDNN or no C compiler",
)


def kernel():
    return native.library().mux_linear


@pytest.mark.parametrize(("features", "bias"), [((576, 192), False), ((37, 50), True), ((16, 7), False)])
def test_packed_linears_equal_nn_linear_at_every_row_count(features, bias):
    torch.manual_seed(0)
    linear = nn.Linear(*features, bias=bias)
    fast, packed = PackedLinear(linear, kernel()), PackedLinear(linear)
    assert fast.panels is not None and packed.panels is None
    for rows in (*range(1, 10), 15, 16, 17, 63, 64, 65, 130):  # passes of 6 or 8 rows, work items of 64
        x = torch.randn(rows, features[0])
        want = linear(x)
        for got in (fast(x), packed(x)):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), rows
    x = torch.randn(2, 3, features[0])  # [B, T, in]: 6 rows
    assert torch.allclose(fast(x), linear(x), rtol=1e-5, atol=1e-5)
    assert fast(torch.randn(0, features[0])).shape == (0, features[1])  # no rows: nothing to call


def test_a_row_s_output_does_not_depend_on_the_other_rows():
    """Each output is one in-order sum on one thread: the same row gives the same bits alone or in any batch."""
    torch.manual_seed(0)
    fast = PackedLinear(nn.Linear(300, 100), kernel())
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
    fast = PackedLinear(linear, kernel())
    x = torch.randn(64, 2).T  # 2 rows, strided
    assert torch.allclose(fast(x), linear(x), rtol=1e-5, atol=1e-5)


def test_an_input_of_the_wrong_width_is_refused_as_onednn_refuses_it():
    """The C kernel trusts its shapes: a wrong width must never reach it (it would read past the input)."""
    linear = nn.Linear(64, 32)
    fast, packed = PackedLinear(linear, kernel()), PackedLinear(linear)
    for module in (fast, packed):
        with pytest.raises(RuntimeError):
            module(torch.randn(1, 80))  # 80 // 64 = one row: without the check the kernel would take it


def test_pack_linears_replaces_every_linear_and_keeps_the_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 8, bias=False))
    want = model(torch.randn(2, 24, generator=torch.Generator().manual_seed(1)))
    assert pack_linears(model, kernel()) == 2
    assert sum(isinstance(m, PackedLinear) for m in model) == 2
    got = model(torch.randn(2, 24, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_engine_packs_its_linears_for_the_c_kernel_unless_told(tiny_dir):
    from tests.conftest import make_engine

    engine = make_engine(tiny_dir)
    packed = [m for m in engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.kernel is not None for m in packed)
    engine = make_engine(tiny_dir, model={"native_linears": False})
    packed = [m for m in engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.kernel is None for m in packed)
