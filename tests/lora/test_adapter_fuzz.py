"""Fuzz the adapter validator (hypothesis): whatever config values, weight bytes or hostile JSON structure
(nesting, wide, duplicate keys, huge numbers, bad UTF-8, lone surrogates) arrive, `load_adapter` either returns
finite weights or raises InvalidAdapter with a message; never anything else."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import parsers
from conftest import make_engine
from mux.errors import InvalidAdapter
from mux.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, load_adapter

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=8,
)
patterns = st.dictionaries(  # module-name patterns PEFT matches as regexes, some of them broken
    st.sampled_from(["q_proj", "v_proj", "layers.0.self_attn.q_proj", "(", "[a-", "*", ".*"]) | st.text(max_size=6),
    json_values,
    max_size=3,
)
CONFIG_KEYS = [
    "r",
    "lora_alpha",
    "alpha_pattern",
    "rank_pattern",
    "use_rslora",
    "use_dora",
    "peft_type",
    "bias",
    "target_modules",
    "modules_to_save",
    "fan_in_fan_out",
    "layers_to_transform",
]


@pytest.fixture(scope="module")
def shapes(tiny_dir):
    return make_engine(tiny_dir, max_loras=1).lora.shapes


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_adapters) -> Path:
    return tiny_adapters["r4-attn"]


def check(path: Path, shapes) -> None:
    try:
        weights = load_adapter(path, shapes, max_rank=16)
    except InvalidAdapter as e:
        assert str(e)
        return
    for a, b in weights.modules.values():
        assert torch.isfinite(a).all() and torch.isfinite(b).all()


@SETTINGS
@given(
    changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, min_size=1, max_size=4),
    pattern=st.sampled_from(["alpha_pattern", "rank_pattern"]),
    pattern_value=patterns,
)
def test_any_config_values(tmp_path_factory, good, shapes, changes, pattern, pattern_value):
    path = tmp_path_factory.mktemp("cfg")
    shutil.copy(good / WEIGHTS_FILE, path / WEIGHTS_FILE)
    config = {**json.loads((good / CONFIG_FILE).read_text()), pattern: pattern_value, **changes}
    (path / CONFIG_FILE).write_text(json.dumps(config))  # NaN/Infinity included: Python's json reads them
    check(path, shapes)


@SETTINGS
@given(data=st.data())
def test_any_weight_bytes(tmp_path_factory, good, shapes, data):
    path = tmp_path_factory.mktemp("w")
    shutil.copy(good / CONFIG_FILE, path / CONFIG_FILE)
    raw = bytearray((good / WEIGHTS_FILE).read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    kind = data.draw(st.sampled_from(["truncate", "flip", "header", "garbage"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":  # corrupt bytes, often in the JSON header (offsets, dtypes, shapes)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, min(len(raw), 8 + header_len + 64) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif kind == "header":  # a well-formed header describing other tensors
        header = json.loads(raw[8 : 8 + header_len])
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        header[name] = {
            "dtype": data.draw(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "X9"])),
            "shape": data.draw(st.lists(st.integers(0, 70), max_size=3)),
            "data_offsets": sorted(data.draw(st.lists(st.integers(0, len(raw)), min_size=2, max_size=2))),
        }
        blob = json.dumps(header).encode()
        raw = struct.pack("<Q", len(blob)) + blob + raw[8 + header_len :]
    else:
        raw = data.draw(st.binary(max_size=256))
    (path / WEIGHTS_FILE).write_bytes(bytes(raw))
    check(path, shapes)


# structure, not values: every hostile shape of bench/parsers.py at a drawn position of the config or the header
SHAPES = parsers.shapes(parsers.Sizes(deep=(64, 65, 100_000), wide=2_000, long=20_000, digits=(400, 4300, 4301)))
STRUCTURE = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))


def _with_shape(text: bytes, at: tuple, shape: str) -> bytes:
    value, _ = SHAPES[shape]
    return json.dumps(parsers._place(json.loads(text), at)).encode().replace(parsers.HOLE_JSON, value)


def check_structure(path: Path, shapes, refused: bool) -> None:
    try:
        load_adapter(path, shapes, max_rank=16)
    except InvalidAdapter as e:
        assert str(e)
        return
    assert not refused, "a shape the reader refuses was read"


@STRUCTURE
@given(data=st.data(), shape=st.sampled_from(sorted(SHAPES)))
def test_any_config_structure(tmp_path_factory, good, shapes, data, shape):
    text = (good / CONFIG_FILE).read_bytes()
    keys = sorted(json.loads(text))
    at = data.draw(st.sampled_from([(), *((k,) for k in keys), ("rank_pattern", "q_proj"), ("target_modules", 0)]))
    path = tmp_path_factory.mktemp("cfg")
    shutil.copy(good / WEIGHTS_FILE, path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_bytes(_with_shape(text, at, shape))
    check_structure(path, shapes, SHAPES[shape][1])


@STRUCTURE
@given(data=st.data(), shape=st.sampled_from(sorted(SHAPES)))
def test_any_header_structure(tmp_path_factory, good, shapes, data, shape):
    raw = (good / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    first = sorted(k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__")[0]
    at = data.draw(st.sampled_from([(), ("__metadata__",), (first,), (first, "shape"), (first, "data_offsets", 1)]))
    blob = _with_shape(raw[8 : 8 + n], at, shape)
    path = tmp_path_factory.mktemp("hdr")
    shutil.copy(good / CONFIG_FILE, path / CONFIG_FILE)
    (path / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    check_structure(path, shapes, SHAPES[shape][1])
