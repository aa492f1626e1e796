"""The one exception hierarchy; each protocol maps it to status codes in one place."""

from __future__ import annotations


class MuxError(Exception):
    """Base of every error lora-mux raises on purpose."""


class InvalidAdapter(MuxError):
    """An adapter that cannot be served: wrong kind, shape, rank, format. Nothing was loaded."""


class AdapterNotFound(MuxError):
    """No adapter of that name (or not visible to the caller)."""


class InvalidRequest(MuxError):
    """A request the engine cannot run: bad sampling values, prompt too long, ..."""


class Overloaded(MuxError):
    """The admission queue is full; retry later."""
