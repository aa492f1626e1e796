"""mux/model/cpu.py: prepacked linears compute nn.Linear's output, a few rows through the C kernel and more through
oneDNN, whatever the shapes (a tail past the vectors, an output count off the kernel's blocks, a bias)."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from mux import native
from mux.model.cpu import FEW_ROWS, PackedLinear, can_pack, file_mapped, pack_linears, plain_weights_are_free

pytestmark = pytest.mark.skipif(
    not can_pack(nn.Linear(2, 2)) or (shutil.which("cc") is None and shutil.which("gcc") is None),
    reason="no oneDNN or no C compiler",
)


def kernel():
    return native.library().mux_small_linear


@pytest.mark.parametrize(("features", "bias"), [((576, 192), False), ((37, 50), True), ((16, 7), False)])
def test_packed_linears_equal_nn_linear_at_every_row_count(features, bias):
    torch.manual_seed(0)
    linear = nn.Linear(*features, bias=bias)
    fast, packed = PackedLinear(linear, kernel()), PackedLinear(linear)
    assert fast.few_rows is not None and packed.few_rows is None
    for rows in range(1, FEW_ROWS + 3):  # the C kernel's rows, then oneDNN's
        x = torch.randn(rows, features[0])
        want = linear(x)
        for got in (fast(x), packed(x)):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), rows
    x = torch.randn(1, 3, features[0])  # [B, T, in]: T rows
    assert torch.allclose(fast(x), linear(x), rtol=1e-5, atol=1e-5)
    assert fast(torch.randn(0, features[0])).shape == (0, features[1])  # no rows: oneDNN's (the kernel needs one)


def test_a_non_contiguous_input_takes_onednn():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    calls = []
    fast = PackedLinear(linear, lambda *a: calls.append(a))  # records instead of computing
    x = torch.randn(64, 2).T  # 2 rows, strided
    assert torch.allclose(fast(x), linear(x), rtol=1e-5, atol=1e-5) and not calls
    fast(x.contiguous())
    assert len(calls) == 1


def test_an_input_of_the_wrong_width_is_refused_as_onednn_refuses_it():
    """The C kernel trusts its shapes: a wrong width must never reach it (it would read past the input)."""
    linear = nn.Linear(64, 32)
    fast, packed = PackedLinear(linear, kernel()), PackedLinear(linear)
    for module in (fast, packed):
        with pytest.raises(RuntimeError):
            module(torch.randn(1, 80))  # 80 // 64 = one row: without the check the kernel would take it


def test_pack_linears_keeps_the_model_s_own_weights_for_the_few_rows_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 8, bias=False))
    want = model(torch.randn(2, 24, generator=torch.Generator().manual_seed(1)))
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    assert pack_linears(model, kernel()) == 2
    packed = [m for m in model if isinstance(m, PackedLinear)]
    assert all(p.weight.data_ptr() == w.data_ptr() for p, w in zip(packed, weights, strict=True))  # no copy
    got = model(torch.randn(2, 24, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_file_mapped_tells_weights_read_from_a_file_from_weights_of_their_own(tmp_path):
    from safetensors.torch import load_file, save_file

    save_file({"w": torch.randn(64, 32)}, tmp_path / "a.safetensors")
    assert file_mapped([load_file(tmp_path / "a.safetensors")["w"]])  # safetensors maps the file
    assert not file_mapped([torch.randn(64, 32)])
    assert not file_mapped([])


def test_the_engine_takes_the_few_rows_kernel_where_it_costs_no_memory(tiny_dir):
    """The tiny test model is fp32 safetensors, so the engine's PEFT equivalence tests run through the kernel; a
    model whose weights are its own (converted, or built in memory) keeps oneDNN alone unless told."""
    from tests.conftest import make_engine

    engine = make_engine(tiny_dir)
    packed = [m for m in engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.few_rows is not None for m in packed)
    model = nn.Sequential(nn.Linear(8, 8))
    assert not plain_weights_are_free(model)
