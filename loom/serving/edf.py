"""A processor's worker thread whose queue runs earliest deadline first.

Pinned like ``loom.processors.workers.Worker``, but ordered by ``JobKey`` (deadline, then
higher priority, then arrival): the order the scheduler's backlog prediction assumes.
Design notes: docs/serving.md.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from loom.core.errors import RuntimeClosedError
from loom.processors.workers import start_pinned_thread

if TYPE_CHECKING:
    from backends.base import Backend

__all__ = ["CONTROL_KEY", "EdfWorker", "JobKey"]

log = logging.getLogger(__name__)

#: a job's place in a worker's queue: (deadline, -priority, sequence)
JobKey = tuple[float, float, int]

#: the deadline of loads and releases: they run before any request's job
CONTROL_KEY = -math.inf


class EdfWorker:
    """A processor's thread: pinned, running jobs earliest deadline first.

    Jobs are plain callables that handle their own errors (the runtime's jobs route
    every exception to their request); one that escapes anyway is logged, never fatal
    to the thread. ``close()`` runs what is queued, then joins (for at most ``timeout``
    seconds: a call that hangs leaves the thread, a daemon, behind).
    """

    def __init__(self, name: str, backend: Backend, on_wake: Callable[[float], None] | None = None) -> None:
        self.name = name
        self.backend = backend
        self._heap: list[tuple[JobKey, Callable[[], None], float | None]] = []
        self._cond = threading.Condition()
        self._closed = False
        #: told how long a job handed to the idle worker waited to start (seconds)
        self._on_wake = on_wake
        self._running = False
        self._thread, self.pinned, _ = start_pinned_thread(name, backend, self._loop,
                                                          thread_name=f"loom-runtime-{name}")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if not self._heap:
                    return  # closed and drained
                _key, job, handed_s = heapq.heappop(self._heap)
                self._running = True
            if handed_s is not None and self._on_wake is not None:
                try:
                    self._on_wake(time.perf_counter() - handed_s)
                except Exception:
                    log.exception("wake-up report of worker %s failed", self.name)
            try:
                job()
            except BaseException:
                log.exception("job on worker %s raised", self.name)
            finally:
                with self._cond:
                    self._running = False
            del job  # drop its feeds and outputs before waiting again

    def put(self, key: JobKey, job: Callable[[], None]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeClosedError(f"worker {self.name!r} is closed")
            # a request's job handed to an idle worker: time its wake-up (control jobs
            # such as loads have key -inf and prefetches +inf: not requests)
            idle = not self._running and not self._heap and math.isfinite(key[0])
            heapq.heappush(self._heap, (key, job, time.perf_counter() if idle else None))
            self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)

    def close(self, timeout: float | None = None) -> bool:
        """Stop taking jobs, join the thread once it has run what is queued; False: still running."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive() or self._thread is threading.current_thread()
