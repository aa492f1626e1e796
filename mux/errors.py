"""The one exception hierarchy; each protocol maps it to status codes in one place."""

from __future__ import annotations


class MuxError(Exception):
    """Base of every error lora-mux raises on purpose."""


class InvalidAdapter(MuxError):
    """An adapter that cannot be served: wrong kind, shape, rank, format. Nothing was loaded."""


class NotFound(MuxError):
    """No such object (or not visible to the caller): 404."""


class AdapterNotFound(NotFound):
    """No adapter of that name (or not visible to the caller)."""


class Conflict(MuxError):
    """The change conflicts with the current state: an adapter in use, a version its split still serves (409)."""


class InvalidRequest(MuxError):
    """A request the engine cannot run: bad sampling values, prompt too long, ..."""


class Overloaded(MuxError):
    """The admission queue or a tenant's limit is full; retry after `retry_after` seconds (429)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(Overloaded):
    """The server cannot serve yet (the base model is still loading); retry after `retry_after` seconds (503)."""


class DeadlineExceeded(MuxError):
    """A generation ran past the request deadline (`request_timeout_s`) and was ended (504)."""
