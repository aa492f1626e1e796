"""`mux batch -i input.jsonl -o output.jsonl`: a batch file (OpenAI's Batch API format) run in-process with no
server, as `vllm run-batch` does but with the adapters, or with `--url` on a running server through its Files and
Batch APIs. In-process, the lines run through the server's own batch runner and online route
(mux/server/batch_jobs.py), so in both modes each output line is the record a server's batch writes for it.

The output file holds one record per request line, in the input's order, failed lines included (their
`response.status_code` ≥ 400); it is written atomically once the batch has ended. Exit status: 0 when every line
succeeded, 3 when some failed, 1 when the batch failed as a whole (a bad file, a model that does not load, a
server's refusal: no output is written) or was cancelled or expired (with the output it has), 2 for a wrong
command line or policy file.
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
ENDED = ("completed", "failed", "cancelled", "expired")
POLL_S = 1.0  # --url: how often the batch's progress is asked for


def add_flags(b: argparse.ArgumentParser) -> None:
    b.add_argument("-i", "--input-file", required=True, type=Path, help="JSONL of request lines (OpenAI's format)")
    b.add_argument("-o", "--output-file", required=True, type=Path, help="JSONL of responses, one per request line")
    b.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (default: on a terminal)",
    )
    b.add_argument(
        "--url",
        default=None,
        help="run the file on this server (its Batch API) instead of in-process; the model, "
        "adapter and engine flags are then the server's",
    )
    b.add_argument("--key", default=None, help="with --url: API key, sent as a bearer token (default: $MUX_API_KEY)")
    b.add_argument("--timeout", type=float, default=60.0, help="with --url: seconds to wait for each answer")


def run(args: argparse.Namespace, engine_setup) -> int:
    """`engine_setup(args)` -> (policy, EngineConfig), for an in-process run."""
    try:
        data = args.input_file.read_bytes()
    except OSError as e:
        print(f"mux batch: cannot read {args.input_file}: {e.strerror}", file=sys.stderr)
        return 1
    if not args.output_file.parent.is_dir():
        print(f"mux batch: no directory {args.output_file.parent} for the output file", file=sys.stderr)
        return 1
    if args.url:
        return _remote(args, data)
    return _in_process(args, data, *engine_setup(args))


# ---- in-process --------------------------------------------------------------------------------
def _in_process(args: argparse.Namespace, data: bytes, policy, config) -> int:
    from mux.engine.engine import Engine
    from mux.server.app import ServerState
    from mux.server.batch_jobs import BatchJobs, parse_lines
    from mux.server.batches import line_executor
    from mux.server.limits import Limits
    from mux.server.openai import OpenAIRoutes

    _, errors = parse_lines(data, _endpoint(data), policy.batch.max_lines)  # before the model loads: fail fast
    if errors:
        return _failed(errors)
    work = Path(tempfile.mkdtemp(prefix=".mux-batch-", dir=args.output_file.parent))  # the runner's own store
    limits = Limits(policy.limits, policy.tenant_limits)
    state = ServerState(
        lambda: Engine(config),
        Path(args.adapter_dir),
        policy.pinned,
        limits=limits,
        batch_dir=work,
        batch_config=policy.batch,
    )
    try:
        state.load(recover=False)
        if state.engine is None:
            print(f"mux batch: the model did not load: {state.load_error}", file=sys.stderr)
            return 1
        jobs = BatchJobs(state.batch_store, state.batch_config, line_executor(OpenAIRoutes(state)))
        return asyncio.run(_run_jobs(args, data, state.batch_store, jobs))
    finally:
        if state.engine is not None:
            state.engine.stop()
        shutil.rmtree(work, ignore_errors=True)


async def _run_jobs(args: argparse.Namespace, data: bytes, store, jobs) -> int:
    from mux.errors import MuxError
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
    with _bar(args) as bar:
        while not await jobs.wait(batch["id"], timeout=0.2):
            _show(bar, store.batch(batch["id"])["request_counts"]["total"], jobs.lines.total())
    batch = store.batch(batch["id"])
    outputs = [store.batch_dir(batch["id"]) / name for name in (OUTPUT, ERRORS)]
    return _finish(args, data, batch, [p.read_bytes() for p in outputs if p.exists()], started)


# ---- on a server ------------------------------------------------------------------------------
def _remote(args: argparse.Namespace, data: bytes) -> int:
    from mux.client.http import ClientError, call, connect

    started = time.monotonic()
    try:
        with connect(args) as http:
            files = {"file": (args.input_file.name, data, "application/jsonl")}
            upload = call(http, "POST", "/v1/files", files=files, data={"purpose": "batch"}).json()
            body = {"input_file_id": upload["id"], "endpoint": _endpoint(data), "completion_window": "24h"}
            batch = call(http, "POST", "/v1/batches", json=body).json()
            try:
                with _bar(args) as bar:
                    while batch["status"] not in ENDED:
                        time.sleep(POLL_S)
                        batch = call(http, "GET", f"/v1/batches/{batch['id']}").json()
                        counts = batch["request_counts"]
                        _show(bar, counts["total"], counts["completed"] + counts["failed"])
            except KeyboardInterrupt:  # ^C cancels the batch: its output so far is kept
                batch = call(http, "POST", f"/v1/batches/{batch['id']}/cancel").json()
                print(f"mux batch: cancelling {batch['id']}", file=sys.stderr)
                while batch["status"] not in ENDED:
                    time.sleep(POLL_S)
                    batch = call(http, "GET", f"/v1/batches/{batch['id']}").json()
            ids = [batch[k] for k in ("output_file_id", "error_file_id") if batch.get(k)]
            outputs = [call(http, "GET", f"/v1/files/{file_id}/content").content for file_id in ids]
    except ClientError as e:
        print(f"mux batch: {e}", file=sys.stderr)
        return 1
    return _finish(args, data, batch, outputs, started)


# ---- both ---------------------------------------------------------------------------------------
def _finish(args: argparse.Namespace, data: bytes, batch: dict, outputs: list[bytes], started: float) -> int:
    """Write the output in the input's order (what the batch has of it) and say how it went."""
    from mux.runtime import durable

    if batch["status"] == "failed":
        return _failed((batch.get("errors") or {}).get("data") or [{"message": "the batch failed"}])
    records = {json.loads(line)["custom_id"]: line for output in outputs for line in output.splitlines()}
    order = [json.loads(raw)["custom_id"] for raw in data.splitlines() if raw.strip()]
    durable.write_bytes(args.output_file, b"".join(records[c] + b"\n" for c in order if c in records))
    counts = batch["request_counts"]
    print(
        f"mux batch: {batch['status']}: {counts['total']} lines, {counts['completed']} completed, "
        f"{counts['failed']} failed in {time.monotonic() - started:.1f} s; output in {args.output_file}",
        file=sys.stderr,
    )
    if batch["status"] != "completed":
        return 1
    return SOME_LINES_FAILED if counts["failed"] else 0


def _bar(args: argparse.Namespace):
    from tqdm import tqdm

    show = sys.stderr.isatty() if args.progress is None else args.progress
    return tqdm(desc="lines", unit="line", disable=not show, file=sys.stderr)


def _show(bar, total: int, done: int) -> None:
    bar.total = total or None
    bar.n = done
    bar.refresh()


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
