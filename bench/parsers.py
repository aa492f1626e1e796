"""Structure-level fuzzing of every parser on a real server: hostile structure, not hostile values.

Each route of the OpenAPI document gets a valid base body (built from its schema, with the few values a schema
cannot say), and every position of that body (each property the schema names, nested ones included) gets each
hostile shape in turn: nesting 100,000 levels deep, wide arrays and objects, a duplicated key, integers past
Python's digit limit, exponents past a float's, long strings and keys, invalid UTF-8, lone surrogates. Whole
bodies get a few shapes of their own (BOM, UTF-16, trailing garbage, gzip). Adapter uploads get the shapes in
their adapter_config.json (as a file and inside a .tar.gz) and in their safetensors header. Every answer must be
under 500, /metrics must count no internal error, and a completion must still be served at the end.

    python -m bench.parsers            # the CI size, a tiny model (tests/reliability/test_bad_input.py runs it)
    python -m bench.parsers --long     # larger shapes and more of them: bench/results/<date>-parsers-<host>.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import io
import json
import struct
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mux.jsonread import MAX_DEPTH

HOLE = "\x00hostile\x00"  # the position's value, replaced by a shape's bytes once the body is serialized
HOLE_JSON = json.dumps(HOLE).encode()
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# values a schema cannot give: a body that runs (one token), so a shape at one position reaches the checks behind it
BASES = {
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v2/models/{model}/infer": {
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hi"], "parameters": {}}],
        "outputs": [{"name": "text_output", "parameters": {"binary_data": False}}],
        "parameters": {"max_tokens": 1},
    },
    "/v2/models/{model}/generate": {"text_input": "hi", "parameters": {"max_tokens": 1}},
    "/v2/models/{model}/generate_stream": {"text_input": "hi", "parameters": {"max_tokens": 1}},
    "/": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
    "/generate": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
    "/generate_stream": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
    "/v1/load_lora_adapter": {"lora_name": "fuzz-loaded", "lora_path": "/nonexistent"},
    "/v1/unload_lora_adapter": {"lora_name": "nothing-here"},
    "/v2/repository/index": {"ready": True},
}
_DEFAULTS = {"string": "hi", "integer": 1, "number": 0.5, "boolean": False, "array": [], "object": {}}


@dataclass(frozen=True, slots=True)
class Sizes:
    deep: tuple[int, ...]  # nesting levels
    wide: int  # elements of a wide array, members of a wide object
    long: int  # characters of a long string
    digits: tuple[int, ...]  # digits of a huge integer


CI_PER_POSITION = 4  # shapes at each position but the whole body in CI (all of them with --long)
CI = Sizes(deep=(65, 100_000), wide=20_000, long=200_000, digits=(4300, 5000))
LONG = Sizes(
    deep=(63, 64, 65, 1_000, 100_000, 1_000_000), wide=300_000, long=3_000_000, digits=(20, 4300, 4301, 100_000)
)


def shapes(s: Sizes) -> dict[str, tuple[bytes, bool]]:
    """Hostile JSON values (raw bytes: some of them no Python value can serialize to), each with whether
    `mux.jsonread` refuses it wherever it sits (the rest may pass it to the value checks)."""
    out: dict[str, bytes] = {}
    refused: set[str] = set()
    for n in s.deep:
        out[f"array nested {n} deep"] = b"[" * n + b"]" * n
        out[f"object nested {n} deep"] = b'{"a":' * n + b"1" + b"}" * n
        out[f"arrays and objects nested {n + n % 2} deep"] = b'[{"a":' * ((n + 1) // 2) + b"1" + b"}]" * ((n + 1) // 2)
        if n > MAX_DEPTH:
            refused |= {
                f"array nested {n} deep",
                f"object nested {n} deep",
                f"arrays and objects nested {n + n % 2} deep",
            }
    n = s.deep[-1]
    out[f"{n} unclosed brackets"] = b"[" * n
    out[f"{n} closing brackets"] = b"]" * n
    refused |= {f"{n} unclosed brackets", f"{n} closing brackets"}
    out[f'{n} brackets inside a string ("[[[...")'] = b'"' + b"[" * n + b'"'  # not nesting: a string
    out[f"{s.wide} zeros"] = b"[" + b"0," * (s.wide - 1) + b"0]"
    out[f"{s.wide} strings"] = b"[" + b'"a",' * (s.wide - 1) + b'"a"]'
    out[f"{s.wide} empty objects"] = b"[" + b"{}," * (s.wide - 1) + b"{}]"
    out[f"{s.wide} nested pairs"] = b"[" + b"[[0]]," * (s.wide - 1) + b"[[0]]]"
    out[f"object of {s.wide} keys"] = b"{" + b",".join(b'"k%d":0' % i for i in range(s.wide)) + b"}"
    out[f"object of {s.wide} duplicate keys"] = b"{" + b",".join([b'"k":0'] * s.wide) + b"}"
    out["object with a duplicate key"] = b'{"a": 1, "a": 2}'
    refused |= {f"object of {s.wide} duplicate keys", "object with a duplicate key"}
    for d in s.digits:
        out[f"integer of {d} digits"] = b"9" * d
        out[f"negative integer of {d} digits"] = b"-" + b"9" * d
        if d > sys.get_int_max_str_digits():
            refused |= {f"integer of {d} digits", f"negative integer of {d} digits"}
    out["exponent 1e999999"] = b"1e999999"
    out["exponent -1e999999"] = b"-1e999999"
    out["exponent 1e-999999"] = b"1e-999999"
    out["fraction of 10000 digits"] = b"0." + b"1" * 10_000
    out["NaN, Infinity, -Infinity"] = b"[NaN, Infinity, -Infinity]"
    out[f"string of {s.long} characters"] = b'"' + b"a" * s.long + b'"'
    out[f"string of {s.long // 6} escapes"] = b'"' + b"\\u00e9" * (s.long // 6) + b'"'
    out[f"object with a key of {s.long} characters"] = b'{"' + b"k" * s.long + b'": 1}'
    out["invalid UTF-8 (0xff 0xfe)"] = b'"\xff\xfe"'
    out["overlong UTF-8 (0xc0 0xaf)"] = b'"\xc0\xaf"'
    out["UTF-8 of a surrogate (0xed 0xa0 0x80)"] = b'"\xed\xa0\x80"'
    out["truncated UTF-8 (0xe2 0x82)"] = b'"\xe2\x82"'
    out["lone high surrogate escape"] = b'"\\ud800"'
    out["lone low surrogate escape"] = b'"\\udfff"'
    out["surrogates in the wrong order"] = b'"\\udc00\\ud800"'
    out["lone surrogate escape in a key"] = b'{"\\ud800": 1}'
    refused |= {k for k in out if "UTF-8" in k or "surrogate" in k}  # the bad ones so far
    out["surrogate pair (valid: an emoji)"] = b'"\\ud83d\\ude00"'
    out["escaped backslash before u (valid)"] = b'"\\\\ud800"'
    out["NUL and control escapes"] = b'"\\u0000\\u001f\\b"'
    out["raw control character"] = b'"a\x01b"'
    refused.add("raw control character")
    return {k: (v, k in refused) for k, v in out.items()}


def body_shapes(base: bytes) -> dict[str, tuple[bytes, dict, bool]]:
    """Whole-body shapes: (bytes, extra headers, refused by the reader)."""
    deep = b"[" * 100_000 + b"]" * 100_000
    gz = {"content-encoding": "gzip"}
    return {
        "empty body": (b"", {}, False),  # /v2/repository/index reads no body then
        "null": (b"null", {}, False),
        "BOM, then the body": (b"\xef\xbb\xbf" + base, {}, False),
        "UTF-16 body": (base.decode().encode("utf-16"), {}, True),
        "UTF-32 body": (base.decode().encode("utf-32"), {}, True),
        "two JSON texts": (base + base, {}, True),
        "trailing garbage": (base + b"}}}", {}, True),
        "gzip: nested 100000 deep": (gzip.compress(deep), gz, True),
        "gzip: the body": (gzip.compress(base), gz, False),
        "gzip: truncated": (gzip.compress(base)[:-6], gz, True),
    }


@dataclass(frozen=True, slots=True)
class Case:
    method: str
    path: str  # the URL path, parameters filled in
    route: str  # the document's path
    shape: str
    position: str
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    files: dict | None = None  # multipart uploads
    refused: bool = False  # the route reads this JSON and the reader must refuse it: a 4xx


def _schema(op: dict) -> dict | None:
    content = (op.get("requestBody") or {}).get("content", {})
    return content.get("application/json", {}).get("schema")


def _base(route: str, schema: dict | None) -> dict:
    if route in BASES:
        return copy.deepcopy(BASES[route])
    schema = schema or {}
    props = schema.get("properties", {})
    return {k: _DEFAULTS.get(props.get(k, {}).get("type"), "hi") for k in schema.get("required", [])}


def _positions(schema: dict | None, body, at: tuple = ()) -> list[tuple]:
    """Every position of the body: the schema's properties (nested too) and the base body's own."""
    found = [at]
    props = (schema or {}).get("properties", {})
    if isinstance(body, dict) or (body is None and props):
        body = body or {}
        for key in dict.fromkeys([*body, *props]):
            found += _positions(props.get(key), body.get(key), (*at, key))
    elif isinstance(body, list) and body:
        found += _positions((schema or {}).get("items"), body[0], (*at, 0))
    return found


def _place(body, at: tuple):
    """The base body with HOLE at position `at` (objects on the way created where the base has none)."""
    if not at:
        return HOLE
    body = copy.deepcopy(body)
    node = body
    for key in at[:-1]:
        if isinstance(node, dict) and not isinstance(node.get(key), (dict, list)):
            node[key] = {}
        node = node[key]
    node[at[-1]] = HOLE
    return body


def _fill(path: str, model: str) -> str:
    return (
        path.replace("{model}", model)
        .replace("{tenant}", "nobody")
        .replace("{name}", "nothing")
        .replace("{action}", "pin")
    )


def _placed(
    base, positions: list[tuple], hostile: dict, per_position: int | None
) -> Iterator[tuple[str, str, bytes, bool]]:
    """(position, shape, raw text, refused) for the shapes at each position of `base`: all of them at the whole
    text, and at each other position all (per_position None) or `per_position` of them, the next ones in turn, so
    that the positions together still take every shape."""
    names = list(hostile)
    for i, at in enumerate(positions):
        text = json.dumps(_place(base, at)).encode()
        where = "/".join(map(str, at)) or "(whole)"
        picked = names
        if at and per_position is not None:
            picked = [names[(i * per_position + k) % len(names)] for k in range(min(per_position, len(names)))]
        for name in picked:
            value, refused = hostile[name]
            yield where, name, text.replace(HOLE_JSON, value), refused
        if at and isinstance(at[-1], str):  # the key itself twice in its object
            yield (
                where,
                "the key twice",
                text.replace(HOLE_JSON, b'"dup", ' + json.dumps(at[-1]).encode() + b': "dup"'),
                True,
            )


def route_cases(doc: dict, model: str, sizes: Sizes, per_position: int | None = None) -> Iterator[Case]:
    """The shapes at the positions of every route's body (see `_placed`); routes without a JSON body get them as
    the whole body. Every route also gets the whole-body shapes, and /infer each shape in a binary request's header."""
    hostile = shapes(sizes)
    for route, ops in doc["paths"].items():
        for method, op in ops.items():
            m, url, schema = method.upper(), _fill(route, model), _schema(op)
            reads_json = schema is not None or route.endswith("/infer")
            base = _base(route, schema) if reads_json else {}
            positions = _positions(schema, base) if reads_json else [()]
            for where, name, raw, refused in _placed(base, positions, hostile, per_position):
                yield Case(m, url, route, name, where, raw, refused=refused and reads_json)
            for name, (raw, headers, refused) in body_shapes(json.dumps(base).encode()).items():
                yield Case(m, url, route, name, "(whole)", raw, headers, refused=refused and reads_json)
            if route.endswith("/infer"):  # the binary extension: the JSON header, then tensor bytes
                at = ("inputs", 0, "parameters", "x")
                header = {**base, "inputs": [{**base["inputs"][0], "parameters": {"binary_data_size": 6}}]}
                for where, name, raw, refused in _placed(header, [at], hostile, None):
                    headers = {"inference-header-content-length": str(len(raw))}
                    tail = struct.pack("<I", 2) + b"hi"
                    yield Case(m, url, route, name, f"binary header: {where}", raw + tail, headers, refused=refused)


def upload_cases(adapter: Path, sizes: Sizes, per_position: int | None = None) -> Iterator[Case]:
    """The shapes in an uploaded adapter: in its adapter_config.json (the whole file, each key; the whole file
    inside a .tar.gz) and in its safetensors header (the whole header, __metadata__, a tensor's entry)."""
    config_text, weights = (adapter / CONFIG).read_bytes(), (adapter / WEIGHTS).read_bytes()
    config, hostile, route = json.loads(config_text), shapes(sizes), "/v1/adapters"
    for where, name, raw, refused in _placed(config, [(), *((k,) for k in config)], hostile, per_position):
        files = {CONFIG: (CONFIG, raw), WEIGHTS: (WEIGHTS, weights)}
        yield Case("POST", route, route, name, f"{CONFIG}: {where}", files=files, refused=refused)
    for where, name, raw, refused in _placed(config, [()], hostile, None):
        files = {"archive": tar_gz({CONFIG: raw, WEIGHTS: weights})}
        yield Case("POST", route, route, name, f".tar.gz's {CONFIG}: {where}", files=files, refused=refused)
    (n,) = struct.unpack_from("<Q", weights)
    header, data = json.loads(weights[8 : 8 + n]), weights[8 + n :]
    first = next(k for k in header if k != "__metadata__")
    positions = [(), ("__metadata__",), (first,), (first, "shape"), (first, "data_offsets")]
    for where, name, raw, refused in _placed(header, positions, hostile, per_position):
        files = {CONFIG: (CONFIG, config_text), WEIGHTS: (WEIGHTS, struct.pack("<Q", len(raw)) + raw + data)}
        yield Case("POST", route, route, name, f"{WEIGHTS} header: {where}", files=files, refused=refused)


def tar_gz(members: dict[str, bytes]) -> tuple[str, bytes, str]:
    """An upload's (file name, .tar.gz bytes, content type) holding `members` (also the tests' archives)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return ("adapter.tar.gz", buf.getvalue(), "application/gzip")


@dataclass
class Report:
    cases: int = 0
    status: Counter = field(default_factory=Counter)  # HTTP status (or "timeout", "failed") -> cases
    by_route: dict = field(default_factory=dict)  # route -> Counter of statuses
    server_errors: list[str] = field(default_factory=list)  # a 5xx, or a request that failed outright
    timeouts: list[str] = field(default_factory=list)  # no answer within the client's timeout
    accepted_refusals: list[str] = field(default_factory=list)  # a shape the reader refuses, not answered 4xx
    slowest: list[tuple[float, str]] = field(default_factory=list)  # the 10 slowest cases
    seconds: float = 0.0

    def add(self, case: Case, status: int | str, seconds: float) -> None:
        self.cases += 1
        self.status[status] += 1
        self.by_route.setdefault(f"{case.method} {case.route}", Counter())[status] += 1
        label = f"{case.method} {case.path} [{case.position}] {case.shape}: {status}"
        if status == "timeout":
            self.timeouts.append(label)
        elif status == "failed" or status >= 500:
            self.server_errors.append(label)
        elif status < 400 and case.refused:
            self.accepted_refusals.append(label)
        self.slowest = sorted([*self.slowest, (seconds, label)], reverse=True)[:10]

    @property
    def ok(self) -> bool:
        return not (self.server_errors or self.timeouts or self.accepted_refusals)


def run(base: str, cases: Iterator[Case], timeout: float = 120, progress: bool = False) -> Report:
    """Send every case, one at a time, on one connection (a fresh one after a failure)."""
    report = Report()
    start = time.perf_counter()
    client = httpx.Client(base_url=base, timeout=timeout)
    try:
        for case in cases:
            t = time.perf_counter()
            try:
                if case.files is not None:
                    status = client.post(case.path, files=case.files, data={"name": "fuzz-upload"}).status_code
                else:
                    headers = {"content-type": "application/json", **case.headers}
                    status = client.request(case.method, case.path, content=case.body, headers=headers).status_code
            except httpx.HTTPError as e:
                status = "timeout" if isinstance(e, httpx.TimeoutException) else "failed"
                client.close()
                client = httpx.Client(base_url=base, timeout=timeout)
            report.add(case, status, time.perf_counter() - t)
            if progress and report.cases % 1000 == 0:
                print(
                    f"parsers: {report.cases} cases, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True
                )
    finally:
        client.close()
    report.seconds = time.perf_counter() - start
    return report


def still_serving(base: str) -> bool:
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    return r.status_code == 200


def internal_errors(base: str) -> float:
    """mux_internal_errors_total over every route, from /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=60).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("mux_internal_errors_total")
    )


def all_cases(doc: dict, model: str, adapter: Path, sizes: Sizes, per_position: int | None) -> Iterator[Case]:
    yield from route_cases(doc, model, sizes, per_position)
    yield from upload_cases(adapter, sizes, per_position)


def markdown(report: Report, sizes: Sizes, machine: dict, serving: bool, errors: float, tracebacks: int) -> str:
    lines = [
        "# Parsers: hostile structure at every route (bench/parsers.py)",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['device']}, "
        f"Python {machine['python']}. A tiny random Llama on a loopback `mux serve`.",
        "",
        f"Sizes: nesting {', '.join(map(str, sizes.deep))} levels; {sizes.wide} elements wide; strings of "
        f"{sizes.long} characters; integers of {', '.join(map(str, sizes.digits))} digits.",
        "",
        f"**{report.cases} cases in {report.seconds:.0f} s: {len(report.server_errors)} 5xx (or failed requests), "
        f"{len(report.timeouts)} timeouts, {len(report.accepted_refusals)} shapes the reader refuses answered "
        f"under 400; mux_internal_errors_total {errors:.0f}; still serving afterwards: {'yes' if serving else 'NO'}; "
        f"tracebacks in the server log: {tracebacks}.**",
        "",
        "| status | cases |",
        "|---|---:|",
        *(f"| {s} | {n} |" for s, n in sorted(report.status.items(), key=lambda kv: str(kv[0]))),
        "",
        "| route | cases | statuses |",
        "|---|---:|---|",
        *(
            f"| `{route}` | {sum(c.values())} | {', '.join(f'{s}: {n}' for s, n in sorted(c.items(), key=str))} |"
            for route, c in sorted(report.by_route.items())
        ),
        "",
        "Slowest cases:",
        "",
        *(f"- {seconds:.2f} s: {label}" for seconds, label in report.slowest),
    ]
    if not report.ok:
        failures = report.server_errors + report.timeouts + report.accepted_refusals
        lines += ["", "First failures:", "", *(f"- {e}" for e in failures[:20])]
    return "\n".join([*lines, "", *reader_cost()])


def reader_cost() -> list[str]:
    """`mux.jsonread.loads` beside plain `json.loads` on what the server reads (best of many, this machine)."""
    from bench.common import best_time
    from mux.jsonread import BadJSON, loads

    chat = {"model": "demo/json", "max_tokens": 64, "messages": [{"role": "user", "content": "word " * 40}] * 45}
    tensors = [
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in range(210) for ab in "AB"
    ]
    header = {t: {"dtype": "F32", "shape": [8, 576], "data_offsets": [0, 18432]} for t in tensors}
    texts = {
        "a chat body of 10 KB (45 messages)": json.dumps(chat).encode(),
        "a completions body of 10 KB (2,000 token ids)": json.dumps({"prompt": list(range(2000))}).encode(),
        "a safetensors header of 420 tensors (SmolLM2 rank 8)": json.dumps(header).encode(),
        "4 MB of [0,0,...] (a token list at the body limit)": b"[" + b"0," * (2 << 20) + b"0]",
        "200 KB nested 100,000 deep (json.loads: RecursionError)": b"[" * 100_000 + b"]" * 100_000,
    }

    def refused_or(fn):
        def call():
            with contextlib.suppress(BadJSON, RecursionError):
                fn()

        return call

    lines = ["| text | bytes | json.loads | jsonread.loads | added |", "|---|---:|---:|---:|---:|"]
    for name, raw in texts.items():
        plain = best_time(refused_or(lambda raw=raw: json.loads(raw)), reps=20)
        ours = best_time(refused_or(lambda raw=raw: loads(raw, max_bytes=8 << 20)), reps=20)
        lines.append(
            f"| {name} | {len(raw)} | {plain * 1e6:.0f} µs | {ours * 1e6:.0f} µs | {(ours - plain) * 1e6:+.0f} µs |"
        )
    return ["The reader's cost (best of 20 on this machine):", "", *lines]


def main() -> None:
    import shutil
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="larger shapes and more of them; results are saved")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from bench.common import build_tiny_model, machine, make_adapter, save
    from conftest import server_output, start_server  # the same real-process launcher the tests use
    from mux.model.loader import default_model_dir
    from mux.server.openapi import openapi_document

    sizes = LONG if args.long else CI
    work = Path(tempfile.mkdtemp(prefix="mux-parsers-"))
    try:
        model_dir = build_tiny_model(work / "tiny", "llama", default_model_dir())
        adapter = make_adapter(model_dir, work / "repo" / "fuzz-tenant" / "fuzz-adapter", r=4, targets=["q_proj"])
        proc, base = start_server(model_dir, work / "repo", "--max-loras", "2")
        try:
            per_position = None if args.long else CI_PER_POSITION
            report = run(base, all_cases(openapi_document(), "tiny", adapter, sizes, per_position), progress=True)
            serving, errors = still_serving(base), internal_errors(base)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        tracebacks = server_output(proc).count("Traceback")
        table = markdown(report, sizes, machine(), serving, errors, tracebacks)
        print(table)
        if args.long:
            status = {str(k): n for k, n in report.status.items()}
            data = {"cases": report.cases, "seconds": report.seconds, "status": status,
                    "server_errors": report.server_errors, "timeouts": report.timeouts,
                    "accepted_refusals": report.accepted_refusals, "internal_errors": errors,
                    "still_serving": serving, "tracebacks": tracebacks, "slowest": report.slowest,
                    "machine": machine()}  # fmt: skip
            print(save("parsers", data, table))
        sys.exit(0 if report.ok and serving and not errors and not tracebacks else 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
