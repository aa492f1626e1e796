"""Adapter management routes: upload (multipart), list, show, delete.

An upload is validated by the engine's own adapter reader (the same refusals as at request time), staged
outside the served tree and published atomically as a new version; a failed upload leaves nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mux.errors import AdapterNotFound, InvalidAdapter, InvalidRequest, MuxError
from mux.lora.adapter import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE
from mux.lora.repository import valid_part
from mux.server.openai import error_response

MAX_WEIGHTS_BYTES = 1 << 30  # one adapter's safetensors
MAX_BODY_BYTES = MAX_WEIGHTS_BYTES + (4 << 20)


class InUse(MuxError):
    """The adapter is serving requests (409)."""


class AdapterRoutes:
    def __init__(self, state) -> None:
        self.state = state

    def routes(self) -> list[Route]:
        return [
            Route("/v1/adapters", self.upload, methods=["POST"]),
            Route("/v1/adapters", self.list, methods=["GET"]),
            Route("/v1/adapters/{tenant}/{name}", self.show, methods=["GET"]),
            Route("/v1/adapters/{tenant}/{name}", self.delete, methods=["DELETE"]),
        ]

    def _caller(self, request: Request):
        return self.state.auth.identify(request.headers.get("authorization"))

    @staticmethod
    def _own(caller, adapter_id: str) -> str:
        """Writes (upload, delete) need ownership (or the admin key); others' adapters look absent: 404."""
        if not (caller.admin or adapter_id.split("/", 1)[0] == caller.tenant):
            raise AdapterNotFound(f"The model `{adapter_id}` does not exist.")
        return adapter_id

    async def upload(self, request: Request) -> Response:
        staged: Path | None = None
        try:
            caller = self._caller(request)
            if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
                return _too_large()
            async with request.form(max_files=4, max_fields=8) as form:
                adapter_id = self._own(caller, self._adapter_id(caller, form.get("name")))
                if "archive" in form:
                    raise InvalidAdapter(
                        "archive uploads are not supported yet: send adapter_config.json and "
                        "adapter_model.safetensors as two files"
                    )
                if "adapter_model.bin" in form:
                    raise InvalidAdapter(
                        "pickle weights (adapter_model.bin) are never loaded; upload adapter_model.safetensors"
                    )
                files = {f: form.get(f) for f in (CONFIG_FILE, WEIGHTS_FILE)}
                for field, value in files.items():
                    if not isinstance(value, UploadFile):
                        raise InvalidAdapter(f"missing file field `{field}`")
                if files[CONFIG_FILE].size > MAX_CONFIG_BYTES or files[WEIGHTS_FILE].size > MAX_WEIGHTS_BYTES:
                    return _too_large()
                staged = self.state.repository.staging_dir()
                for field, upload in files.items():
                    await run_in_threadpool(_save, upload, staged / field)
            engine = self.state.engine
            ref = await run_in_threadpool(engine.prepare_adapter, staged)  # the engine's own validation
            weights = engine.adapters.host.get(ref.key)
            info = {"rank": ref.rank, "target_modules": list(weights.target_modules) if weights else None}
            tenant, name = adapter_id.split("/", 1)
            meta = await run_in_threadpool(self.state.repository.install, tenant, name, staged, info)
            staged = None
            engine.adapters.forget(ref.path)  # the host copy was keyed by the staging path
            return JSONResponse(meta, status_code=201)
        except MuxError as e:
            return error_response(e)
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)

    @staticmethod
    def _adapter_id(caller, name) -> str:
        if not isinstance(name, str) or not name:
            raise InvalidRequest("field `name` is required (`name`, or `tenant/name` with the admin key)")
        tenant, _, short = name.rpartition("/")
        tenant = tenant or caller.tenant
        if tenant is None:
            raise InvalidRequest("without a tenant key, `name` must be `tenant/name`")
        if not (valid_part(tenant) and valid_part(short)):
            raise InvalidRequest(
                "adapter names are 1-64 characters of letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        return f"{tenant}/{short}"

    async def list(self, request: Request) -> Response:
        try:
            caller = self._caller(request)
        except MuxError as e:
            return error_response(e)
        repo = self.state.repository
        data = [repo.meta(a) for a in repo.ids() if self.state.auth.can_use(caller, a)]
        return JSONResponse({"object": "list", "data": data})

    async def show(self, request: Request) -> Response:
        try:
            caller = self._caller(request)
            adapter_id = f"{request.path_params['tenant']}/{request.path_params['name']}"
            self.state.auth.check(caller, adapter_id)
            return JSONResponse(self.state.repository.meta(adapter_id))
        except MuxError as e:
            return error_response(e)

    async def delete(self, request: Request) -> Response:
        """Refused with 409 while any request uses (or an operator pinned) the adapter; never drains."""
        try:
            caller = self._caller(request)
            adapter_id = self._own(caller, f"{request.path_params['tenant']}/{request.path_params['name']}")
            repo, manager = self.state.repository, self.state.engine.adapters
            adapter_dir = repo.directory(adapter_id)
            if manager.in_use(adapter_dir):
                raise InUse(f"adapter {adapter_id} is serving requests or pinned; retry when idle")
            repo.delete(adapter_id)
            manager.forget(adapter_dir)
            return JSONResponse({"id": adapter_id, "deleted": True})
        except InUse as e:
            return JSONResponse(
                {"error": {"message": str(e), "type": "ConflictError", "param": None, "code": 409}}, status_code=409
            )
        except MuxError as e:
            return error_response(e)


def _save(upload: UploadFile, dst: Path) -> None:
    upload.file.seek(0)
    with open(dst, "wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)


def _too_large() -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "message": f"upload too large (adapter_config.json ≤ {MAX_CONFIG_BYTES} bytes, "
                f"adapter_model.safetensors ≤ {MAX_WEIGHTS_BYTES} bytes)",
                "type": "BadRequestError",
                "param": None,
                "code": 413,
            }
        },
        status_code=413,
    )
