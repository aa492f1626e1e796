"""One daemon thread that makes every torch call of an engine: model build, steps and the serving loop.

Why: OpenMP keeps a thread team per calling thread. With two teams on a small machine, libgomp stops
spinning and wakes its workers from sleep for every parallel region. `python -m bench.threads` (2 cores,
SmolLM2): with a second team in the process, requests take 1.9× longer and the first token 2.5× longer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from mux.runtime.cpu import parallel_torch_here


class TorchThread:
    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[..., Any], *args) -> Any:
        """Run `fn(*args)` on the thread and return its result (directly when already on it)."""
        if self.is_current():
            return fn(*args)
        return self.submit(fn, *args).result()

    def _run(self) -> None:
        parallel_torch_here()
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to the caller
                future.set_exception(e)
