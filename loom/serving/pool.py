"""The runtime's processors: each one's EDF worker and block cache, and where blocks come from.

``WorkerPool`` starts a processor's worker and cache on first use, resolves block files
(through the block store when it holds them), preloads blocks on their workers, prices
loads for the scheduler, prefetches into free budget when a worker idles, and shuts it
all down. Design notes: docs/serving.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loom.core.errors import ConfigError, RuntimeClosedError
from loom.serving.cache import BlockCache, MemoryBudget
from loom.serving.edf import CONTROL_KEY, EdfWorker
from loom.serving.preload import Key, Preloader, plan_keys
from placement.plan import Plan

if TYPE_CHECKING:
    from backends.base import Backend
    from loom.model.blockstore import BlockStore
    from loom.processors.device import DeviceProfile

__all__ = ["WorkerPool"]

log = logging.getLogger(__name__)


class WorkerPool:
    """One ``EdfWorker`` and one ``BlockCache`` per processor, started on first use."""

    def __init__(
        self,
        *,
        device: DeviceProfile | None,
        backends: Mapping[str, Backend],
        processors: list[str],
        preloader: Preloader | None,
        block_store: BlockStore | None,
        block_bytes: dict[Key, int],
        now: Callable[[], float],
        seq: Iterator[int],
        on_wake: Callable[[str, float], None],
        plans: Callable[[], list[Plan]],
        closed: Callable[[], bool],
        prefetch_max_load_ms: float,
    ) -> None:
        self.device = device
        self.backends = dict(backends)
        self.processors = processors
        self.preloader = preloader
        self.block_store = block_store
        self.block_bytes = block_bytes
        #: block id -> its file (the tasks' ``block_paths``)
        self.paths: dict[str, Path] = {}
        self.prefetch_max_load_ms = prefetch_max_load_ms
        self.prefetch_interval_s = 0.05
        self.prefetches = 0
        self._now = now
        #: the job sequence shared with the requests' jobs (ties in the workers' queues)
        self._seq = seq
        self._on_wake = on_wake
        self._plans = plans
        self._closed = closed
        self._prefetching: set[str] = set()
        self._prefetch_checked: dict[str, float] = {}
        self.budget = (
            MemoryBudget(preloader, self.cache_map, self.estimate_bytes, now) if preloader is not None else None
        )
        #: guards starting and stopping workers (apart from the runtime's lock: a worker
        #: starts on a hand-off from another worker's thread, outside any request bookkeeping)
        self._lock = threading.Lock()
        self._stopped = False
        self.workers: dict[str, EdfWorker] = {}
        self.caches: dict[str, BlockCache] = {}
        #: processor -> why its worker was left running at shutdown (a call that did not return)
        self.abandoned: dict[str, str] = {}

    # -- workers and files ------------------------------------------------------------------
    def worker(self, processor: str) -> EdfWorker:
        """The processor's worker, started on first use (a processor no plan uses costs nothing)."""
        with self._lock:
            worker = self.workers.get(processor)
            if worker is not None:
                return worker
            if self._stopped:
                raise RuntimeClosedError(f"runtime is closed: processor {processor!r} has no worker")
            if processor in self.backends:
                backend = self.backends[processor]
            elif self.device is not None:
                backend = self.device.make_backend(processor)
            else:
                raise ConfigError(f"runtime: unknown processor {processor!r} (have {self.processors})")
            worker = self.new_worker(processor, backend)
            self.caches[processor] = BlockCache(processor, backend, self.source, self.budget,
                                                known_bytes=lambda b, p: self.block_bytes.get((b, p)),
                                                clock=self._now)
            self.workers[processor] = worker
            return worker

    def new_worker(self, processor: str, backend: Backend) -> EdfWorker:
        """A started worker for ``processor`` (the simulator's pool makes simulated ones)."""
        return EdfWorker(processor, backend, on_wake=lambda d: self._on_wake(processor, d))

    def resolve(self, block_id: str) -> Path:
        """The block's file: the store's when it holds the block (unchecked here: ``source`` checks)."""
        store = self.block_store
        if store is not None and store.has(block_id):
            return store.file(block_id)
        path = self.paths.get(block_id)
        if path is None:
            raise ConfigError(f"runtime: no file for block {block_id}")
        return path

    def source(self, block_id: str) -> bytes | Path:
        """What a cache loads: a stored block's bytes, hashed against its id on every load.

        ``BlockIntegrityError`` when the file is not what was stored, however long after
        an earlier load it changed. A block outside the store (a task's ``block_paths``)
        loads from its file; so does whatever an overriding ``resolve`` points to
        elsewhere (the simulator's ids, which its backend never opens).
        """
        path = self.resolve(block_id)
        store = self.block_store
        if store is not None and store.has(block_id) and path == store.file(block_id):
            return store.read(block_id)
        return path

    def cache_map(self) -> dict[str, BlockCache]:
        with self._lock:
            return dict(self.caches)

    def snapshot(self) -> tuple[dict[str, EdfWorker], dict[str, BlockCache]]:
        """The workers and caches now, for reports."""
        with self._lock:
            return dict(self.workers), dict(self.caches)

    # -- memory ---------------------------------------------------------------------------
    def estimate_bytes(self, block_id: str, processor: str) -> int:
        """Bytes a load of the block will hold: measured (here, else elsewhere), else its file's size.

        The file is mostly weights, which is what an engine's footprint mostly is; a
        measurement replaces the guess after the first load.
        """
        assert self.preloader is not None
        if (block_id, processor) in self.block_bytes:
            return self.block_bytes[(block_id, processor)]
        known = self.preloader.size((block_id, processor), -1)
        if known >= 0:
            return known
        for p in self.processors:
            known = self.preloader.size((block_id, p), -1)
            if known >= 0:
                return known
        try:
            return self.resolve(block_id).stat().st_size
        except (OSError, ConfigError):
            return 0

    def is_resident(self, block_id: str, processor: str) -> bool:
        cache = self.caches.get(processor)
        return cache is not None and cache.is_resident(block_id)

    def load_estimate_ms(self, block_id: str, processor: str) -> float:
        """Predicted load ms: measured on this processor, else the mean over all loads so far (0 before any)."""
        cache = self.caches.get(processor)
        ms = cache.load_ms(block_id) if cache is not None else None
        if ms is not None:
            return ms
        caches = list(self.caches.values())
        loads = sum(c.loads for c in caches)
        return sum(c.load_seconds for c in caches) / loads * 1e3 if loads else 0.0

    def memory_stats(self, caches: Mapping[str, BlockCache]) -> dict[str, Any]:
        total = sum(sum(c.resident_bytes().values()) for c in caches.values())
        out: dict[str, Any] = {"resident_bytes": total, "budget_bytes": None, "margin_bytes": None}
        if self.preloader is not None and self.budget is not None:
            out.update(
                budget_bytes=self.preloader.budget_bytes, margin_bytes=self.preloader.margin_bytes,
                over_budget=self.budget.over_budget, peak_bytes=self.budget.peak_bytes,
            )
        return out

    # -- loading ahead ----------------------------------------------------------------------
    def preload_initial(
        self,
        candidates: Mapping[str, Sequence[Plan]],
        rates: Mapping[str, float],
        shares: Mapping[str, Sequence[float]] | None,
        now: Callable[[], float],
    ) -> list[Future]:
        """Load the preloader's initial set (within the budget), each on its processor's thread."""
        assert self.preloader is not None
        sizes = {
            (b, p): self.estimate_bytes(b, p)
            for plans in candidates.values() for plan in plans for b, p in plan_keys(plan)
        }
        chosen = self.preloader.initial_set(candidates, rates, sizes, shares, now_s=now())
        wanted: dict[str, list[str]] = {}
        for b, p in sorted(chosen):
            wanted.setdefault(p, []).append(b)
        return self.load_on_workers(wanted)

    def preload(self, plans: Sequence[Plan]) -> list[Future]:
        """Load every block of ``plans`` on its processor, on that processor's thread."""
        wanted: dict[str, list[str]] = {}
        for plan in plans:
            for b, p in zip(plan.block_ids, plan.placement, strict=True):
                if b not in wanted.setdefault(p, []):
                    wanted[p].append(b)
        return self.load_on_workers(wanted)

    def load_on_workers(self, wanted: Mapping[str, list[str]]) -> list[Future]:
        futures = []
        for proc, ids in wanted.items():
            worker = self.worker(proc)
            cache = self.caches[proc]
            fut: Future = Future()

            def load_all(cache: BlockCache = cache, ids: list[str] = ids, fut: Future = fut) -> None:
                try:
                    for b in ids:
                        cache.get(b)
                except BaseException as exc:
                    fut.set_exception(exc)
                else:
                    fut.set_result(None)

            worker.put((CONTROL_KEY, 0, next(self._seq)), load_all)
            futures.append(fut)
        return futures

    def maybe_prefetch(self, proc: str) -> None:
        """When ``proc``'s queue is empty, load its hottest missing block that fits the free budget.

        Off the critical path: the load is queued behind every request (it runs only
        when nothing waits), evicts nothing (only free budget is used, so a hot block is
        never traded for a guess), and is skipped when its predicted load takes longer
        than ``prefetch_max_load_ms`` (a request arriving meanwhile would wait for it).
        The candidates are the blocks of the tasks' plans, hottest first
        (``Preloader.prefetch_hint``): after evictions, what the mix will ask for next.
        """
        if self.preloader is None or self.budget is None or self._closed():
            return
        worker = self.workers.get(proc)
        cache = self.caches.get(proc)
        if worker is None or cache is None or len(worker) or proc in self._prefetching:
            return
        now = self._now()
        # at most every prefetch_interval_s per processor: ranking every candidate's blocks
        # is Python work on the worker's thread, between requests
        if now - self._prefetch_checked.get(proc, -math.inf) < self.prefetch_interval_s:
            return
        self._prefetch_checked[proc] = now
        caches = self.cache_map()
        used = sum(sum(c.resident_bytes().values()) for c in caches.values()) + self.budget.reserved
        free = self.preloader.budget_bytes - used
        if free <= 0:
            return
        resident = [(b, p) for p, c in caches.items() for b in c.resident()]
        for b, p in self.preloader.prefetch_hint(self._plans(), resident, now):
            if p != proc:
                continue
            if self.estimate_bytes(b, p) > free or self.load_estimate_ms(b, p) > self.prefetch_max_load_ms:
                continue
            self._queue_prefetch(proc, worker, cache, b)
            return

    def _queue_prefetch(self, proc: str, worker: EdfWorker, cache: BlockCache, block_id: str) -> None:
        """Queue the load of ``block_id`` on ``proc`` after every request's job."""
        self._prefetching.add(proc)

        def load() -> None:
            try:
                if not cache.is_resident(block_id) and not self._closed():
                    cache.get(block_id)
                    self.prefetches += 1
            except Exception as exc:  # a prefetch failing costs nothing but the attempt
                log.warning("prefetch of %s on %s failed: %s", block_id, proc, exc)
            finally:
                self._prefetching.discard(proc)

        try:
            # after every request's job, late ones included (their keys are (inf, arrival))
            worker.put((math.inf, math.inf, next(self._seq)), load)
        except RuntimeClosedError:
            self._prefetching.discard(proc)

    # -- closing ----------------------------------------------------------------------------
    def shutdown(self, join_s: float = 5.0, abandon: Mapping[str, str] | None = None) -> None:
        """Release every cache's blocks on its worker's thread, then stop the workers.

        Waits at most ``join_s`` seconds in all, and not at all for the workers of ``abandon``
        (processor -> why: a call stuck); a worker still running then is left behind (a
        daemon thread, which releases its blocks and ends if its call ever returns).
        """
        deadline = time.monotonic() + join_s
        abandon = abandon or {}
        with self._lock:
            self._stopped = True
            workers, self.workers = dict(self.workers), {}
            caches = dict(self.caches)
        for proc, worker in workers.items():
            cache = caches.get(proc)
            if cache is not None:
                with contextlib.suppress(RuntimeClosedError):
                    worker.put((CONTROL_KEY, 0, next(self._seq)), cache.release_all)
        for proc, worker in workers.items():
            left = 0.0 if proc in abandon else max(0.0, deadline - time.monotonic())
            if not worker.close(left):
                why = abandon.get(proc, f"a call still running after {join_s:g} s")
                self.abandoned[proc] = f"{why}: abandoned at shutdown"
                log.warning("worker %s left running: %s", proc, self.abandoned[proc])
