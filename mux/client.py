"""`mux adapters ...`, `mux rollout ...` and `mux stats`: commands that speak HTTP to a running server (`--url` /
MUX_URL, `--key` / MUX_API_KEY). Tables for people, the server's own JSON with `--json`; a refusal prints the
server's message and exits with status 1."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a command runs: `mux serve` does not need httpx
    import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
COMMANDS = ("adapters", "rollout", "stats")
FILES = ("adapter_config.json", "adapter_model.safetensors")  # the upload route's file fields
PROGRESS_BYTES = 16 << 20  # on a terminal, uploads at least this large show a progress bar


class ClientError(Exception):
    """The server refused (its message), could not be reached, or the command's input is wrong."""


def add_commands(sub) -> None:
    """Add `adapters`, `rollout` and `stats` to the `mux` parser's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help=f"the server (default: $MUX_URL, else {DEFAULT_URL})")
    common.add_argument("--key", default=None, help="API key, sent as a bearer token (default: $MUX_API_KEY)")
    common.add_argument("--json", action="store_true", help="print the server's JSON instead of a table")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an answer (default 60)")
    adapters = sub.add_parser("adapters", help="list, show, upload or delete adapters on a server")
    verbs = adapters.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", parents=[common], help="the adapters this key may use")
    show = verbs.add_parser("show", parents=[common], help="one adapter's metadata")
    show.add_argument("name", help="TENANT/NAME (or NAME, if one adapter visible to this key has that name)")
    upload = verbs.add_parser("upload", parents=[common], help="upload an adapter directory as a new version")
    upload.add_argument("dir", type=Path, help=f"a PEFT adapter directory: {' + '.join(FILES)}")
    upload.add_argument("--name", required=True, help="TENANT/NAME (a tenant key may give NAME: its own tenant)")
    upload.add_argument(
        "--no-activate",
        action="store_true",
        help="send activate=false: store the version without moving traffic to it (then `mux rollout split`)",
    )
    upload.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"a progress bar on stderr (default: on a terminal, for uploads of {PROGRESS_BYTES >> 20} MiB or more)",
    )
    rm = verbs.add_parser("rm", parents=[common], help="delete an adapter, every version (refused while in use)")
    rm.add_argument("name", help="TENANT/NAME (or NAME, as for show)")
    _add_rollout(sub, common)
    stats = sub.add_parser("stats", parents=[common], help="tiers, engine and the top adapters (admin key)")
    stats.add_argument("--top", type=int, default=10, help="adapters to list, most used first (default 10)")
    stats.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) until interrupted; with --json one JSON line each time",
    )


def _add_rollout(sub, common: argparse.ArgumentParser) -> None:
    rollout = sub.add_parser("rollout", help="split an adapter's traffic between its versions, promote, roll back")
    verbs = rollout.add_subparsers(dest="verb", required=True)
    name = {"help": "TENANT/NAME (or NAME, if one adapter visible to this key has that name)"}
    show = verbs.add_parser("show", parents=[common], help="an adapter's versions, their figures and its split")
    show.add_argument("name", **name)
    split = verbs.add_parser("split", parents=[common], help="send each version a share of new requests")
    split.add_argument("name", **name)
    split.add_argument(
        "weights",
        nargs="+",
        type=_weight,
        metavar="VERSION=PERCENT",
        help="e.g. v1=90 v2=10 (or 1=90 2=10): integer percents summing to 100",
    )
    guard = split.add_argument_group(
        "guard",
        "once a canary served --guard-min-requests, send all traffic back to the stable version if the "
        "canary fails or is slower than allowed; any of these sets a guard (the server's defaults fill the rest)",
    )
    guard.add_argument("--guard-max-error-rate", type=float, metavar="RATE", help="errors per request (0.05)")
    guard.add_argument(
        "--guard-max-ttft-p99-ratio", type=float, metavar="RATIO", help="TTFT p99 over the stable version's (2)"
    )
    guard.add_argument("--guard-min-requests", type=int, metavar="N", help="requests before the guard judges (50)")
    promote = verbs.add_parser("promote", parents=[common], help="send all traffic to one version")
    promote.add_argument("name", **name)
    promote.add_argument("version", type=_version, help="the version: N or vN")
    rollback = verbs.add_parser(
        "rollback", parents=[common], help="all traffic back to the version stable before the last promote or split"
    )
    rollback.add_argument("name", **name)


def _version(text: str) -> int:
    number = text.removeprefix("v")
    if not (number.isascii() and number.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a version: give N or vN, e.g. 2 or v2")
    return int(number)


def _weight(text: str) -> tuple[int, int]:
    """`v2=10` or `2=10` -> (2, 10); the server judges the range and the sum."""
    version, _, percent = text.partition("=")
    try:
        if not re.fullmatch(r"-?[0-9]+", percent):
            raise ValueError(percent)
        return _version(version), int(percent)
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give VERSION=PERCENT with an integer percent, e.g. v1=90 v2=10 or 1=90 2=10"
        ) from None


def run(args: argparse.Namespace, http: httpx.Client | None = None) -> int:
    """Run a client command; `http` replaces the client built from --url/--key (tests)."""
    try:
        with contextlib.ExitStack() as stack:
            if http is None:
                http = stack.enter_context(_client(args))
            if args.command == "stats":
                return _stats(http, args)
            return VERBS[args.command][args.verb](http, args)
    except ClientError as e:
        print(f"mux: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # --watch ends here, so does a ^C during an upload
        return 0 if args.command == "stats" else 130


def _client(args: argparse.Namespace) -> httpx.Client:
    import httpx

    url = args.url or os.environ.get("MUX_URL") or DEFAULT_URL
    key = args.key if args.key is not None else os.environ.get("MUX_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=args.timeout)


def _call(http: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response:
    import httpx

    try:
        r = http.request(method, path, **kwargs)
    except httpx.HTTPError as e:
        raise ClientError(f"{method} {http.base_url.join(path)}: {e or type(e).__name__}") from None
    if r.is_error:
        raise ClientError(f"{r.status_code} {r.reason_phrase}: {_message(r)}")
    return r


def _message(r: httpx.Response) -> str:
    """The error text of any of the server's protocols: OpenAI's error.message, Triton's and LoRAX's error."""
    try:
        body = r.json()
    except ValueError:
        return r.text.strip() or r.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return str(error) if error is not None else r.text.strip()


def _print_json(body) -> None:
    print(json.dumps(body, indent=2, ensure_ascii=False))


# ---- adapters -----------------------------------------------------------------------------------
def _list(http: httpx.Client, args: argparse.Namespace) -> int:
    body = _call(http, "GET", "/v1/adapters").json()
    if args.json:
        _print_json(body)
        return 0
    rows = [
        [
            m["id"],
            str(m.get("version", "-")),
            str(m.get("rank") or "-"),
            _targets(m.get("target_modules")),
            _bytes(m.get("bytes")),
            (m.get("sha256") or "-")[:12],
            _date(m.get("created")),
        ]
        for m in body["data"]
    ]
    print(_table(["ID", "VERSION", "RANK", "TARGETS", "SIZE", "SHA256", "CREATED"], rows) if rows else "no adapters")
    return 0


def _show(http: httpx.Client, args: argparse.Namespace) -> int:
    meta = _call(http, "GET", f"/v1/adapters/{_resolve(http, args.name)}").json()
    if args.json:
        _print_json(meta)
        return 0
    shown = {
        **meta,
        "target_modules": ", ".join(meta["target_modules"]) if meta.get("target_modules") else None,
        "bytes": f"{meta['bytes']} ({_bytes(meta['bytes'])})" if meta.get("bytes") is not None else None,
        "created": _date(meta.get("created")) if meta.get("created") else None,
        **({"versions": ", ".join(str(v["version"]) for v in meta["versions"])} if "versions" in meta else {}),
        **({"traffic": _weights(meta["traffic"])} if "traffic" in meta else {}),
    }
    print(_fields(shown))
    return 0


def _rm(http: httpx.Client, args: argparse.Namespace) -> int:
    body = _call(http, "DELETE", f"/v1/adapters/{_resolve(http, args.name)}").json()
    if args.json:
        _print_json(body)
    else:
        print(f"deleted {body['id']}")
    return 0


def _resolve(http: httpx.Client, name: str) -> str:
    """TENANT/NAME as given; a plain NAME is the one adapter of that name this key can see."""
    if "/" in name:
        return name
    found = [m["id"] for m in _call(http, "GET", "/v1/adapters").json()["data"] if m["id"].split("/", 1)[1] == name]
    if not found:
        raise ClientError(f"no adapter named {name!r} is visible to this key")
    if len(found) > 1:
        raise ClientError(f"{name!r} is ambiguous ({', '.join(found)}): give TENANT/NAME")
    return found[0]


def _upload(http: httpx.Client, args: argparse.Namespace) -> int:
    paths = [args.dir / f for f in FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ClientError(f"not an adapter directory, missing: {', '.join(missing)}")
    total = sum(p.stat().st_size for p in paths)
    show = args.progress if args.progress is not None else total >= PROGRESS_BYTES and sys.stderr.isatty()
    fields = {"name": args.name, **({"activate": "false"} if args.no_activate else {})}
    with _progress(total, show, args.name) as bar, contextlib.ExitStack() as files:
        opened = {p.name: (p.name, _Counted(files.enter_context(open(p, "rb")), bar)) for p in paths}
        # no write timeout, so a slow link is not cut mid-body; the answer (validation included) gets --timeout
        timeout = (args.timeout, args.timeout, None, args.timeout)  # httpx: connect, read, write, pool
        meta = _call(http, "POST", "/v1/adapters", data=fields, files=opened, timeout=timeout).json()
    if args.json:
        _print_json(meta)
        return 0
    size, sha = _bytes(meta.get("bytes")), (meta.get("sha256") or "-")[:12]
    print(f"uploaded {meta['id']} version {meta['version']} (rank {meta.get('rank')}, {size}, sha256 {sha})")
    return 0


@contextlib.contextmanager
def _progress(total: int, show: bool, name: str) -> Iterator:
    if not show:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr) as bar:
        yield bar


class _Counted:
    """A binary file whose reads advance a progress bar: httpx streams multipart file fields with read()."""

    def __init__(self, file, bar) -> None:
        self._file, self._bar = file, bar

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        if self._bar is not None:
            self._bar.update(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        if self._bar is not None and offset == 0 and whence == 0:  # httpx rewinds before sending: count anew
            self._bar.update(-self._file.tell())
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()


# ---- rollouts -----------------------------------------------------------------------------------
GUARD = ("max_error_rate", "max_ttft_p99_ratio", "min_requests")  # the guard's fields, each a --guard-* flag
STATE = ("id", "versions", "traffic")  # an adapter's rollout state: what every rollout route answers


def _rollout_show(http: httpx.Client, args: argparse.Namespace) -> int:
    meta = _call(http, "GET", f"/v1/adapters/{_resolve(http, args.name)}").json()
    if any(k not in meta for k in STATE):
        raise ClientError(f"{meta.get('id', args.name)}: this server has no traffic splits (no rollouts)")
    return _answer(args, {k: meta[k] for k in STATE}, render_rollout)


def _rollout_split(http: httpx.Client, args: argparse.Namespace) -> int:
    weights: dict[str, int] = {}
    for version, percent in args.weights:
        if str(version) in weights:
            raise ClientError(f"version {version} is given twice")
        weights[str(version)] = percent
    guard = {k: v for k in GUARD if (v := getattr(args, f"guard_{k}")) is not None}
    return _rollout_change(http, args, "PUT", "traffic", {"weights": weights, **({"guard": guard} if guard else {})})


def _rollout_promote(http: httpx.Client, args: argparse.Namespace) -> int:
    return _rollout_change(http, args, "POST", "promote", {"version": args.version})


def _rollout_rollback(http: httpx.Client, args: argparse.Namespace) -> int:
    return _rollout_change(http, args, "POST", "rollback", None)


def _rollout_change(http: httpx.Client, args: argparse.Namespace, method: str, action: str, body) -> int:
    state = _call(http, method, f"/v1/adapters/{_resolve(http, args.name)}/{action}", json=body).json()
    return _answer(args, state, lambda s: f"{s['id']}: {_weights(s['traffic'])}")


def render_rollout(state: dict) -> str:
    """A rollout state as text: a row per version (its figures under the split, if it has one), then the split."""
    traffic, versions = state["traffic"], state["versions"]
    figured = any("figures" in v for v in versions)
    headers = ["VERSION", "WEIGHT", "SHA256", "RANK", "CREATED", "IN FLIGHT", *(FIGURES if figured else [])]
    rows = [
        [
            _version_label(v["version"], traffic),
            f"{v['weight']}%",
            (v.get("sha256") or "-")[:12],
            str(v.get("rank") or "-"),
            _date(v.get("created")),
            str(v["in_flight"]),
            *(_figures(v.get("figures")) if figured else []),
        ]
        for v in versions
    ]
    guard = traffic.get("guard")
    fields = {
        "stable": f"v{traffic['stable']}",
        "rollback to": f"v{traffic['rollback_to']}",
        **({"guard": _guard(guard, traffic["stable"])} if guard else {}),
        **({"rolled back": traffic["rollback_reason"]} if traffic.get("rollback_reason") else {}),
        **({"updated": _date(traffic["updated"])} if traffic.get("updated") else {}),
    }
    return _table(headers, rows) + "\n\n" + _fields(fields)


FIGURES = ["REQUESTS", "ERRORS", "TTFT P50 MS", "TTFT P99 MS"]


def _figures(f: dict | None) -> list[str]:
    if f is None:
        return ["-"] * len(FIGURES)
    return [str(f["requests"]), str(f["errors"]), _ms(f.get("ttft_p50_s")), _ms(f.get("ttft_p99_s"))]


def _weights(traffic: dict) -> str:
    shares = ", ".join(f"v{v} {w}%" for v, w in traffic["weights"].items())
    return f"{shares} (stable v{traffic['stable']})"


def _version_label(version: int, traffic: dict) -> str:
    return f"{version} (stable)" if version == traffic["stable"] else str(version)


def _guard(guard: dict, stable: int) -> str:
    return (
        f"all traffic back to v{stable} once a canary served {guard['min_requests']} requests, if its error rate "
        f"> {guard['max_error_rate']:g} or its TTFT p99 > {guard['max_ttft_p99_ratio']:g}x v{stable}'s"
    )


VERBS = {
    "adapters": {"list": _list, "show": _show, "upload": _upload, "rm": _rm},
    "rollout": {
        "show": _rollout_show,
        "split": _rollout_split,
        "promote": _rollout_promote,
        "rollback": _rollout_rollback,
    },
}


# ---- stats --------------------------------------------------------------------------------------
def _stats(http: httpx.Client, args: argparse.Namespace) -> int:
    clear = args.watch is not None and not args.json and sys.stdout.isatty()
    while True:
        stats = _call(http, "GET", "/admin/stats").json()
        if args.json:
            print(json.dumps(stats) if args.watch is not None else json.dumps(stats, indent=2), flush=True)
        else:
            print(("\x1b[H\x1b[2J" if clear else "") + render_stats(stats, args.top), flush=True)
        if args.watch is None:
            return 0
        time.sleep(args.watch)


def render_stats(stats: dict, top: int = 10) -> str:
    """/admin/stats as text: one line per tier, the engine, the counters, then the most used adapters."""
    tiers, c, lat = stats["tiers"], stats["counters"], stats["load_latency_s"]
    dev, host, disk = tiers["device"], tiers["host"], tiers.get("disk", {})
    e = stats.get("engine", {})
    kv = e.get("kv_blocks", {})
    tier_rows = [
        [
            "device",
            f"{dev['used']} slots ({dev['pinned']} pinned)",
            f"{dev['capacity']} slots of {_bytes(dev['bytes_per_slot'])}",
        ],
        [
            "host",
            f"{host['count']} adapters, {_bytes(host['used_bytes'])}",
            f"{host['capacity_count']} adapters, {_bytes(host['capacity_bytes'])}",
        ],
        ["disk", f"{disk.get('count', '-')} adapters, {_bytes(disk.get('bytes'))}", "-"],
    ]
    lines = [_table(["TIER", "USED", "CAPACITY"], tier_rows), ""]
    if e:
        lines.append(
            f"engine: {e['running']} running, {e['waiting']} waiting, {e['tokens_per_s']:.1f} tok/s, "
            f"KV blocks {kv.get('free')} free of {kv.get('total')} ({kv.get('cached')} cached), {e['steps']} steps"
        )
    lines.append(
        f"hits: device {c['hits']['device']}, host {c['hits']['host']}; misses {c['misses']}; "
        f"loads: disk→host {c['loads']['disk_to_host']}, host→device {c['loads']['host_to_device']}; "
        f"evictions: device→host {c['evictions']['device_to_host']}, host→disk {c['evictions']['host_to_disk']}"
    )
    lines.append("load p50/p95 ms: " + ", ".join(f"{path} {_ms(p['p50'])}/{_ms(p['p95'])}" for path, p in lat.items()))
    used = sorted(stats.get("adapters", []), key=lambda a: (a["in_flight"], a["uses"], a["last_used"]), reverse=True)
    rows = [
        [
            a["id"],
            str(a.get("version", "-")),
            a["tier"],
            "-" if a["slot"] is None else str(a["slot"]),
            "yes" if a["pinned"] else "",
            str(a["in_flight"]),
            str(a["uses"]),
            _ago(a["last_used"]),
        ]
        for a in used[:top]
    ]
    if rows:
        lines += ["", _table(["ADAPTER", "VERSION", "TIER", "SLOT", "PINNED", "IN FLIGHT", "USES", "LAST USED"], rows)]
    return "\n".join(lines + _rollouts(stats.get("rollouts") or []))


def _rollouts(rollouts: list[dict]) -> list[str]:
    """The versions under a split, with their figures, and why a guard rolled one back."""
    rows = [
        [r["id"], _version_label(v["version"], r["traffic"]), f"{v['weight']}%", *_figures(v["figures"])]
        for r in rollouts
        for v in r["versions"]
        if "figures" in v
    ]
    reasons = [
        f"{r['id']} rolled back: {r['traffic']['rollback_reason']}"
        for r in rollouts
        if r["traffic"].get("rollback_reason")
    ]
    return ["", _table(["ROLLOUT", "VERSION", "WEIGHT", *FIGURES], rows), *reasons] if rows else []


# ---- formatting ---------------------------------------------------------------------------------
def _answer(args: argparse.Namespace, body, text) -> int:
    """The server's JSON with --json, else `text(body)`."""
    if args.json:
        _print_json(body)
    else:
        print(text(body))
    return 0


def _fields(fields: dict) -> str:
    width = max(len(k) for k in fields)
    return "\n".join(f"{k:<{width}}  {'-' if v is None else v}" for k, v in fields.items())


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [headers, *rows])


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    size, unit = next((n / 1024**i, u) for i, u in ((3, "GiB"), (2, "MiB"), (1, "KiB")) if n >= 1024**i)
    return f"{size:.1f} {unit}"


def _targets(modules: list[str] | None) -> str:
    return ",".join(m.removesuffix("_proj") for m in modules) if modules else "-"


def _date(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _ago(t: float) -> str:
    if not t:
        return "never"
    s = max(0.0, time.time() - t)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.0f} h ago"
