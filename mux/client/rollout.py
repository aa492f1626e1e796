"""`mux rollout show|split|promote|rollback`: an adapter's traffic split between its versions, and the text of a
rollout state (also what `mux adapters show` and `mux stats` print of a split)."""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING

from mux.client.http import ClientError, call, resolve
from mux.client.tables import answer, date, fields, ms, table

if TYPE_CHECKING:  # imported when a command runs: `mux serve` does not need httpx
    import httpx

GUARD = ("max_error_rate", "max_ttft_p99_ratio", "min_requests")  # the guard's fields, each a --guard-* flag
STATE = ("id", "versions", "traffic")  # an adapter's rollout state: what every rollout route answers
FIGURES = ["REQUESTS", "ERRORS", "TTFT P50 MS", "TTFT P99 MS"]


def add_parser(sub, common: argparse.ArgumentParser) -> None:
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


def _show(http: httpx.Client, args: argparse.Namespace) -> int:
    meta = call(http, "GET", f"/v1/adapters/{resolve(http, args.name)}").json()
    if any(k not in meta for k in STATE):
        raise ClientError(f"{meta.get('id', args.name)}: this server has no traffic splits (no rollouts)")
    return answer(args, {k: meta[k] for k in STATE}, render_rollout)


def _split(http: httpx.Client, args: argparse.Namespace) -> int:
    weights: dict[str, int] = {}
    for version, percent in args.weights:
        if str(version) in weights:
            raise ClientError(f"version {version} is given twice")
        weights[str(version)] = percent
    guard = {k: v for k in GUARD if (v := getattr(args, f"guard_{k}")) is not None}
    return _change(http, args, "PUT", "traffic", {"weights": weights, **({"guard": guard} if guard else {})})


def _promote(http: httpx.Client, args: argparse.Namespace) -> int:
    return _change(http, args, "POST", "promote", {"version": args.version})


def _rollback(http: httpx.Client, args: argparse.Namespace) -> int:
    return _change(http, args, "POST", "rollback", None)


def _change(http: httpx.Client, args: argparse.Namespace, method: str, action: str, body) -> int:
    state = call(http, method, f"/v1/adapters/{resolve(http, args.name)}/{action}", json=body).json()
    return answer(args, state, lambda s: f"{s['id']}: {traffic_text(s['traffic'])}")


VERBS = {"show": _show, "split": _split, "promote": _promote, "rollback": _rollback}


def render_rollout(state: dict) -> str:
    """A rollout state as text: a row per version (its figures under the split, if it has one), then the split."""
    traffic, versions = state["traffic"], state["versions"]
    figured = any("figures" in v for v in versions)
    headers = ["VERSION", "WEIGHT", "SHA256", "RANK", "CREATED", "IN FLIGHT", *(FIGURES if figured else [])]
    rows = [
        [
            version_label(v["version"], traffic),
            f"{v['weight']}%",
            (v.get("sha256") or "-")[:12],
            str(v.get("rank") or "-"),
            date(v.get("created")),
            str(v["in_flight"]),
            *(figures(v.get("figures")) if figured else []),
        ]
        for v in versions
    ]
    guard = traffic.get("guard")
    summary = {
        "stable": f"v{traffic['stable']}",
        "rollback to": f"v{traffic['rollback_to']}",
        **({"guard": _guard(guard, traffic["stable"])} if guard else {}),
        **({"rolled back": traffic["rollback_reason"]} if traffic.get("rollback_reason") else {}),
        **({"updated": date(traffic["updated"])} if traffic.get("updated") else {}),
    }
    return table(headers, rows) + "\n\n" + fields(summary)


def figures(f: dict | None) -> list[str]:
    """A version's figures under a split, as the cells of FIGURES."""
    if f is None:
        return ["-"] * len(FIGURES)
    return [str(f["requests"]), str(f["errors"]), ms(f.get("ttft_p50_s")), ms(f.get("ttft_p99_s"))]


def traffic_text(traffic: dict) -> str:
    shares = ", ".join(f"v{v} {w}%" for v, w in traffic["weights"].items())
    return f"{shares} (stable v{traffic['stable']})"


def version_label(version: int, traffic: dict) -> str:
    return f"{version} (stable)" if version == traffic["stable"] else str(version)


def _guard(guard: dict, stable: int) -> str:
    return (
        f"all traffic back to v{stable} once a canary served {guard['min_requests']} requests, if its error rate "
        f"> {guard['max_error_rate']:g} or its TTFT p99 > {guard['max_ttft_p99_ratio']:g}x v{stable}'s"
    )
