"""The weights reader (mux/lora/adapter.py parses safetensors itself, for speed) against safetensors' own parse."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import copy_adapter, make_engine
from mux.errors import InvalidAdapter
from mux.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, load_adapter


@pytest.fixture(scope="module")
def shapes(tiny_dir):
    return make_engine(tiny_dir, max_loras=1).lora.shapes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["r8-all-rslora", "r16-attn-rslora", "r4-all"])
def test_weights_equal_safetensors_parse(tmp_path, tiny_adapters, shapes, name, dtype):
    path = copy_adapter(tiny_adapters[name], tmp_path / name)
    tensors = {k: v.to(dtype) for k, v in load_file(path / WEIGHTS_FILE).items()}
    save_file(tensors, path / WEIGHTS_FILE, metadata={"format": "pt"})
    config = json.loads((path / CONFIG_FILE).read_text())
    weights = load_adapter(path, shapes, max_rank=16)
    assert len(weights.modules) * 2 == len(tensors)
    for module, (a, b) in weights.modules.items():
        src_a = tensors[f"base_model.model.{module}.lora_A.weight"]
        src_b = tensors[f"base_model.model.{module}.lora_B.weight"]
        r = src_a.shape[0]
        scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
        assert a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
        assert torch.equal(a, src_a.float())
        assert torch.equal(b, (src_b * torch.tensor([scale])).t().float())  # B·s in ≥ fp32, then the slot dtype


def _rewrite_header(path, edit) -> None:
    raw = (path / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    (path / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def _first(header) -> dict:
    return header[next(k for k in sorted(header) if k != "__metadata__")]


HEADER_EDITS = {
    "offsets past the data": lambda h: _first(h).update(data_offsets=[0, 10**9]),
    "offsets not the shape's size": lambda h: _first(h).update(shape=[3, 3]),
    "a negative dimension": lambda h: _first(h).update(shape=[-1, 64]),
    "an unknown dtype": lambda h: _first(h).update(dtype="X9"),
    "no data_offsets": lambda h: _first(h).pop("data_offsets"),
    "boolean offsets": lambda h: _first(h).update(data_offsets=[False, True]),
    "two tensors over the same bytes": lambda h: _same_bytes(h),
}


def _same_bytes(header) -> None:
    """Point a tensor at the bytes of another of its size: an overlap, and a gap where its own bytes were."""
    keys = sorted(k for k in header if k != "__metadata__")
    size = lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0]  # noqa: E731
    first, other = next((a, b) for a in keys for b in keys if a < b and size(a) == size(b))
    header[other]["data_offsets"] = list(header[first]["data_offsets"])


@pytest.mark.parametrize("case", list(HEADER_EDITS))
def test_bad_headers_refused(tmp_path, tiny_adapters, shapes, case):
    path = copy_adapter(tiny_adapters["r4-attn"], tmp_path / "bad")
    _rewrite_header(path, HEADER_EDITS[case])
    with pytest.raises(InvalidAdapter, match="not a valid safetensors file"):
        load_adapter(path, shapes, max_rank=16)


def test_bytes_past_the_last_tensor_refused(tmp_path, tiny_adapters, shapes):
    """As safetensors: the tensors tile the data bytes exactly."""
    path = copy_adapter(tiny_adapters["r4-attn"], tmp_path / "long")
    with open(path / WEIGHTS_FILE, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(InvalidAdapter, match="the tensors end at byte"):
        load_adapter(path, shapes, max_rank=16)


@pytest.mark.parametrize("raw", [b"", b"\x01\x00", struct.pack("<Q", 1 << 40) + b"{}", struct.pack("<Q", 2) + b"[]"])
def test_bad_files_refused(tmp_path, tiny_adapters, shapes, raw):
    path = copy_adapter(tiny_adapters["r4-attn"], tmp_path / "bad")
    (path / WEIGHTS_FILE).write_bytes(raw)
    with pytest.raises(InvalidAdapter, match="not a valid safetensors file"):
        load_adapter(path, shapes, max_rank=16)


def test_float8_weights_refused_with_reason(tmp_path, tiny_adapters, shapes):
    """float8 is floating point but not a LoRA storage type here: a clear refusal, not a failed conversion."""
    path = copy_adapter(tiny_adapters["r4-attn"], tmp_path / "f8")
    tensors = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(path / WEIGHTS_FILE).items()}
    save_file(tensors, path / WEIGHTS_FILE)
    with pytest.raises(InvalidAdapter, match=r"must be floating point of one of F16, BF16, F32, F64, got F8_E4M3"):
        load_adapter(path, shapes, max_rank=16)


def _write_unsorted(path, tensors: dict[str, torch.Tensor], order: list[str], header_bytes_odd: bool) -> None:
    """A valid safetensors file with its tensors in `order` (not sorted by name, as save_file writes them) and,
    when asked, a header of odd length, so 2-byte tensors start at odd offsets in the file."""
    header, blobs, at = {}, [], 0
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
    for key in order:
        t = tensors[key].contiguous()
        blob = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + len(blob)]}
        blobs.append(blob)
        at += len(blob)
    text = json.dumps(header).encode()
    if (len(text) % 2 == 1) != header_bytes_odd:
        text += b" "
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.mark.parametrize("odd", [False, True], ids=["aligned", "misaligned"])
def test_unsorted_and_misaligned_files_equal_sorted(tmp_path, tiny_adapters, shapes, odd):
    """Groups of a kind are viewed in place only when equally spaced and aligned; any other layout is stacked."""
    path = copy_adapter(tiny_adapters["r8-all-rslora"], tmp_path / "sorted")
    tensors = {k: v.to(torch.float16) for k, v in load_file(path / WEIGHTS_FILE).items()}
    save_file(tensors, path / WEIGHTS_FILE)
    expected = load_adapter(path, shapes, max_rank=16)
    order = sorted(tensors, key=lambda k: k[::-1])  # by reversed name: each kind's tensors far from equally spaced
    _write_unsorted(path / WEIGHTS_FILE, tensors, order, odd)
    got = load_adapter(path, shapes, max_rank=16)
    assert got.modules.keys() == expected.modules.keys()
    for module, (a, b) in got.modules.items():
        assert torch.equal(a, expected.modules[module][0]) and torch.equal(b, expected.modules[module][1])


def test_concurrent_reads_on_threads_equal_serial_reads(tmp_path, tiny_adapters, shapes):
    """Each thread reads into its own buffer: reads racing on several threads give what one thread's reads give."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [copy_adapter(p, tmp_path / name) for name, p in tiny_adapters.items()]
    serial = [load_adapter(p, shapes, max_rank=16) for p in paths]
    with ThreadPoolExecutor(4) as pool:
        racing = list(pool.map(lambda p: load_adapter(p, shapes, max_rank=16), paths * 8))
    for i, got in enumerate(racing):
        want = serial[i % len(paths)]
        assert got.modules.keys() == want.modules.keys()
        assert all(
            torch.equal(a, want.modules[m][0]) and torch.equal(b, want.modules[m][1])
            for m, (a, b) in got.modules.items()
        )


def test_a_shared_header_is_planned_once_and_still_checked(tmp_path, tiny_adapters, shapes):
    """Adapters of one config share a header, whose checked plan is kept: another file with that header reads
    its own bytes, one with a NaN or truncated is refused, and the plan is checked again for another rank limit
    or model."""
    from mux.lora import adapter

    one = copy_adapter(tiny_adapters["r8-all-rslora"], tmp_path / "one")
    two = copy_adapter(tiny_adapters["r8-all-rslora"], tmp_path / "two")
    tensors = {k: v * 2 for k, v in load_file(two / WEIGHTS_FILE).items()}
    save_file(tensors, two / WEIGHTS_FILE, metadata={"format": "pt"})  # same names, shapes, dtypes: same header
    head = 8 + struct.unpack("<Q", (one / WEIGHTS_FILE).read_bytes()[:8])[0]
    assert (one / WEIGHTS_FILE).read_bytes()[:head] == (two / WEIGHTS_FILE).read_bytes()[:head]
    adapter._plans.clear()
    first = load_adapter(one, shapes, max_rank=16)
    assert len(adapter._plans) == 1
    second = load_adapter(two, shapes, max_rank=16)
    assert len(adapter._plans) == 1  # planned once
    assert torch.equal(second.buffer, first.buffer * 2)
    adapter._plans.clear()
    assert torch.equal(load_adapter(two, shapes, max_rank=16).buffer, second.buffer)  # as without the plan kept

    name = next(iter(tensors))
    save_file(
        {**tensors, name: torch.full_like(tensors[name], math.nan)}, two / WEIGHTS_FILE, metadata={"format": "pt"}
    )
    with pytest.raises(InvalidAdapter, match="NaN or Inf"):
        load_adapter(two, shapes, max_rank=16)  # the kept plan, the values checked all the same
    assert len(adapter._plans) == 1
    raw = (two / WEIGHTS_FILE).read_bytes()
    (two / WEIGHTS_FILE).write_bytes(raw[:-4])  # the same header, the last tensor's bytes short
    with pytest.raises(InvalidAdapter, match="not a valid safetensors file"):
        load_adapter(two, shapes, max_rank=16)
    with pytest.raises(InvalidAdapter, match="exceeds max_lora_rank 4"):
        load_adapter(one, shapes, max_rank=4)
    other = {m: type(s)(s.in_features + 1, s.out_features) for m, s in shapes.items()}  # another base model
    with pytest.raises(InvalidAdapter, match="do not match the base model"):
        load_adapter(one, other, max_rank=16)


DEEP = b"[" * 100_000 + b"]" * 100_000
CONFIG_STRUCTURE = {  # (a change to the config's text, what the refusal says): hostile structure, not values
    "nested 100,000 deep (once a 500)": (lambda t: t.replace(b'"r": 4', b'"r": ' + DEEP), "deeper than 64 levels"),
    "the whole file nested": (lambda t: DEEP, "deeper than 64 levels"),
    "a duplicate key": (lambda t: t.replace(b'"r": 4', b'"r": 4, "r": 8'), "names the key 'r' twice"),
    "a duplicate security flag": (lambda t: t[:-1] + b', "use_dora": false, "use_dora": true}', "'use_dora' twice"),
    "an integer of 5,000 digits": (lambda t: t.replace(b'"r": 4', b'"r": ' + b"9" * 5000), "more than 4300 digits"),
    "an integer of 4,300 digits": (lambda t: t.replace(b'"r": 4', b'"r": ' + b"9" * 4300), "r must be a positive"),
    "lora_alpha of 400 digits": (
        lambda t: t.replace(b'"lora_alpha": 8', b'"lora_alpha": 1' + b"0" * 400),
        "lora_alpha",
    ),
    "invalid UTF-8": (lambda t: t.replace(b'"r": 4', b'"r": 4, "x": "\xff"'), "not UTF-8"),
    "a lone surrogate": (lambda t: t.replace(b'"r": 4', b'"r": 4, "x": "\\udc00"'), "lone surrogate"),
    "UTF-16": (lambda t: t.decode().encode("utf-16"), "not UTF-8"),
}


@pytest.mark.parametrize("case", list(CONFIG_STRUCTURE))
def test_hostile_config_structure_refused(tmp_path, tiny_adapters, shapes, case):
    change, words = CONFIG_STRUCTURE[case]
    path = copy_adapter(tiny_adapters["r4-attn"], tmp_path / "bad")
    text = json.dumps(json.loads((path / CONFIG_FILE).read_text())).encode()  # one layout: `"key": value`
    assert b'"r": 4' in text and b'"lora_alpha": 8' in text
    (path / CONFIG_FILE).write_bytes(change(text))
    with pytest.raises(InvalidAdapter) as e:
        load_adapter(path, shapes, max_rank=16)
    assert words in str(e.value) and len(str(e.value)) < 200  # it names the problem, it does not echo the text


def _header_text(path, change) -> None:
    raw = (path / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    blob = change(json.dumps(json.loads(raw[8 : 8 + n])).encode())
    (path / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


HEADER_STRUCTURE = {
    "nested 100,000 deep": (lambda t: t.replace(b'"shape": [', b'"x": ' + DEEP + b', "shape": [', 1), "deeper than"),
    "a tensor named twice": (lambda t: t.replace(b"{", b'{"a.lora_A.weight": 1, "a.lora_A.weight": 2, ', 1), "twice"),
    "an offset of 5,000 digits": (
        lambda t: t.replace(b'"data_offsets": [0', b'"data_offsets": [' + b"9" * 5000),
        "4300",
    ),
    "invalid UTF-8": (lambda t: t.replace(b'"F32"', b'"F\xff"', 1), "not UTF-8"),
    "a lone surrogate": (lambda t: t.replace(b'"F32"', b'"\\ud800"', 1), "lone surrogate"),
}


@pytest.mark.parametrize("case", list(HEADER_STRUCTURE))
def test_hostile_header_structure_refused(tmp_path, tiny_adapters, shapes, case):
    change, words = HEADER_STRUCTURE[case]
    path = copy_adapter(tiny_adapters["r4-attn"], tmp_path / "bad")
    _header_text(path, change)
    with pytest.raises(InvalidAdapter, match="not a valid safetensors file: the header") as e:
        load_adapter(path, shapes, max_rank=16)
    assert words in str(e.value)
