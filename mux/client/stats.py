"""`mux stats`: /admin/stats as text (tiers, engine, counters, the most used adapters, the versions under a
split), once or redrawn with --watch."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from mux.client.http import call
from mux.client.rollout import FIGURES, figures, version_label
from mux.client.tables import ago, ms, size, table

if TYPE_CHECKING:  # imported when a command runs: `mux serve` does not need httpx
    import httpx


def add_parser(sub, common: argparse.ArgumentParser) -> None:
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


def run(http: httpx.Client, args: argparse.Namespace) -> int:
    clear = args.watch is not None and not args.json and sys.stdout.isatty()
    while True:
        stats = call(http, "GET", "/admin/stats").json()
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
            f"{dev['used']} adapters ({dev['pinned']} pinned), {size(dev['used_bytes'])}",
            f"{dev['capacity']} a step, {size(dev['capacity_bytes'])}",
        ],
        [
            "host",
            f"{host['count']} adapters, {size(host['used_bytes'])}",
            f"{host['capacity_count']} adapters, {size(host['capacity_bytes'])}",
        ],
        ["disk", f"{disk.get('count', '-')} adapters, {size(disk.get('bytes'))}", "-"],
    ]
    lines = [table(["TIER", "USED", "CAPACITY"], tier_rows), ""]
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
    lines.append("load p50/p95 ms: " + ", ".join(f"{path} {ms(p['p50'])}/{ms(p['p95'])}" for path, p in lat.items()))
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
            ago(a["last_used"]),
        ]
        for a in used[:top]
    ]
    if rows:
        lines += ["", table(["ADAPTER", "VERSION", "TIER", "SLOT", "PINNED", "IN FLIGHT", "USES", "LAST USED"], rows)]
    return "\n".join(lines + _rollouts(stats.get("rollouts") or []))


def _rollouts(rollouts: list[dict]) -> list[str]:
    """The versions under a split, with their figures, and why a guard rolled one back."""
    rows = [
        [r["id"], version_label(v["version"], r["traffic"]), f"{v['weight']}%", *figures(v["figures"])]
        for r in rollouts
        for v in r["versions"]
        if "figures" in v
    ]
    reasons = [
        f"{r['id']} rolled back: {r['traffic']['rollback_reason']}"
        for r in rollouts
        if r["traffic"].get("rollback_reason")
    ]
    return ["", table(["ROLLOUT", "VERSION", "WEIGHT", *FIGURES], rows), *reasons] if rows else []
