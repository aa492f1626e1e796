"""Rollout routes: split an adapter's traffic between its versions, promote one, roll back.

    PUT  /v1/adapters/{tenant}/{name}/traffic   {"weights": {"1": 99, "2": 1}, "guard": {...}}
    POST /v1/adapters/{tenant}/{name}/promote   {"version": 2}
    POST /v1/adapters/{tenant}/{name}/rollback

Only the adapter's tenant (or the admin) may change them; to anyone else the adapter does not exist (404). Each
answers the adapter's rollout state, as `GET /v1/adapters/{tenant}/{name}` shows it.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mux import jsonread
from mux.errors import AdapterNotFound, InvalidRequest, MuxError
from mux.lora.splits import Split, parse_guard, parse_weights
from mux.server.openai import MAX_JSON_BYTES, error_response, read_body

BASE = "/v1/adapters/{tenant}/{name}"


class RolloutRoutes:
    def __init__(self, state) -> None:
        self.state = state

    def routes(self) -> list[Route]:
        return [
            Route(f"{BASE}/traffic", self.traffic, methods=["PUT"]),
            Route(f"{BASE}/promote", self.promote, methods=["POST"]),
            Route(f"{BASE}/rollback", self.rollback, methods=["POST"]),
        ]

    async def traffic(self, request: Request) -> Response:
        async def change(body: dict):
            _only(body, {"weights", "guard"})
            guard = parse_guard(body.get("guard"))
            return lambda split, versions: split.with_weights(parse_weights(body.get("weights"), versions), guard)

        return await self._change(request, change)

    async def promote(self, request: Request) -> Response:
        async def change(body: dict):
            _only(body, {"version"})
            version = body.get("version")
            if isinstance(version, bool) or not isinstance(version, int):
                raise InvalidRequest('`version` must be an integer, e.g. {"version": 2}')
            return lambda split, versions: split.promoted(_existing(version, versions))

        return await self._change(request, change)

    async def rollback(self, request: Request) -> Response:
        async def change(body: dict):
            _only(body, set())
            return lambda split, versions: split.rolled_back()

        return await self._change(request, change, body_optional=True)

    async def _change(self, request: Request, make_change, body_optional: bool = False) -> Response:
        try:
            caller = self.state.auth.identify(request.headers.get("authorization"))
            adapter_id = f"{request.path_params['tenant']}/{request.path_params['name']}"
            if not (caller.admin or request.path_params["tenant"] == caller.tenant):
                raise AdapterNotFound(f"The model `{adapter_id}` does not exist.")
            self.state.repository.directory(adapter_id)  # 404 before the body is looked at
            change = await make_change(await _body(request, body_optional))
            await run_in_threadpool(self.state.repository.update_split, adapter_id, change)
            return JSONResponse(rollout_state(self.state, adapter_id))
        except MuxError as e:
            return error_response(e)


def rollout_state(state, adapter_id: str) -> dict:
    """An adapter's versions (with their figures under the split) and its split."""
    repo, manager = state.repository, state.engine.adapters
    split: Split = repo.split(adapter_id)
    figures = state.versions.report(adapter_id, split) if repo.traffic(adapter_id) is not None else {}
    versions = []
    for number, path in repo.versions(adapter_id).items():
        meta = repo.meta_of(adapter_id, path)
        versions.append(
            {
                "version": number,
                **{k: meta.get(k) for k in ("sha256", "bytes", "rank", "target_modules", "created", "source")},
                "weight": split.weights.get(number, 0),
                "in_flight": manager.in_flight(path),
                **({"figures": figures[str(number)]} if str(number) in figures else {}),
            }
        )
    return {"id": adapter_id, "versions": versions, "traffic": split.to_json()}


async def _body(request: Request, optional: bool) -> dict:
    raw = await read_body(request)
    if optional and not raw.strip():
        return {}
    body = jsonread.loads(raw, "the request body", MAX_JSON_BYTES)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _only(body: dict, allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise InvalidRequest(f"unknown fields {sorted(unknown)} (this route takes {sorted(allowed) or 'none'})")


def _existing(version: int, versions: set[int]) -> int:
    if version not in versions:
        raise InvalidRequest(f"version {version} does not exist (versions: {sorted(versions)})")
    return version
