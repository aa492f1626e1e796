"""Adapter management routes: upload (multipart), list, show, delete, and vLLM's load/unload.

An upload is validated by the engine's own adapter reader (the same refusals as at request time), staged
outside the served tree and published atomically as a new version; a failed upload leaves nothing. vLLM's
`/v1/load_lora_adapter` copies a server-side adapter in the same way; `/v1/unload_lora_adapter` removes only such
copies (the meta's `source`): an uploaded adapter or one placed in the repository is its tenant's only copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mux.errors import AdapterNotFound, Conflict, InvalidAdapter, InvalidRequest, MuxError
from mux.lora.adapter import CONFIG_FILE, MAX_CONFIG_BYTES, PICKLE_REFUSED, WEIGHTS_FILE
from mux.lora.repository import valid_part
from mux.server.archive import extract_adapter
from mux.server.auth import DEFAULT_TENANT, Forbidden
from mux.server.multipart import TooLarge, limited, save_upload
from mux.server.openai import error_response, read_json
from mux.server.rollouts import rollout_state

MAX_WEIGHTS_BYTES = 1 << 30  # one adapter's safetensors
VLLM_LOADED = "load_lora_adapter"  # the meta's `source` of a copy made by /v1/load_lora_adapter
MAX_BODY_BYTES = MAX_WEIGHTS_BYTES + (4 << 20)


class InUse(Conflict):
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
            Route("/v1/load_lora_adapter", self.vllm_load, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.vllm_unload, methods=["POST"]),
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
            request = Request(request.scope, limited(request.receive, MAX_BODY_BYTES))  # chunked bodies too
            async with request.form(max_files=4, max_fields=8) as form:
                adapter_id = self._own(caller, self._adapter_id(caller, form.get("name")))
                activate = _flag(form.get("activate"), "activate")
                staged = self.state.repository.staging_dir()
                archive = form.get("archive")
                if isinstance(archive, UploadFile):
                    await run_in_threadpool(
                        extract_adapter, archive.file, archive.filename or "archive", staged, MAX_WEIGHTS_BYTES
                    )
                else:
                    await self._save_files(form, staged)
            meta = await self._publish(adapter_id, staged, activate=activate)
            staged = None
            return JSONResponse(meta, status_code=201)
        except TooLarge:
            return _too_large()
        except MuxError as e:
            return error_response(e)
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)

    @staticmethod
    async def _save_files(form, staged: Path) -> None:
        if "adapter_model.bin" in form:
            raise InvalidAdapter(PICKLE_REFUSED)
        files = {f: form.get(f) for f in (CONFIG_FILE, WEIGHTS_FILE)}
        for field, value in files.items():
            if not isinstance(value, UploadFile):
                raise InvalidAdapter(f"missing file field `{field}` (or send one `archive` .tar.gz/.zip)")
        if files[CONFIG_FILE].size > MAX_CONFIG_BYTES or files[WEIGHTS_FILE].size > MAX_WEIGHTS_BYTES:
            raise TooLarge()
        for field, upload in files.items():
            await run_in_threadpool(save_upload, upload, staged / field)

    async def _publish(self, adapter_id: str, staged: Path, source: str = "upload", activate: bool = True) -> dict:
        """Validate a staged adapter with the engine's own reader, then install it as the next version (its meta
        says how it came: `upload` or `load_lora_adapter`); `activate`: it takes all traffic."""
        engine = self.state.engine
        ref = await run_in_threadpool(engine.prepare_adapter, staged)
        weights = engine.adapters.host.get(ref.key)
        info = {
            "rank": ref.rank,
            "target_modules": list(weights.target_modules) if weights else None,
            "source": source,
        }
        tenant, name = adapter_id.split("/", 1)
        meta = await run_in_threadpool(self.state.repository.install, tenant, name, staged, info, activate)
        engine.adapters.forget(ref.path)  # the host copy was keyed by the staging path
        return meta

    # ---- vLLM drop-in: /v1/load_lora_adapter, /v1/unload_lora_adapter (admin) ------------------
    async def vllm_load(self, request: Request) -> Response:
        staged: Path | None = None
        try:
            caller = self._caller(request)
            self.state.auth.require_admin(caller)
            body = await read_json(request)
            lora_name, lora_path = body.get("lora_name"), body.get("lora_path")
            if not (isinstance(lora_name, str) and lora_name and isinstance(lora_path, str) and lora_path):
                raise InvalidRequest("Both 'lora_name' and 'lora_path' must be provided.")
            adapter_id = self._adapter_id(caller, lora_name)
            if adapter_id in self.state.repository.ids():
                raise InvalidRequest(f"The lora adapter '{lora_name}' has already been loaded.")
            source = self._allowed(Path(lora_path))
            if not _is_file(source / CONFIG_FILE):
                raise AdapterNotFound(f"Loading lora {lora_name} failed: No adapter found for {lora_path}")
            staged = self.state.repository.staging_dir()
            for name in (CONFIG_FILE, WEIGHTS_FILE):  # a pickle-only adapter fails validation, never unpickled
                if (source / name).is_file():
                    await run_in_threadpool(shutil.copyfile, source / name, staged / name)
            await self._publish(adapter_id, staged, VLLM_LOADED)
            staged = None
            return PlainTextResponse(f"Success: LoRA adapter '{lora_name}' added successfully.")
        except MuxError as e:
            return error_response(e)
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)

    async def vllm_unload(self, request: Request) -> Response:
        try:
            caller = self._caller(request)
            self.state.auth.require_admin(caller)
            body = await read_json(request)
            lora_name = body.get("lora_name")
            if not isinstance(lora_name, str) or not lora_name:
                raise InvalidRequest("'lora_name' must be provided.")
            adapter_id = self.state.auth.adapter_id(caller, lora_name)
            repo = self.state.repository
            if adapter_id not in repo.ids():
                raise AdapterNotFound(f"The lora adapter '{lora_name}' cannot be found.")
            if repo.meta(adapter_id).get("source") != VLLM_LOADED:  # its only copy: unloading must not delete it
                raise InvalidRequest(
                    f"The lora adapter '{lora_name}' was not loaded with /v1/load_lora_adapter, so it is not unloaded "
                    f"(that would delete its only copy): delete it with DELETE /v1/adapters/{adapter_id}, or free its "
                    f"memory with POST /v2/repository/models/{adapter_id}/unload"
                )
            await self._remove(adapter_id)
            return PlainTextResponse(f"Success: LoRA adapter '{lora_name}' removed successfully.")
        except MuxError as e:
            return error_response(e)

    def _allowed(self, path: Path) -> Path:
        """Server-side paths must resolve inside an allowed directory (symlinks and `..` included)."""
        if "\0" in str(path):
            raise InvalidRequest("lora_path must not contain NUL bytes")
        resolved = path.resolve()
        for root in self.state.allowed_lora_dirs:
            if resolved.is_relative_to(Path(root).resolve()):
                return resolved
        raise Forbidden(f"lora_path {path} is outside the allowed directories")

    def _adapter_id(self, caller, name) -> str:
        if not isinstance(name, str) or not name:
            raise InvalidRequest("field `name` is required (`name`, or `tenant/name` with the admin key)")
        tenant, _, short = name.rpartition("/")
        tenant = tenant or caller.tenant or DEFAULT_TENANT
        if not (valid_part(tenant) and valid_part(short)):
            raise InvalidRequest(
                "adapter names are 1-64 characters of letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        base = self.state.base_name
        if base in (name, short, f"{tenant}/{short}"):  # requests naming it would reach the base model instead
            raise InvalidRequest(f"the adapter name `{name}` collides with the base model's name `{base}`")
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
            name = adapter_id.partition("@")[0]
            self.state.auth.check(caller, name)
            meta = self.state.repository.meta(adapter_id)
            return JSONResponse({**meta, **rollout_state(self.state, name)})
        except MuxError as e:
            return error_response(e)

    async def delete(self, request: Request) -> Response:
        """Refused with 409 while any request uses (or an operator pinned) the adapter; never drains. `name@N`
        deletes version N only, refused with 409 while its traffic split may send requests to it."""
        try:
            caller = self._caller(request)
            adapter_id = self._own(caller, f"{request.path_params['tenant']}/{request.path_params['name']}")
            if "@" in adapter_id:
                return JSONResponse(await self._remove_version(adapter_id))
            await self._remove(adapter_id)
            return JSONResponse({"id": adapter_id, "deleted": True})
        except MuxError as e:
            return error_response(e)

    async def _remove_version(self, pinned: str) -> dict:
        repo, manager = self.state.repository, self.state.engine.adapters
        path = repo.path(pinned)  # 404 for a version that is not there
        adapter_id, version = repo.identify(path)["id"], int(pinned.rpartition("@")[2])
        if not manager.retire(path):
            raise InUse(f"version {version} of {adapter_id} is serving requests or pinned; retry when idle")
        try:
            await run_in_threadpool(repo.delete_version, adapter_id, version)
        finally:
            manager.forget(path)
        return {"id": adapter_id, "version": version, "deleted": True}

    async def _remove(self, adapter_id: str) -> None:
        repo, manager = self.state.repository, self.state.engine.adapters
        adapter_dir = repo.directory(adapter_id)
        if not manager.retire(adapter_dir):
            raise InUse(f"adapter {adapter_id} is serving requests or pinned; retry when idle")
        try:
            await run_in_threadpool(repo.delete, adapter_id)
        finally:
            manager.forget(adapter_dir)  # ends the retirement too


def _flag(value, field: str) -> bool:
    """A form boolean: absent is true; `true`/`false` (also 1/0, yes/no, any case)."""
    if value is None:
        return True
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise InvalidRequest(f"form field `{field}` must be true or false")


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


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system is no adapter either
        return False
