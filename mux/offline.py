"""`mux batch -i input.jsonl -o output.jsonl`: a batch file (OpenAI's Batch API format) run in-process with no
server, as `vllm run-batch` does, but with the adapters: each line's `body.model` names the base model or an
adapter of the adapter directory. The lines run through the server's own batch runner and online route
(mux/server/batch_jobs.py), so each output line is the record the server's batch would write for it.

The output file holds one record per request line, in the input's order, failed lines included (their
`response.status_code` ≥ 400); it is written atomically once every line is done. Exit status: 0 when every line
succeeded, 3 when some failed, 1 when the batch failed as a whole (a bad file, a model that does not load: no
output is written), 2 for a wrong command line or policy file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

SOME_LINES_FAILED = 3


def add_flags(b: argparse.ArgumentParser) -> None:
    b.add_argument("-i", "--input-file", required=True, type=Path, help="JSONL of request lines (OpenAI's format)")
    b.add_argument("-o", "--output-file", required=True, type=Path, help="JSONL of responses, one per request line")
    b.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (default: on a terminal)",
    )


def run(args: argparse.Namespace, policy, config) -> int:
    from mux.engine.engine import Engine
    from mux.server.app import ServerState
    from mux.server.batch_jobs import BatchJobs, parse_lines
    from mux.server.batches import line_executor
    from mux.server.limits import Limits
    from mux.server.openai import OpenAIRoutes

    try:
        data = args.input_file.read_bytes()
    except OSError as e:
        print(f"mux batch: cannot read {args.input_file}: {e.strerror}", file=sys.stderr)
        return 1
    _, errors = parse_lines(data, _endpoint(data), policy.batch.max_lines)  # before the model loads: fail fast
    if errors:
        return _failed(errors)
    if not args.output_file.parent.is_dir():
        print(f"mux batch: no directory {args.output_file.parent} for the output file", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix=".mux-batch-", dir=args.output_file.parent))  # the runner's own store
    limits = Limits(policy.limits, policy.tenant_limits)
    state = ServerState(lambda: None, Path(args.adapter_dir), limits=limits, batch_dir=work, batch_config=policy.batch)
    try:
        try:  # not ServerState.load: it would tidy the adapter directory, which a running server may be writing
            state.engine = Engine(config)
            for adapter_id in policy.pinned:
                state.engine.adapters.pin(state.repository.path(adapter_id))
            state.engine.start()
        except Exception as e:
            print(f"mux batch: the model did not load: {e}", file=sys.stderr)
            return 1
        jobs = BatchJobs(state.batch_store, state.batch_config, line_executor(OpenAIRoutes(state)))
        return asyncio.run(_run(args, data, state.batch_store, jobs))
    finally:
        if state.engine is not None:
            state.engine.stop()
        shutil.rmtree(work, ignore_errors=True)


async def _run(args: argparse.Namespace, data: bytes, store, jobs) -> int:
    from tqdm import tqdm

    from mux.errors import MuxError
    from mux.runtime import durable
    from mux.server.auth import Caller
    from mux.server.batch_store import ERRORS, OUTPUT

    source = store.staged_path()
    source.write_bytes(data)
    added = store.add_file(None, args.input_file.name, "batch", source)
    body = {"input_file_id": added["id"], "endpoint": _endpoint(data), "completion_window": "24h"}
    started = time.monotonic()
    try:
        batch = jobs.create(Caller(tenant=None, admin=True), body)
    except MuxError as e:
        print(f"mux batch: {e}", file=sys.stderr)
        return 1
    show = sys.stderr.isatty() if args.progress is None else args.progress
    with tqdm(desc="lines", unit="line", disable=not show, file=sys.stderr) as bar:
        while not await jobs.wait(batch["id"], timeout=0.2):
            bar.total = store.batch(batch["id"])["request_counts"]["total"] or None
            bar.n = jobs.lines.total()
            bar.refresh()
    batch = store.batch(batch["id"])
    if batch["status"] != "completed":
        return _failed((batch.get("errors") or {}).get("data", [{"message": f"the batch ended {batch['status']}"}]))
    records = {}
    for name in (OUTPUT, ERRORS):
        path = store.batch_dir(batch["id"]) / name
        for line in path.read_bytes().splitlines() if path.exists() else ():
            record = json.loads(line)
            records[record["custom_id"]] = line
    order = [json.loads(raw)["custom_id"] for raw in data.splitlines() if raw.strip()]
    durable.write_bytes(args.output_file, b"".join(records[c] + b"\n" for c in order))
    counts = batch["request_counts"]
    print(
        f"mux batch: {counts['total']} lines, {counts['completed']} completed, {counts['failed']} failed in "
        f"{time.monotonic() - started:.1f} s; output in {args.output_file}",
        file=sys.stderr,
    )
    return SOME_LINES_FAILED if counts["failed"] else 0


def _failed(errors: list[dict]) -> int:
    for error in errors:
        where = f"line {error['line']}: " if error.get("line") and not error["message"].startswith("line ") else ""
        print(f"mux batch: {where}{error['message']}", file=sys.stderr)
    return 1


def _endpoint(data: bytes) -> str:
    """The first line's `url` (every line must name the same one, as in a server's batch)."""
    for raw in data.splitlines():
        try:
            url = json.loads(raw).get("url")
        except (ValueError, AttributeError):
            break  # validation names the bad line
        if isinstance(url, str):
            return url
    return "/v1/chat/completions"
