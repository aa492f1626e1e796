"""How the client commands print: aligned tables, key/value fields, sizes and times; the server's JSON with
--json."""

from __future__ import annotations

import argparse
import json
import time


def print_json(body) -> None:
    print(json.dumps(body, indent=2, ensure_ascii=False))


def answer(args: argparse.Namespace, body, text) -> int:
    """The server's JSON with --json, else `text(body)`."""
    if args.json:
        print_json(body)
    else:
        print(text(body))
    return 0


def fields(values: dict) -> str:
    width = max(len(k) for k in values)
    return "\n".join(f"{k:<{width}}  {'-' if v is None else v}" for k, v in values.items())


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [headers, *rows])


def size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    scaled, unit = next((n / 1024**i, u) for i, u in ((3, "GiB"), (2, "MiB"), (1, "KiB")) if n >= 1024**i)
    return f"{scaled:.1f} {unit}"


def date(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def ago(t: float) -> str:
    if not t:
        return "never"
    s = max(0.0, time.time() - t)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.0f} h ago"
