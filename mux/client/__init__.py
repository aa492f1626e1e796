"""`mux adapters ...`, `mux rollout ...` and `mux stats`: commands that speak HTTP to a running server (`--url` /
MUX_URL, `--key` / MUX_API_KEY). Tables for people, the server's own JSON with `--json`; a refusal prints the
server's message and exits with status 1."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TYPE_CHECKING

from mux.client import adapters, rollout, stats
from mux.client.http import DEFAULT_URL, ClientError, connect

if TYPE_CHECKING:  # imported when a command runs: `mux serve` does not need httpx
    import httpx

__all__ = ["COMMANDS", "ClientError", "add_commands", "run"]

COMMANDS = ("adapters", "rollout", "stats")
VERBS = {"adapters": adapters.VERBS, "rollout": rollout.VERBS}


def add_commands(sub) -> None:
    """Add `adapters`, `rollout` and `stats` to the `mux` parser's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help=f"the server (default: $MUX_URL, else {DEFAULT_URL})")
    common.add_argument("--key", default=None, help="API key, sent as a bearer token (default: $MUX_API_KEY)")
    common.add_argument("--json", action="store_true", help="print the server's JSON instead of a table")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an answer (default 60)")
    adapters.add_parser(sub, common)
    rollout.add_parser(sub, common)
    stats.add_parser(sub, common)


def run(args: argparse.Namespace, http: httpx.Client | None = None) -> int:
    """Run a client command; `http` replaces the client built from --url/--key (tests)."""
    try:
        with contextlib.ExitStack() as stack:
            if http is None:
                http = stack.enter_context(connect(args))
            if args.command == "stats":
                return stats.run(http, args)
            return VERBS[args.command][args.verb](http, args)
    except ClientError as e:
        print(f"mux: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # --watch ends here, so does a ^C during an upload
        return 0 if args.command == "stats" else 130
