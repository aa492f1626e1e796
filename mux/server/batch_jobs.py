"""Batch jobs (OpenAI's Batch API): validate a JSONL file of requests, run its lines through the online route's own
code at batch priority, write each line's response durably, finalize; resume after a crash, cancel, expire.

Status: validating → in_progress → finalizing → completed, or failed (validation), cancelling → cancelled,
expired (past the completion window, with the output so far). A line's output is the body and status the online
route answers for its body; lines with status ≥ 400 go to the error file.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable

from mux import jsonread
from mux.errors import InvalidRequest, MuxError, NotFound, Overloaded
from mux.server.auth import Caller
from mux.server.batch_store import ERRORS, OUTPUT, BatchConfig, BatchStore

log = logging.getLogger(__name__)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
_WINDOW = re.compile(r"(\d{1,5})([smh])")  # OpenAI takes only "24h"; shorter windows help tests and cron jobs
_UNIT = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW_S = 24 * 3600
LIVE = ("validating", "in_progress", "finalizing", "cancelling")
SAVE_EVERY_S = 1.0  # request_counts are saved at most this often while lines finish (and at every status change)

# (caller, endpoint, body) -> (status, body) as the online route answers; raises Overloaded to be retried
Execute = Callable[[Caller, str, dict], Awaitable[tuple[int, dict]]]


def window_seconds(value) -> int:
    m = _WINDOW.fullmatch(value) if isinstance(value, str) else None
    seconds = int(m[1]) * _UNIT[m[2]] if m else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise InvalidRequest("`completion_window` must be '24h' (or a shorter duration such as '30m', '90s')")
    return seconds


def parse_lines(data: bytes, endpoint: str, max_lines: int) -> tuple[list[dict], list[dict]]:
    """(request lines, validation errors): the whole file is refused if any line is bad."""
    lines, errors, seen = [], [], set()
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = jsonread.loads(raw, f"line {number}", len(raw) + 1)
        except MuxError as e:
            errors.append(_error("invalid_json_line", str(e), number))
            continue
        problem = _line_problem(line, endpoint, seen)
        if problem:
            errors.append(_error(problem[0], problem[1], number))
            continue
        seen.add(line["custom_id"])
        lines.append(line)
        if len(lines) > max_lines:
            return [], [_error("too_many_requests", f"the file has more than {max_lines} request lines", number)]
    if not lines and not errors:
        errors.append(_error("empty_file", "the input file has no request lines", None))
    return lines, errors[:100]


def _line_problem(line, endpoint: str, seen: set) -> tuple[str, str] | None:
    if not isinstance(line, dict):
        return "invalid_request", "each line must be a JSON object"
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
        return "missing_custom_id", "each line needs a `custom_id` string (at most 512 characters)"
    if custom_id in seen:
        return "duplicate_custom_id", f"the custom_id {custom_id!r} is used twice"
    if line.get("method") != "POST":
        return "invalid_method", "`method` must be POST"
    if line.get("url") != endpoint:
        return "mismatched_endpoint", f"`url` {line.get('url')!r} is not the batch's endpoint {endpoint}"
    if not isinstance(line.get("body"), dict):
        return "invalid_body", "`body` must be a JSON object"
    return None


def _error(code: str, message: str, line: int | None) -> dict:
    return {"code": code, "message": message, "param": None, "line": line}


class BatchJobs:
    def __init__(self, store: BatchStore, config: BatchConfig, execute: Execute) -> None:
        self.store, self.config, self.execute = store, config, execute
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancel: dict[str, asyncio.Event] = {}
        self.lines = Counter()  # "completed" | "failed": lines finished since start
        self._tokens: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, completion tokens) of finished lines

    # ---- the API's verbs --------------------------------------------------------------------
    def create(self, caller: Caller, body: dict) -> dict:
        unknown = set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"}
        if unknown:
            raise InvalidRequest(f"unknown fields {sorted(unknown)}")
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise InvalidRequest(f"`endpoint` must be one of {', '.join(ENDPOINTS)}")
        window = window_seconds(body.get("completion_window"))
        metadata = body.get("metadata")
        if metadata is not None and not _metadata_ok(metadata):
            raise InvalidRequest("`metadata` is at most 16 string keys (≤ 64 chars) of string values (≤ 512 chars)")
        file_id = body.get("input_file_id")
        source = self.store.file(file_id) if isinstance(file_id, str) else None
        if source is None or not owns(caller, source):
            raise NotFound(f"No such File object: {file_id}")
        if source["purpose"] != "batch":
            raise InvalidRequest(f"the file {file_id} has purpose {source['purpose']!r}, not 'batch'")
        now = int(time.time())
        batch = {
            "id": f"batch_{uuid.uuid4().hex[:24]}",
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": body["completion_window"],
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "_created_ns": time.time_ns(),  # the order of batches made within one second (not shown)
            "in_progress_at": None,
            "expires_at": now + window,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
            "tenant": caller.tenant,
        }
        self.store.save_batch(batch)
        self.start(batch["id"])
        return batch

    def get(self, caller: Caller, batch_id: str) -> dict:
        batch = self.store.batch(batch_id)
        if not owns(caller, batch):
            raise NotFound(f"No such Batch object: {batch_id}")
        return batch

    def cancel(self, caller: Caller, batch_id: str) -> dict:
        batch = self.get(caller, batch_id)
        if batch["status"] in ("validating", "in_progress"):
            batch = {**batch, "status": "cancelling", "cancelling_at": int(time.time())}
            self.store.save_batch(batch)
            if batch_id in self._cancel:
                self._cancel[batch_id].set()
            else:
                self.start(batch_id)
        return batch

    def resume(self) -> list[str]:
        """At start: every batch a crash left running goes on where it was."""
        live = [b["id"] for b in self.store.batches() if b["status"] in LIVE]
        for batch_id in live:
            self.start(batch_id)
        return live

    def start(self, batch_id: str) -> None:
        self._cancel[batch_id] = asyncio.Event()
        self._tasks[batch_id] = asyncio.get_running_loop().create_task(self._run(batch_id))

    async def wait(self, batch_id: str, timeout: float | None = None) -> bool:
        """Whether the batch's runner has ended, after waiting for it at most `timeout` seconds."""
        task = self._tasks.get(batch_id)
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)
        return task is None or task.done()

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def stats(self) -> dict:
        now = time.time()
        recent = [n for t, n in self._tokens if now - t <= 10.0]
        return {
            "by_status": self.store.status_counts(),
            "lines_completed": self.lines["completed"],
            "lines_failed": self.lines["failed"],
            "tokens_per_s": sum(recent) / 10.0,
        }

    def live(self) -> list[dict]:
        """The running batches as the admin's stats show them, read from their records (so their counts are at
        most SAVE_EVERY_S old): for /admin/stats, not for every /metrics scrape."""
        keep = ("id", "tenant", "status", "endpoint", "created_at", "expires_at")
        batches = [self.store.batch(batch_id) for batch_id in sorted(self._tasks)]
        return [{**{k: b[k] for k in keep}, **b["request_counts"]} for b in batches]

    # ---- running one batch ------------------------------------------------------------------
    async def _run(self, batch_id: str) -> None:
        try:
            batch = self.store.batch(batch_id)
            if batch["status"] in ("validating", "in_progress"):
                lines, errors = await asyncio.to_thread(self._read_input, batch)
                batch = self.store.batch(batch_id)  # a cancel may have come meanwhile
                if errors and batch["status"] != "cancelling":
                    self._set(batch, "failed", errors={"object": "list", "data": errors})
                    return
                if batch["status"] == "validating":
                    counts = {"total": len(lines), "completed": 0, "failed": 0}
                    batch = self._set(batch, "in_progress", in_progress_at=int(time.time()), request_counts=counts)
                if batch["status"] == "in_progress":
                    batch = await self._run_lines(batch, lines)
            await self._finalize(batch)
        except asyncio.CancelledError:  # the server is stopping: the batch resumes at the next start
            raise
        except Exception:
            log.exception("batch %s failed", batch_id)
        finally:
            self._tasks.pop(batch_id, None)
            self._cancel.pop(batch_id, None)

    def _read_input(self, batch: dict) -> tuple[list[dict], list[dict]]:
        try:
            data = self.store.content_path(batch["input_file_id"]).read_bytes()
        except (NotFound, OSError):
            return [], [_error("missing_file", f"the input file {batch['input_file_id']} was deleted", None)]
        return parse_lines(data, batch["endpoint"], self.config.max_lines)

    async def _run_lines(self, batch: dict, lines: list[dict]) -> dict:
        done = await asyncio.to_thread(self.store.finished_lines, batch["id"])
        counts = {
            "total": len(lines),
            "completed": sum(s < 400 for s in done.values()),
            "failed": sum(s >= 400 for s in done.values()),
        }
        batch = {**batch, "request_counts": counts}
        caller = Caller(tenant=batch["tenant"], admin=batch["tenant"] is None)
        gate = asyncio.Semaphore(self.config.max_in_flight)
        saved = [time.monotonic()]

        async def one(line: dict) -> None:
            async with gate:
                status, body = await self._answer(caller, batch["endpoint"], line["body"])
                record = {
                    "id": f"batch_req_{uuid.uuid4().hex[:24]}",
                    "custom_id": line["custom_id"],
                    "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex[:24]}", "body": body},
                    "error": None,
                }
                # written here, not in a worker thread: cancelling the line cannot leave a write running behind it
                self.store.append(batch["id"], OUTPUT if status < 400 else ERRORS, record)
                outcome = "completed" if status < 400 else "failed"
                counts[outcome] += 1
                self.lines[outcome] += 1
                if status < 400:
                    self._tokens.append((time.time(), (body.get("usage") or {}).get("completion_tokens", 0)))
                if time.monotonic() - saved[0] > SAVE_EVERY_S:
                    saved[0] = time.monotonic()
                    self._save_counts(batch["id"], counts)

        tasks = [asyncio.ensure_future(one(line)) for line in lines if line["custom_id"] not in done]
        stopped = await self._wait(batch, tasks)
        batch = {**self.store.batch(batch["id"]), "request_counts": counts}
        if stopped == "expired":
            batch = self._set(batch, "finalizing", finalizing_at=int(time.time()), _expiring=True)
        elif stopped == "cancelled" or batch["status"] == "cancelling":
            batch = self._set(batch, "cancelling")
        else:
            batch = self._set(batch, "finalizing", finalizing_at=int(time.time()))
        return batch

    async def _wait(self, batch: dict, tasks: list[asyncio.Task]) -> str | None:
        """Until every line is done (None), the batch is cancelled or it expires: then the rest is cancelled."""
        cancel = asyncio.ensure_future(self._cancel[batch["id"]].wait())
        pending = set(tasks)
        outcome = None
        try:
            while pending:
                left = batch["expires_at"] - time.time()
                if left <= 0:
                    outcome = "expired"
                    break
                finished, pending = await asyncio.wait(
                    pending | {cancel}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(cancel)
                if cancel in finished:
                    outcome = "cancelled"
                    break
        finally:
            cancel.cancel()
            for task in pending:  # running lines end at the next step (their streams are cancelled)
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
        return outcome

    async def _answer(self, caller: Caller, endpoint: str, body: dict) -> tuple[int, dict]:
        """The online route's answer; a line over a limit or a full queue waits and tries again."""
        while True:
            try:
                return await self.execute(caller, endpoint, body)
            except Overloaded as e:
                await asyncio.sleep(min(e.retry_after, 5))

    async def _finalize(self, batch: dict) -> None:
        """Publish the output and error files, then the final status; a crash in between redoes this part."""
        if batch["status"] not in ("finalizing", "cancelling"):
            return
        outputs = {}
        for field, name in (("output_file_id", OUTPUT), ("error_file_id", ERRORS)):
            path = self.store.batch_dir(batch["id"]) / name
            if batch[field] is None and path.exists() and path.stat().st_size:
                copy = await asyncio.to_thread(self.store.staged_copy, path)
                added = self.store.add_file(batch["tenant"], f"{batch['id']}_{name}", "batch_output", copy)
                outputs[field] = added["id"]
        now = int(time.time())
        if batch["status"] == "cancelling":
            self._set(batch, "cancelled", cancelled_at=now, **outputs)
        elif batch.get("_expiring"):
            self._set(batch, "expired", expired_at=now, **outputs)
        else:
            self._set(batch, "completed", completed_at=now, **outputs)

    def _set(self, batch: dict, status: str, **fields) -> dict:
        """Save a new status over the stored record (which may hold a cancel this task has not seen)."""
        batch = {**self.store.batch(batch["id"]), "request_counts": batch["request_counts"], **fields, "status": status}
        if status == "failed":
            batch["failed_at"] = int(time.time())
        self.store.save_batch(batch)
        return batch

    def _save_counts(self, batch_id: str, counts: dict) -> None:
        batch = self.store.batch(batch_id)
        self.store.save_batch({**batch, "request_counts": dict(counts)})


def owns(caller: Caller, record: dict) -> bool:
    """The admin owns everything; a tenant its own files and batches."""
    return caller.admin or record.get("tenant") == caller.tenant


def _metadata_ok(metadata) -> bool:
    return (
        isinstance(metadata, dict)
        and len(metadata) <= 16
        and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items()
        )
    )
