"""The running system: one worker per processor, a scheduler, futures, records.

A request's way (DESIGN.md): ``Runtime.submit`` -> the scheduler picks a plan among the
task's candidates from the processors' predicted backlogs (``loom.serving.scheduler``) -> each
segment of the plan (consecutive slots on one processor) runs as one job on that
processor's worker, the segments in order across processors -> the future resolves ->
a ``RequestRecord`` goes to ``on_record``.

Workers. One thread per processor, pinned to its cores by the backend
(``pin_current_thread``) and loading its blocks on that thread, as in
``loom.processors.workers.Worker``; unlike that FIFO worker, its queue is ordered earliest
deadline first (higher ``priority`` first on equal deadlines, then arrival), which is
the order the scheduler's backlog prediction assumes. A finished segment hands its
activations straight to the next processor's queue, so requests pipeline: the next
request's first segment runs on A while the previous one's second runs on B.

Blocks. Each processor has a ``BlockCache``: ``get(block_id)`` returns the resident
block, loading it on demand (on the worker's thread, so the load counts in that
request's latency). With ``preload=True`` and no memory budget every block of every
candidate plan is loaded on its processor at start.

Memory budget (``memory_budget_mb`` and/or a ``loom.serving.preload.Preloader``). The caches
count the bytes of each resident block (``LoadedBlock.memory_bytes``, measured by the
backend at load). Before a load, the preloader picks what to evict, coldest first,
never a block of the requesting plan nor one a worker is running (``BlockCache.hold``),
so that the total over all processors stays within budget + margin; a load whose
bytes were underestimated is followed by a second round of evictions. With
``preload=True`` only the preloader's initial set is loaded at start. The scheduler is
told what is resident and what a load costs, so that it prefers resident plans when a
load would break a deadline (``loom.serving.scheduler``).

Measurements. Each block's run time on its worker (the load excluded) feeds the
``LatencyCorrector``, whose corrected figures the scheduler uses for the next
decisions.

Endings. Every submitted request ends with a result or an explicit error: a backend
failure fails that request's future (``BackendError`` naming the block and processor)
and the others go on; a request no plan can serve (``on_unservable="reject"``) gets
``SloUnservableError``; ``close()`` drains the queued work, ``close(cancel=True)``
fails what has not finished with ``RuntimeClosedError``.

Times are seconds on the runtime's clock: ``time.perf_counter()`` minus the instant the
runtime was made, as ``loom.serving.metrics`` expects; the corrector and scheduler are always
given ``now_s`` on that clock.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loom.core.errors import (
    BackendError,
    ConfigError,
    LoomError,
    RuntimeClosedError,
    SloUnservableError,
)
from loom.processors.workers import start_pinned_thread
from loom.serving.correction import LatencyCorrector
from loom.serving.metrics import RequestRecord, slo_status
from loom.serving.preload import Key, Preloader, plan_keys, planned_shares
from loom.serving.scheduler import Decision, Reservation, Scheduler
from placement.plan import Plan

if TYPE_CHECKING:
    from backends.base import Backend, LoadedBlock
    from loom.model.blockstore import BlockStore
    from loom.processors.device import DeviceProfile

__all__ = ["BlockCache", "Runtime", "TaskBinding"]

log = logging.getLogger(__name__)

#: a job's place in a worker's queue: (deadline, -priority, sequence)
JobKey = tuple[float, float, int]


@dataclass(frozen=True)
class TaskBinding:
    """A task as the runtime serves it: its candidate plans, where its blocks are, its SLO."""

    task: str
    #: plans to choose from; non-adaptive policies always run the first
    candidates: list[Plan]
    #: block id -> ONNX file of the block
    block_paths: Mapping[str, Path]
    latency_ms: float
    accuracy_floor: float
    #: breaks ties between equal deadlines in the workers' queues (higher first)
    priority: float = 0
    #: resolve futures to this output only (None: the dict of the last block's outputs)
    output_name: str | None = None


# -- blocks -----------------------------------------------------------------------------------
class BlockCache:
    """The blocks resident on one processor; ``get`` loads on demand.

    Used only from its worker's thread (loads must happen there, to inherit the pin),
    except ``resident()`` for reports. The memory-aware preloader replaces or extends
    this: which blocks to keep, what to evict within a budget.
    """

    def __init__(
        self, processor: str, backend: Backend, resolve: Callable[[str], Path], budget: _Budget | None = None,
        known_bytes: Callable[[str, str], int | None] | None = None,
    ) -> None:
        self.processor = processor
        #: a block's footprint measured offline (alone, the engine warm), preferred to the
        #: RSS growth seen at load: that one also holds the engine's one-off setup on the
        #: first load and whatever another worker's load allocated at the same moment
        self._known_bytes = known_bytes
        self.backend = backend
        self._resolve = resolve
        self._budget = budget
        self._blocks: dict[str, LoadedBlock] = {}
        #: bytes each resident block holds (as measured at its load)
        self._bytes: dict[str, int] = {}
        #: seconds the last load of each block took (the scheduler's load estimate)
        self._load_s: dict[str, float] = {}
        #: blocks the worker is running now: other threads' evictions leave them alone
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self.loads = 0
        self.evictions = 0
        self.load_seconds = 0.0

    def get(self, block_id: str, protect: Sequence[Key] = ()) -> LoadedBlock:
        """The resident block, loaded first when it is not (making room within the budget).

        ``protect``: pairs the budget must not evict for this load (the plan being run).
        """
        block = self._blocks.get(block_id)
        if block is None:
            path = self._resolve(block_id)
            reserved = self._budget.before_load(self, block_id, protect) if self._budget is not None else 0
            t0 = time.perf_counter()
            try:
                block = self.backend.load(path, block_id=block_id)
            except LoomError:
                if self._budget is not None:
                    self._budget.after_load(self, block_id, reserved, None)
                raise
            except Exception as exc:  # an engine's own error type
                if self._budget is not None:
                    self._budget.after_load(self, block_id, reserved, None)
                raise BackendError(f"loading block {block_id} on {self.processor}: {exc}") from exc
            dt = time.perf_counter() - t0
            known = self._known_bytes(block_id, self.processor) if self._known_bytes is not None else None
            nbytes = int(known) if known else int(self.backend.memory_bytes(block))
            if nbytes <= 0 and reserved > 0:
                # a measured 0 (the allocator reused freed pages) would make the budget blind
                nbytes = reserved
            with self._lock:
                self._blocks[block_id] = block
                self._bytes[block_id] = nbytes
                self._load_s[block_id] = dt
                self.loads += 1
                self.load_seconds += dt
            if self._budget is not None:
                self._budget.after_load(self, block_id, reserved, nbytes, protect)
        return block

    def hold(self, block_ids: Sequence[str]) -> None:
        with self._lock:
            self._held = set(block_ids)

    def unhold(self) -> None:
        with self._lock:
            self._held = set()

    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def resident_bytes(self) -> dict[str, int]:
        with self._lock:
            return dict(self._bytes)

    def load_ms(self, block_id: str) -> float | None:
        """Predicted ms to load ``block_id`` here: its last load, else this cache's mean (None: no load yet)."""
        with self._lock:
            s = self._load_s.get(block_id)
            if s is None and self.loads:
                s = self.load_seconds / self.loads
        return None if s is None else s * 1e3

    def evict_unheld(self, block_id: str) -> int:
        """Evict unless the worker is running it; the bytes freed (0 when kept or absent)."""
        with self._lock:
            if block_id in self._held or block_id not in self._blocks:
                return 0
            block = self._blocks.pop(block_id)
            nbytes = self._bytes.pop(block_id, 0)
            self.evictions += 1
        self.backend.release(block)
        return nbytes

    def is_resident(self, block_id: str) -> bool:
        return block_id in self._blocks

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._blocks)

    def memory_bytes(self) -> int:
        with self._lock:
            return sum(self.backend.memory_bytes(b) for b in self._blocks.values())

    def evict(self, block_id: str) -> None:
        with self._lock:
            block = self._blocks.pop(block_id, None)
            self._bytes.pop(block_id, None)
            if block is not None:
                self.evictions += 1
        if block is not None:
            self.backend.release(block)

    def release_all(self) -> None:
        with self._lock:
            blocks, self._blocks = list(self._blocks.values()), {}
            self._bytes = {}
        for b in blocks:
            try:
                self.backend.release(b)
            except Exception:  # releasing at close must not hide the other releases
                log.exception("releasing block %s on %s", b.block_id, self.processor)


class _Budget:
    """The memory budget over all processors' caches, enforced through the preloader's choices.

    Called on the loading worker's thread. One lock serializes the room-making of
    concurrent loads on different processors, and the bytes of loads in progress are
    reserved, so that two loads cannot both count the same free room.
    """

    def __init__(
        self,
        preloader: Preloader,
        caches: Callable[[], dict[str, BlockCache]],
        estimate: Callable[[str, str], int],
        now: Callable[[], float],
    ) -> None:
        self.preloader = preloader
        self._caches = caches
        self._estimate = estimate
        self._now = now
        self._lock = threading.Lock()
        self.reserved = 0
        #: loads that left the total above budget + margin (protected blocks alone filled it)
        self.over_budget = 0
        self.peak_bytes = 0

    def _state(self) -> tuple[dict[str, BlockCache], dict[Key, int], set[Key]]:
        caches = self._caches()
        resident: dict[Key, int] = {}
        held: set[Key] = set()
        for p, c in caches.items():
            resident.update({(b, p): n for b, n in c.resident_bytes().items()})
            held.update((b, p) for b in c.held())
        return caches, resident, held

    def _evict(self, need: int, protect: set[Key]) -> bool:
        caches, resident, held = self._state()
        victims, ok = self.preloader.make_room(need + self.reserved, resident, protect | held, self._now())
        for b, p in victims:
            # a worker may have started running it since: then it stays, and we are short
            freed = caches[p].evict_unheld(b)
            if not freed and (b, p) in resident and resident[(b, p)]:
                ok = False
        return ok

    def before_load(self, cache: BlockCache, block_id: str, protect: Sequence[Key]) -> int:
        key = (block_id, cache.processor)
        need = max(0, int(self._estimate(block_id, cache.processor)))
        with self._lock:
            if not self._evict(need, {key, *protect}):
                log.warning("memory budget: loading %s on %s goes over budget + margin", *key)
            self.reserved += need
        return need

    def after_load(
        self, cache: BlockCache, block_id: str, reserved: int, nbytes: int | None, protect: Sequence[Key] = ()
    ) -> None:
        key = (block_id, cache.processor)
        with self._lock:
            self.reserved -= reserved
            if nbytes is None:
                return
            self.preloader.note_size(key, nbytes)
            # the estimate may have been short: a second round, the new block kept
            if not self._evict(0, {key, *protect}):
                self.over_budget += 1
            _caches, resident, _held = self._state()
            self.peak_bytes = max(self.peak_bytes, sum(resident.values()))


# -- workers ------------------------------------------------------------------------------------
class _EdfWorker:
    """A processor's thread: pinned, running jobs earliest deadline first.

    Jobs are plain callables that handle their own errors (the runtime's jobs route
    every exception to their request); one that escapes anyway is logged, never fatal
    to the thread. ``close()`` runs what is queued, then joins.
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

    def close(self, timeout: float | None = None) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


# -- requests -----------------------------------------------------------------------------------
@dataclass(eq=False)
class _Request:
    id: int
    binding: TaskBinding
    decision: Decision
    plan: Plan
    segments: list[tuple[str, list[int]]]
    reservations: list[Reservation]
    arrival_s: float
    deadline_s: float
    bound_ms: float
    floor: float
    future: Future
    seq: int
    spans: list[tuple[str, str, float, float]] = field(default_factory=list)
    start_s: float | None = None
    #: set once, under the runtime's lock, by whoever ends the request
    ended: bool = False


_CONTROL_KEY = -math.inf  # loads and releases run before any request's job


class Runtime:
    """Serves several tasks at once on a device's processors, each under its SLO."""

    def __init__(
        self,
        *,
        device: DeviceProfile | None = None,
        backends: Mapping[str, Backend] | None = None,
        tasks: Sequence[TaskBinding],
        policy_name: str = "sparseloom",
        adaptive: bool = True,
        on_unservable: str = "violate",
        correction: LatencyCorrector | None = None,
        on_record: Callable[[RequestRecord], None] | None = None,
        preload: bool = True,
        memory_budget_mb: float | None = None,
        preloader: Preloader | None = None,
        prefetch_max_load_ms: float = 5.0,
        block_store: BlockStore | None = None,
        block_bytes: Mapping[Key, int] | None = None,
        rates: Mapping[str, float] | None = None,
        mix: Mapping[str, Mapping[tuple[tuple[str, ...], tuple[str, ...]], float]] | None = None,
    ) -> None:
        if device is None and backends is None:
            raise ConfigError("runtime: give a device profile or a mapping of processor name -> backend")
        self.device = device
        self.policy_name = policy_name
        self.adaptive = adaptive
        self.preload = preload
        self.corrector = correction if correction is not None else LatencyCorrector()
        self.on_record = on_record
        self._given_backends = dict(backends or {})
        known = list(self._given_backends)
        if device is not None:
            known += [p for p in device.processor_names if p not in self._given_backends]
        self.processors: list[str] = known
        if memory_budget_mb is not None:
            if not memory_budget_mb >= 0:
                raise ConfigError(f"runtime: memory_budget_mb must be >= 0, got {memory_budget_mb}")
            budget_bytes = int(memory_budget_mb * 2**20)
            if preloader is None:
                preloader = Preloader(budget_bytes)
            else:
                preloader.budget_bytes = budget_bytes
        #: None: no budget, every block may stay resident (the behaviour before the preloader)
        self.preloader = preloader
        #: idle-time prefetch loads only blocks whose (predicted) load is this quick: a
        #: load cannot be interrupted, and a request arriving meanwhile waits for it
        self.prefetch_max_load_ms = float(prefetch_max_load_ms)
        #: where blocks are read from when it holds them: each file's sha256 is checked
        #: against the store's index on its first load, and a mismatch fails that load
        self.block_store = block_store
        #: (block, processor) -> resident bytes measured offline (``loom profile``); the
        #: memory budget counts these instead of run-time RSS growth where known
        self.block_bytes: dict[Key, int] = {k: int(v) for k, v in (block_bytes or {}).items() if v and v > 0}
        #: what the preloader's initial set expects: each task's rate and planned mix
        #: (without them, every task at 1/s over equally likely candidates)
        self._rates = dict(rates or {})
        self._initial_mix = {t: dict(m) for t, m in (mix or {}).items()}
        self.prefetches = 0
        self.prefetch_interval_s = 0.05
        self._prefetching: set[str] = set()
        self._prefetch_checked: dict[str, float] = {}
        self._budget = (
            _Budget(preloader, self._cache_map, self._estimate_bytes, self.now) if preloader is not None else None
        )
        self.scheduler = Scheduler(
            known, corrector=self.corrector, on_unservable=on_unservable,
            # loads are priced only under a budget: without one, blocks stay once loaded
            resident=self._is_resident if preloader is not None else None,
            load_ms=self._load_estimate_ms if preloader is not None else None,
        )
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._closed = False
        self._ids = itertools.count()
        self._seq = itertools.count()
        self._live: dict[int, _Request] = {}
        self._tasks: dict[str, TaskBinding] = {}
        self._paths: dict[str, Path] = {}
        #: guards starting and stopping workers (apart from ``_lock``: a worker starts on
        #: a hand-off from another worker's thread, outside any request bookkeeping)
        self._wlock = threading.Lock()
        self._stopped = False
        self._workers: dict[str, _EdfWorker] = {}
        self._caches: dict[str, BlockCache] = {}
        self._counts = {"submitted": 0, "ok": 0, "late": 0, "inaccurate": 0, "rejected": 0, "error": 0}
        self._preload_errors: list[str] = []
        try:
            for binding in tasks:
                if binding.task in self._tasks:
                    raise ConfigError(f"runtime: task {binding.task!r} is bound twice")
                self._check_binding(binding)
                self._tasks[binding.task] = replace(binding, candidates=list(binding.candidates))
                self._paths.update({b: Path(p) for b, p in binding.block_paths.items()})
            for p in self._given_backends:
                self._worker(p)
            if self.preloader is not None:
                self.preloader.set_candidates({t: b.candidates for t, b in self._tasks.items()})
            pending: list[list[Future]] = []
            if preload and self.preloader is not None:
                pending = [self._preload_initial()]
            elif preload:
                pending = [self._preload(b.candidates) for b in self._tasks.values()]
            for fut in (f for group in pending for f in group):
                fut.result()  # a block that cannot load here fails the construction
        except BaseException:
            self._shutdown_workers()
            raise

    @classmethod
    def from_yaml(cls, path: str | Path, *, policy: str | None = None,
                  on_record: Callable[[RequestRecord], None] | None = None) -> Runtime:
        """A runtime for an SLO config file: its device, tasks, estimators and policy (or ``policy``)."""
        from loom.app.serve import Deployment  # the wiring sits above the runtime

        dep = Deployment.from_config(path)
        return dep.runtime(policy or dep.config.policy, on_record=on_record)

    # -- clock -------------------------------------------------------------------------------
    def now(self) -> float:
        """Seconds since the runtime was made (the clock of its records)."""
        return time.perf_counter() - self._t0

    # -- wiring ------------------------------------------------------------------------------
    def _check_binding(self, binding: TaskBinding) -> None:
        plans = binding.candidates
        if not plans:
            raise ConfigError(f"runtime: task {binding.task!r} has no candidate plans")
        if not binding.latency_ms > 0 or not 0.0 <= binding.accuracy_floor <= 1.0:
            raise ConfigError(
                f"runtime: task {binding.task!r}: latency_ms must be > 0 and accuracy_floor in [0, 1], "
                f"got {binding.latency_ms} and {binding.accuracy_floor}"
            )
        paths = {**self._paths, **binding.block_paths}
        for i, plan in enumerate(plans):
            where = f"runtime: task {binding.task!r}, candidate {i} {list(plan.config)} on {list(plan.placement)}"
            if plan.task != binding.task:
                raise ConfigError(f"{where}: the plan is for task {plan.task!r}")
            unknown = sorted({p for p in plan.placement if p not in self.processors})
            if unknown:
                raise ConfigError(f"{where}: unknown processor(s) {unknown} (have {self.processors})")
            missing = sorted({b for b in plan.block_ids if b not in paths})
            if missing:
                raise ConfigError(f"{where}: no file given for block(s) {missing}")

    def _worker(self, processor: str) -> _EdfWorker:
        """The processor's worker, started on first use (a processor no plan uses costs nothing)."""
        with self._wlock:
            worker = self._workers.get(processor)
            if worker is not None:
                return worker
            if self._stopped:
                raise RuntimeClosedError(f"runtime is closed: processor {processor!r} has no worker")
            if processor in self._given_backends:
                backend = self._given_backends[processor]
            elif self.device is not None:
                backend = self.device.make_backend(processor)
            else:
                raise ConfigError(f"runtime: unknown processor {processor!r} (have {self.processors})")
            worker = _EdfWorker(processor, backend,
                                on_wake=lambda d, p=processor: self.scheduler.observe_wake(p, d, self.now()))
            self._caches[processor] = BlockCache(processor, backend, self._resolve, self._budget,
                                                 known_bytes=lambda b, p: self.block_bytes.get((b, p)))
            self._workers[processor] = worker
            return worker

    def _resolve(self, block_id: str) -> Path:
        store = self.block_store
        if store is not None and store.has(block_id):
            return store.path(block_id)  # BlockIntegrityError when the file is not what was stored
        path = self._paths.get(block_id)
        if path is None:
            raise ConfigError(f"runtime: no file for block {block_id}")
        return path

    # -- memory -------------------------------------------------------------------------------
    def _cache_map(self) -> dict[str, BlockCache]:
        with self._wlock:
            return dict(self._caches)

    def _estimate_bytes(self, block_id: str, processor: str) -> int:
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
            return self._resolve(block_id).stat().st_size
        except (OSError, ConfigError):
            return 0

    def _is_resident(self, block_id: str, processor: str) -> bool:
        cache = self._caches.get(processor)
        return cache is not None and cache.is_resident(block_id)

    def _load_estimate_ms(self, block_id: str, processor: str) -> float:
        """Predicted load ms: measured on this processor, else the mean over all loads so far (0 before any)."""
        cache = self._caches.get(processor)
        ms = cache.load_ms(block_id) if cache is not None else None
        if ms is not None:
            return ms
        caches = list(self._caches.values())
        loads = sum(c.loads for c in caches)
        return sum(c.load_seconds for c in caches) / loads * 1e3 if loads else 0.0

    def _preload_initial(self) -> list[Future]:
        """Load the preloader's initial set (within the budget), each on its processor's thread."""
        assert self.preloader is not None
        candidates = {t: b.candidates for t, b in self._tasks.items()}
        sizes = {
            (b, p): self._estimate_bytes(b, p)
            for plans in candidates.values() for plan in plans for b, p in plan_keys(plan)
        }
        shares = planned_shares(candidates, self._initial_mix, adaptive=self.adaptive)
        rates = {t: self._rates.get(t, 1.0) for t in candidates}
        chosen = self.preloader.initial_set(candidates, rates, sizes, shares or None, now_s=self.now())
        wanted: dict[str, list[str]] = {}
        for b, p in sorted(chosen):
            wanted.setdefault(p, []).append(b)
        return self._load_on_workers(wanted)

    def _preload(self, plans: Sequence[Plan]) -> list[Future]:
        """Load every block of ``plans`` on its processor, on that processor's thread."""
        wanted: dict[str, list[str]] = {}
        for plan in plans:
            for b, p in zip(plan.block_ids, plan.placement, strict=True):
                if b not in wanted.setdefault(p, []):
                    wanted[p].append(b)
        return self._load_on_workers(wanted)

    def _load_on_workers(self, wanted: Mapping[str, list[str]]) -> list[Future]:
        futures = []
        for proc, ids in wanted.items():
            worker = self._worker(proc)
            cache = self._caches[proc]
            fut: Future = Future()

            def load_all(cache: BlockCache = cache, ids: list[str] = ids, fut: Future = fut) -> None:
                try:
                    for b in ids:
                        cache.get(b)
                except BaseException as exc:
                    fut.set_exception(exc)
                else:
                    fut.set_result(None)

            worker.put((_CONTROL_KEY, 0, next(self._seq)), load_all)
            futures.append(fut)
        return futures

    # -- the API -----------------------------------------------------------------------------
    def submit(
        self, task: str, inputs: Mapping[str, np.ndarray], *, deadline_ms: float | None = None
    ) -> Future:
        """Serve one request; the future resolves to the outputs (see ``TaskBinding.output_name``).

        ``deadline_ms`` overrides the task's latency bound for this request. Raises
        ``ConfigError`` for an unknown task and ``RuntimeClosedError`` after ``close``;
        every other failure arrives through the future.
        """
        if deadline_ms is not None and not deadline_ms > 0:
            raise ConfigError(f"runtime: deadline_ms must be > 0, got {deadline_ms}")
        future: Future = Future()
        # running from the start: a caller's cancel() cannot race the workers' set_result
        future.set_running_or_notify_cancel()
        with self._lock:
            if self._closed:
                raise RuntimeClosedError("runtime is closed: no more requests")
            binding = self._tasks.get(task)
            if binding is None:
                raise ConfigError(f"runtime: unknown task {task!r} (have {sorted(self._tasks)})")
            rid = next(self._ids)
            self._counts["submitted"] += 1
            arrival = self.now()
            bound = float(deadline_ms) if deadline_ms is not None else float(binding.latency_ms)
            deadline = arrival + bound / 1e3
            decision, reservations = self.scheduler.admit(
                task, binding.candidates, now_s=arrival, deadline_s=deadline,
                accuracy_floor=binding.accuracy_floor, adaptive=self.adaptive, priority=binding.priority,
            )
            if decision.plan is None:
                req = None
            else:
                req = _Request(
                    id=rid, binding=binding, decision=decision, plan=decision.plan,
                    segments=decision.plan.segments(), reservations=reservations, arrival_s=arrival,
                    deadline_s=deadline, bound_ms=bound, floor=binding.accuracy_floor, future=future,
                    seq=next(self._seq),
                )
                self._live[rid] = req
        if req is None:
            self._reject(rid, binding, arrival, bound, decision, future)
            return future
        if self.preloader is not None:
            self.preloader.record_use(req.plan, arrival)  # what is hot follows what is chosen
        self._enqueue(req, 0, dict(inputs))
        return future

    def set_slo(self, task: str, *, latency_ms: float | None = None, accuracy_floor: float | None = None) -> None:
        """Change a task's SLO; the next request submitted uses it."""
        with self._lock:
            binding = self._binding(task)
            new = replace(
                binding,
                latency_ms=binding.latency_ms if latency_ms is None else float(latency_ms),
                accuracy_floor=binding.accuracy_floor if accuracy_floor is None else float(accuracy_floor),
            )
            self._check_binding(new)
            self._tasks[task] = new

    def set_candidates(
        self, task: str, plans: Sequence[Plan], *, block_paths: Mapping[str, Path] | None = None
    ) -> None:
        """Replace a task's candidate plans (new blocks may come with ``block_paths``).

        With ``preload`` their blocks start loading at once, ahead of queued requests;
        this call does not wait for them (a request needing one still loading waits).
        Under a memory budget they are loaded on demand instead.
        """
        with self._lock:
            binding = self._binding(task)
            new = replace(binding, candidates=list(plans), block_paths={**binding.block_paths, **(block_paths or {})})
            self._check_binding(new)
            self._paths.update({b: Path(p) for b, p in new.block_paths.items()})
            self._tasks[task] = new
            closed = self._closed
            candidates = {t: b.candidates for t, b in self._tasks.items()}
        if self.preloader is not None:
            # under a budget new blocks load on demand (evicting the coldest), keeping what
            # the tracker learned; loading them all here could evict the hot ones
            self.preloader.set_candidates(candidates)
        elif self.preload and not closed:
            for fut in self._preload(new.candidates):
                fut.add_done_callback(self._note_preload_error)

    def _note_preload_error(self, fut: Future) -> None:
        exc = fut.exception()
        if exc is not None:
            log.warning("preload failed: %s", exc)
            with self._lock:
                self._preload_errors.append(str(exc))

    def _binding(self, task: str) -> TaskBinding:
        binding = self._tasks.get(task)
        if binding is None:
            raise ConfigError(f"runtime: unknown task {task!r} (have {sorted(self._tasks)})")
        return binding

    @property
    def tasks(self) -> dict[str, TaskBinding]:
        with self._lock:
            return dict(self._tasks)

    def stats(self) -> dict[str, Any]:
        """Queue lengths, predicted backlogs, counts, resident blocks and the corrector's state."""
        now = self.now()
        with self._lock:
            counts = dict(self._counts)
            in_flight = len(self._live)
            preload_errors = list(self._preload_errors)
        with self._wlock:
            workers = dict(self._workers)
            caches = dict(self._caches)
        return {
            "time_s": now,
            "policy": self.policy_name,
            "adaptive": self.adaptive,
            "in_flight": in_flight,
            "counts": counts,
            "queues": {p: len(w) for p, w in workers.items()},
            "reserved_segments": self.scheduler.reserved(),
            "backlog_ms": self.scheduler.backlog_ms(now),
            "resident": {p: c.resident() for p, c in caches.items()},
            "resident_bytes": {p: sum(c.resident_bytes().values()) for p, c in caches.items()},
            "loads": {p: c.loads for p, c in caches.items()},
            "evictions": {p: c.evictions for p, c in caches.items()},
            "prefetches": self.prefetches,
            "load_seconds": {p: c.load_seconds for p, c in caches.items()},
            "memory": self._memory_stats(caches),
            "preload_errors": preload_errors,
            "correction": self.corrector.snapshot(now),
            "wake_ms": self.scheduler.wake_ms(now),
        }

    def _memory_stats(self, caches: Mapping[str, BlockCache]) -> dict[str, Any]:
        total = sum(sum(c.resident_bytes().values()) for c in caches.values())
        out: dict[str, Any] = {"resident_bytes": total, "budget_bytes": None, "margin_bytes": None}
        if self.preloader is not None and self._budget is not None:
            out.update(
                budget_bytes=self.preloader.budget_bytes, margin_bytes=self.preloader.margin_bytes,
                over_budget=self._budget.over_budget, peak_bytes=self._budget.peak_bytes,
            )
        return out

    # -- running a request ---------------------------------------------------------------------
    def _enqueue(self, req: _Request, i: int, env: dict[str, np.ndarray]) -> None:
        proc = req.segments[i][0]
        key: JobKey = (req.deadline_s, -float(req.binding.priority), req.seq)
        try:
            self._worker(proc).put(key, lambda: self._run_segment(req, i, env))
        except BaseException as exc:  # a worker that cannot start, or closed under a cancel
            self._end(req, error=exc)

    def _run_segment(self, req: _Request, i: int, env: dict[str, np.ndarray]) -> None:
        if req.ended:
            return  # cancelled (close(cancel=True)) while queued
        proc, slots = req.segments[i]
        reservation = req.reservations[i]
        cache = self._caches[proc]
        backend = cache.backend
        now = self.now()
        self.scheduler.start(reservation, now)
        if req.start_s is None:
            req.start_s = now
        block_id = req.plan.block_ids[slots[0]]
        # held while the segment runs: a load on another worker must not evict them
        cache.hold([req.plan.block_ids[s] for s in slots])
        protect = plan_keys(req.plan) if self._budget is not None else ()
        try:
            for s in slots:
                block_id = req.plan.block_ids[s]
                block = cache.get(block_id, protect)  # on demand when not resident: counted in latency
                t0 = self.now()
                out = backend.run(block, {n: env[n] for n in block.input_names if n in env})
                t1 = self.now()
                env.update(out)
                req.spans.append((proc, block_id, t0, t1))
                self.corrector.observe(block_id, proc, req.plan.block_ms[s], (t1 - t0) * 1e3, t1)
        except BaseException as exc:
            self.scheduler.finish(reservation)
            err = BackendError(
                f"request {req.id} of task {req.binding.task!r}: block {block_id} on processor {proc!r} failed: "
                f"{type(exc).__name__}: {exc}"
            )
            err.__cause__ = exc
            self._end(req, error=err)
            return
        finally:
            cache.unhold()
        self.scheduler.finish(reservation)
        self._maybe_prefetch(proc)
        if i + 1 < len(req.segments):
            if not req.ended:
                self._enqueue(req, i + 1, env)
            return
        # the last segment ends with the plan's last block: its outputs are the result
        names = block.output_names
        try:
            outputs = {n: env[n] for n in names}
            name = req.binding.output_name
            result: Any = outputs if name is None else outputs[name]
        except KeyError as exc:
            self._end(req, error=BackendError(
                f"request {req.id} of task {req.binding.task!r}: output {exc} missing; "
                f"block {block_id} gives {names}"
            ))
            return
        self._end(req, result=result)

    def _maybe_prefetch(self, proc: str) -> None:
        """When ``proc``'s queue is empty, load its hottest missing block that fits the free budget.

        Off the critical path: the load is queued behind every request (it runs only
        when nothing waits), evicts nothing (only free budget is used, so a hot block is
        never traded for a guess), and is skipped when its predicted load takes longer
        than ``prefetch_max_load_ms`` (a request arriving meanwhile would wait for it).
        The candidates are the blocks of the tasks' plans, hottest first
        (``Preloader.prefetch_hint``): after evictions, what the mix will ask for next.
        """
        if self.preloader is None or self._budget is None or self._closed:
            return
        worker = self._workers.get(proc)
        cache = self._caches.get(proc)
        if worker is None or cache is None or len(worker) or proc in self._prefetching:
            return
        now = self.now()
        # at most every prefetch_interval_s per processor: ranking every candidate's blocks
        # is Python work on the worker's thread, between requests
        if now - self._prefetch_checked.get(proc, -math.inf) < self.prefetch_interval_s:
            return
        self._prefetch_checked[proc] = now
        caches = self._cache_map()
        used = sum(sum(c.resident_bytes().values()) for c in caches.values()) + self._budget.reserved
        free = self.preloader.budget_bytes - used
        if free <= 0:
            return
        plans = [p for b in self._tasks.values() for p in b.candidates]
        resident = [(b, p) for p, c in caches.items() for b in c.resident()]
        for b, p in self.preloader.prefetch_hint(plans, resident, now):
            if p != proc:
                continue
            if self._estimate_bytes(b, p) > free or self._load_estimate_ms(b, p) > self.prefetch_max_load_ms:
                continue
            self._prefetching.add(proc)

            def load(block_id: str = b) -> None:
                try:
                    if not cache.is_resident(block_id) and not self._closed:
                        cache.get(block_id)
                        self.prefetches += 1
                except Exception as exc:  # a prefetch failing costs nothing but the attempt
                    log.warning("prefetch of %s on %s failed: %s", block_id, proc, exc)
                finally:
                    self._prefetching.discard(proc)

            try:
                # after every request's job (their keys are finite deadlines)
                worker.put((math.inf, 0.0, next(self._seq)), load)
            except RuntimeClosedError:
                self._prefetching.discard(proc)
            return

    def _end(self, req: _Request, *, result: Any = None, error: BaseException | None = None) -> None:
        """Finish a request exactly once: release its reservations, record it, resolve its future."""
        with self._lock:
            if req.ended:
                return
            req.ended = True
        status = "error"
        try:
            for r in req.reservations:
                self.scheduler.finish(r)
            end = self.now()
            latency = (end - req.arrival_s) * 1e3
            below = req.plan.accuracy < req.floor
            if error is None:
                status, below = slo_status(latency, req.bound_ms, req.plan.accuracy, req.floor)
                self.scheduler.observe_completion(req.plan, req.decision.predicted_finish_s, end)
            record = RequestRecord(
                id=req.id, task=req.binding.task, policy=self.policy_name, arrival_s=req.arrival_s,
                start_s=req.start_s, end_s=end, latency_ms=latency, latency_bound_ms=req.bound_ms,
                accuracy_floor=req.floor, plan_accuracy=req.plan.accuracy, config=req.plan.config,
                placement=req.plan.placement, status=status, below_floor=below,
                error=None if error is None else f"{type(error).__name__}: {error}", spans=list(req.spans),
            )
            # recorded before the future resolves: a caller that waited on it sees the record
            self._emit(record)
        finally:
            # whatever failed above, the future resolves and close() does not wait forever
            if error is None:
                req.future.set_result(result)
            else:
                req.future.set_exception(error)
            with self._lock:
                self._counts[status] += 1
                self._live.pop(req.id, None)
                self._idle.notify_all()

    def _reject(
        self, rid: int, binding: TaskBinding, arrival: float, bound: float, decision: Decision, future: Future
    ) -> None:
        record = RequestRecord(
            id=rid, task=binding.task, policy=self.policy_name, arrival_s=arrival, start_s=None, end_s=None,
            latency_ms=None, latency_bound_ms=bound, accuracy_floor=binding.accuracy_floor, status="rejected",
            error=decision.reason,
        )
        self._emit(record)
        future.set_exception(SloUnservableError(
            f"task {binding.task!r}: no plan can serve this request within {bound:g} ms at accuracy >= "
            f"{binding.accuracy_floor:g} ({decision.reason})"
        ))
        with self._lock:
            self._counts["rejected"] += 1

    def _emit(self, record: RequestRecord) -> None:
        if self.on_record is None:
            return
        try:
            self.on_record(record)
        except Exception:  # a broken sink must not break serving
            log.exception("on_record raised for request %s", record.id)

    # -- closing ---------------------------------------------------------------------------------
    def close(self, *, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop taking requests, end every submitted one, stop the workers. Idempotent.

        By default the queued work runs to the end (``timeout``: seconds to wait for it,
        after which what is left is cancelled). ``cancel=True`` fails every request not
        yet finished with ``RuntimeClosedError`` at once; a block already running on a
        processor finishes first (engines cannot be interrupted).
        """
        with self._lock:
            self._closed = True
            if not cancel:
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._live:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._idle.wait(left)
            pending = list(self._live.values())
        for req in pending:
            self._end(req, error=RuntimeClosedError(f"runtime closed before request {req.id} finished"))
        self._shutdown_workers()

    def _shutdown_workers(self) -> None:
        with self._wlock:
            self._stopped = True
            workers, self._workers = dict(self._workers), {}
            caches = dict(self._caches)
        for proc, worker in workers.items():
            cache = caches.get(proc)
            if cache is not None:
                with contextlib.suppress(RuntimeClosedError):
                    worker.put((_CONTROL_KEY, 0, next(self._seq)), cache.release_all)
            worker.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # threads are daemons; this only avoids leaking workers when close() was forgotten
        try:
            if not self._closed:
                self.close(cancel=True)
        except Exception:
            pass
