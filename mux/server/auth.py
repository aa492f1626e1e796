"""API keys → callers, and who may see or use which adapter (invariant 5).

Keys are stored as "sha256:<hex>" and compared in constant time; with no keys configured the server is
open (and `mux serve` refuses a non-loopback address unless started with --insecure).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from dataclasses import dataclass

from mux.errors import AdapterNotFound, MuxError


class Unauthorized(MuxError):
    """No key, or a key nobody has (401)."""


class Forbidden(MuxError):
    """A valid key that may not do this (403), e.g. a tenant key on an admin route."""


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str | None  # None: admin, or anyone on an open server
    admin: bool


OPEN = Caller(tenant=None, admin=True)
DEFAULT_TENANT = "default"


class Auth:
    def __init__(
        self,
        admin_keys: tuple[str, ...] = (),
        tenant_keys: dict[str, tuple[str, ...]] | None = None,
        public: tuple[str, ...] = (),
    ) -> None:
        self._keys = [(k, Caller(None, True)) for k in admin_keys]
        self._keys += [(k, Caller(t, False)) for t, keys in (tenant_keys or {}).items() for k in keys]
        self.public = public  # adapter id patterns every caller may use, e.g. "demo/*"

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None) -> Caller:
        if not self.enabled:
            return OPEN
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        digest = hash_key(authorization[len("Bearer ") :].strip())
        found = None
        for stored, caller in self._keys:  # every key is compared: time does not depend on which matched
            if hmac.compare_digest(stored, digest):
                found = caller
        if found is None:
            raise Unauthorized("invalid API key")
        return found

    def require_admin(self, caller: Caller) -> None:
        if not caller.admin:
            raise Forbidden("this route needs the admin key")

    def adapter_id(self, caller: Caller, model: str) -> str:
        """The full `<tenant>/<name>` a caller means: tenants may say plain `name` for their own adapters."""
        if "/" not in model:  # without a tenant key, plain names live under `default/`
            return f"{caller.tenant or DEFAULT_TENANT}/{model}"
        return model

    def can_use(self, caller: Caller, adapter_id: str) -> bool:
        if caller.admin or adapter_id.split("/", 1)[0] == caller.tenant:
            return True
        return any(fnmatch.fnmatchcase(adapter_id, pattern) for pattern in self.public)

    def check(self, caller: Caller, adapter_id: str) -> None:
        """Another tenant's adapter is reported exactly like a missing one: 404, nothing revealed."""
        if not self.can_use(caller, adapter_id):
            raise AdapterNotFound(f"The model `{adapter_id}` does not exist.")
