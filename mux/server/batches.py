"""OpenAI's Files and Batch APIs, so the `openai` SDK's `files` and `batches` work unmodified.

    POST /v1/files (multipart `file`, `purpose=batch`)   GET /v1/files   GET|DELETE /v1/files/{id}
    GET /v1/files/{id}/content
    POST /v1/batches   GET /v1/batches (`after`, `limit`)   GET /v1/batches/{id}   POST /v1/batches/{id}/cancel

A tenant sees and cancels only its own files and batches (another's answer 404); the admin sees all.
"""

from __future__ import annotations

import json

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from mux.errors import InvalidRequest, MuxError, NotFound, Overloaded
from mux.server.batch_jobs import BatchJobs, owns
from mux.server.batch_store import public
from mux.server.multipart import TooLarge, limited, save_upload
from mux.server.openai import error_body, error_response, read_json

PURPOSES = ("batch",)


class BatchRoutes:
    def __init__(self, state) -> None:
        self.state = state

    @property
    def jobs(self) -> BatchJobs:
        return self.state.batch_jobs

    def routes(self) -> list[Route]:
        return [
            Route("/v1/files", self.upload, methods=["POST"]),
            Route("/v1/files", self.list_files, methods=["GET"]),
            Route("/v1/files/{file_id}", self.get_file, methods=["GET"]),
            Route("/v1/files/{file_id}", self.delete_file, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", self.content, methods=["GET"]),
            Route("/v1/batches", self.create, methods=["POST"]),
            Route("/v1/batches", self.list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self.get_batch, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self.cancel, methods=["POST"]),
        ]

    def _caller(self, request: Request):
        return self.state.auth.identify(request.headers.get("authorization"))

    # ---- files --------------------------------------------------------------------------------
    async def upload(self, request: Request) -> Response:
        store, limit = self.jobs.store, self.jobs.config.max_file_bytes
        tmp = None
        try:
            caller = self._caller(request)
            if int(request.headers.get("content-length") or 0) > limit + (1 << 20):
                raise TooLarge()
            request = Request(request.scope, limited(request.receive, limit + (1 << 20)))
            async with request.form(max_files=1, max_fields=4, max_part_size=1 << 20) as form:
                purpose, upload = form.get("purpose"), form.get("file")
                if purpose not in PURPOSES:
                    raise InvalidRequest(f"`purpose` must be one of {', '.join(PURPOSES)}")
                if not isinstance(upload, UploadFile):
                    raise InvalidRequest("the multipart field `file` is required")
                if upload.size is not None and upload.size > limit:
                    raise TooLarge()
                tmp = store.staged_path()
                await run_in_threadpool(save_upload, upload, tmp)
                name = (upload.filename or "input.jsonl")[:255]
            meta = await run_in_threadpool(store.add_file, caller.tenant, name, purpose, tmp)
            tmp = None
            return JSONResponse(public(meta))
        except TooLarge:
            return _too_large(limit)
        except MuxError as e:
            return error_response(e)
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    async def list_files(self, request: Request) -> Response:
        try:
            caller = self._caller(request)
        except MuxError as e:
            return error_response(e)
        purpose = request.query_params.get("purpose")
        files = [
            public(f)
            for f in self.jobs.store.files()
            if owns(caller, f) and (purpose is None or f["purpose"] == purpose)
        ]
        return JSONResponse({"object": "list", "data": files, "has_more": False})

    def _file(self, request: Request) -> dict:
        caller = self._caller(request)
        file_id = request.path_params["file_id"]
        meta = self.jobs.store.file(file_id)
        if not owns(caller, meta):
            raise NotFound(f"No such File object: {file_id}")
        return meta

    async def get_file(self, request: Request) -> Response:
        try:
            return JSONResponse(public(self._file(request)))
        except MuxError as e:
            return error_response(e)

    async def content(self, request: Request) -> Response:
        try:
            meta = self._file(request)
            return FileResponse(self.jobs.store.content_path(meta["id"]), media_type="application/octet-stream")
        except MuxError as e:
            return error_response(e)

    async def delete_file(self, request: Request) -> Response:
        try:
            meta = self._file(request)
            await run_in_threadpool(self.jobs.store.delete_file, meta["id"])
            return JSONResponse({"id": meta["id"], "object": "file", "deleted": True})
        except MuxError as e:
            return error_response(e)

    # ---- batches --------------------------------------------------------------------------------
    async def create(self, request: Request) -> Response:
        try:
            batch = self.jobs.create(self._caller(request), await read_json(request))
            return JSONResponse(public(batch))
        except MuxError as e:
            return error_response(e)

    async def get_batch(self, request: Request) -> Response:
        try:
            return JSONResponse(public(self.jobs.get(self._caller(request), request.path_params["batch_id"])))
        except MuxError as e:
            return error_response(e)

    async def cancel(self, request: Request) -> Response:
        try:
            return JSONResponse(public(self.jobs.cancel(self._caller(request), request.path_params["batch_id"])))
        except MuxError as e:
            return error_response(e)

    async def list_batches(self, request: Request) -> Response:
        try:
            caller = self._caller(request)
            limit = _limit(request.query_params.get("limit"))
        except MuxError as e:
            return error_response(e)
        batches = [b for b in reversed(self.jobs.store.batches()) if owns(caller, b)]  # newest first
        after = request.query_params.get("after")
        if after is not None:
            ids = [b["id"] for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        page = [public(b) for b in batches[:limit]]
        return JSONResponse(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(batches) > limit,
            }
        )


def line_executor(openai_routes):
    """What a batch line runs: the online route's own code, at batch priority, answered as (status, body)."""

    async def execute(caller, endpoint: str, body: dict) -> tuple[int, dict]:
        try:
            response = await openai_routes.answer(caller, body, chat=endpoint == "/v1/chat/completions", batch=True)
        except MuxError as e:
            if isinstance(e, Overloaded):  # the job waits and tries again
                raise
            return error_body(e)
        return response.status_code, json.loads(response.body)

    return execute


def _limit(value) -> int:
    if value is None:
        return 20
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= 100):
        raise InvalidRequest("`limit` must be an integer from 1 to 100")
    return int(value)


def _too_large(limit: int) -> JSONResponse:
    message = f"the file is over the {limit}-byte limit of this server"
    body = {"error": {"message": message, "type": "BadRequestError", "param": "file", "code": 413}}
    return JSONResponse(body, status_code=413)
