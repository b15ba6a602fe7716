"""The running system: a ``Runtime`` serves several tasks at once, each under its SLO.

``submit`` -> the scheduler picks a plan and reserves its segments -> each segment runs as
one job on its processor's EDF worker (``loom.serving.pool``), the next one queued when it
ends -> the future resolves and a ``RequestRecord`` goes to ``on_record``. Times are
seconds on the runtime's clock (``now()``). Design notes: docs/serving.md.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loom.core.errors import (
    BackendError,
    ConfigError,
    OverloadError,
    RuntimeClosedError,
    SloUnservableError,
)
from loom.serving.cache import BlockCache
from loom.serving.correction import LatencyCorrector
from loom.serving.edf import JobKey
from loom.serving.metrics import RequestRecord, slo_status
from loom.serving.overhead import OverheadMeter, cpu_ns
from loom.serving.pool import WorkerPool
from loom.serving.preload import Key, Preloader, plan_keys, planned_shares
from loom.serving.requests import Request, SegmentJob, TaskBinding, rejected_record
from loom.serving.scheduler import Decision, Scheduler
from placement.plan import Plan

if TYPE_CHECKING:
    from backends.base import Backend, LoadedBlock
    from loom.model.blockstore import BlockStore
    from loom.processors.device import DeviceProfile

__all__ = ["BlockCache", "Runtime", "SegmentJob", "TaskBinding"]

log = logging.getLogger(__name__)

#: the tasks' planned mixes: task -> {(config, placement): share}
Mixes = Mapping[str, Mapping[tuple[tuple[str, ...], tuple[str, ...]], float]]


def _processor_names(device: DeviceProfile | None, backends: Mapping[str, Backend]) -> list[str]:
    """The given backends' processors, then the device's others."""
    known = list(backends)
    if device is not None:
        known += [p for p in device.processor_names if p not in backends]
    return known


def _budget_preloader(memory_budget_mb: float | None, preloader: Preloader | None) -> Preloader | None:
    """The preloader that enforces ``memory_budget_mb`` (made when not given); None: no budget."""
    if memory_budget_mb is None:
        return preloader
    if not memory_budget_mb >= 0:
        raise ConfigError(f"runtime: memory_budget_mb must be >= 0, got {memory_budget_mb}")
    budget_bytes = int(memory_budget_mb * 2**20)
    if preloader is None:
        return Preloader(budget_bytes)
    preloader.budget_bytes = budget_bytes
    return preloader


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
        mix: Mixes | None = None,
        clock: Callable[[], float] | None = None,
        pool: Callable[..., WorkerPool] = WorkerPool,
        meter: OverheadMeter | None = None,
    ) -> None:
        """``clock``: seconds for every time the runtime takes (default: since it was made);
        ``pool``: the kind of worker pool (the simulator's is simulated); ``meter``: the
        runtime's own CPU per request by component (``loom.serving.overhead``)."""
        if device is None and backends is None:
            raise ConfigError("runtime: give a device profile or a mapping of processor name -> backend")
        self.device = device
        self.policy_name = policy_name
        self.adaptive = adaptive
        self.preload = preload
        self.corrector = correction if correction is not None else LatencyCorrector()
        self.on_record = on_record
        self.meter = meter
        given = dict(backends or {})
        self.processors: list[str] = _processor_names(device, given)
        #: None: no budget, every block may stay resident (the behaviour before the preloader)
        self.preloader = _budget_preloader(memory_budget_mb, preloader)
        #: where blocks are read from when it holds them: the bytes of every load are checked
        #: against the block's sha256 before the engine gets them, and a mismatch fails that load
        self.block_store = block_store
        #: (block, processor) -> resident bytes measured offline (``loom profile``); the
        #: memory budget counts these instead of run-time RSS growth where known
        self.block_bytes: dict[Key, int] = {k: int(v) for k, v in (block_bytes or {}).items() if v and v > 0}
        #: what the preloader's initial set expects: each task's rate and planned mix
        #: (without them, every task at 1/s over equally likely candidates)
        self._rates = dict(rates or {})
        self._initial_mix = {t: dict(m) for t, m in (mix or {}).items()}
        self._init_state(clock)
        self._pool = self._make_pool(pool, given, float(prefetch_max_load_ms))
        self.scheduler = self._make_scheduler(on_unservable)
        try:
            self._start(tasks, given)
        except BaseException:
            self._pool.shutdown()
            raise

    def _make_scheduler(self, on_unservable: str) -> Scheduler:
        priced = self.preloader is not None  # loads are priced only under a budget: without one, blocks stay
        return Scheduler(self.processors, corrector=self.corrector, on_unservable=on_unservable,
                         resident=self._pool.is_resident if priced else None,
                         load_ms=self._pool.load_estimate_ms if priced else None)

    def _init_state(self, clock: Callable[[], float] | None) -> None:
        """The clock, and the request bookkeeping, all guarded by ``_lock``."""
        if clock is None:
            t0 = time.perf_counter()
            clock = lambda: time.perf_counter() - t0  # noqa: E731
        self._clock = clock
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._closed = False
        self._ids = itertools.count()
        self._seq = itertools.count()
        self._live: dict[int, Request] = {}
        self._tasks: dict[str, TaskBinding] = {}
        self._counts = {"submitted": 0, "ok": 0, "late": 0, "inaccurate": 0, "rejected": 0, "error": 0}
        self._preload_errors: list[str] = []
        #: seconds ``close`` waits for the workers to stop, in all (after a cancel, and otherwise)
        self.cancel_join_s = 0.5
        self.join_s = 5.0

    def _make_pool(self, pool: Callable[..., WorkerPool], backends: Mapping[str, Backend],
                   prefetch_max_load_ms: float) -> WorkerPool:
        """The processors' workers and caches, wired to this runtime's clock, scheduler and tasks.

        Idle-time prefetch loads only blocks whose (predicted) load is under
        ``prefetch_max_load_ms``: a load cannot be interrupted, and a request arriving meanwhile waits.
        """
        return pool(
            device=self.device, backends=backends, processors=self.processors, preloader=self.preloader,
            block_store=self.block_store, block_bytes=self.block_bytes, now=self.now, seq=self._seq,
            on_wake=lambda p, d: self.scheduler.observe_wake(p, d, self.now()),
            plans=lambda: [p for b in self._tasks.values() for p in b.candidates],
            closed=lambda: self._closed,
            prefetch_max_load_ms=prefetch_max_load_ms,
        )

    def _start(self, tasks: Sequence[TaskBinding], given: Mapping[str, Backend]) -> None:
        """Bind the tasks, start the given backends' workers, preload; a block that cannot load fails."""
        for binding in tasks:
            if binding.task in self._tasks:
                raise ConfigError(f"runtime: task {binding.task!r} is bound twice")
            self._check_binding(binding)
            self._tasks[binding.task] = replace(binding, candidates=list(binding.candidates))
            self._pool.paths.update({b: Path(p) for b, p in binding.block_paths.items()})
        for p in given:
            self._pool.worker(p)
        if self.preloader is not None:
            self.preloader.set_candidates({t: b.candidates for t, b in self._tasks.items()})
        pending: list[Future] = []
        if self.preload and self.preloader is not None:
            pending = self._preload_initial()
        elif self.preload:
            pending = [f for b in self._tasks.values() for f in self._pool.preload(b.candidates)]
        for fut in pending:
            fut.result()  # a block that cannot load here fails the construction

    # -- clock -------------------------------------------------------------------------------
    def now(self) -> float:
        """Seconds on the runtime's clock (the clock of its records): by default since it was made."""
        return self._clock()

    # -- wiring ------------------------------------------------------------------------------
    def _check_binding(self, binding: TaskBinding) -> None:
        binding.check(self.processors, self._pool.paths)

    def _preload_initial(self) -> list[Future]:
        """Load the preloader's initial set for the tasks' rates and planned mixes."""
        candidates = {t: b.candidates for t, b in self._tasks.items()}
        shares = planned_shares(candidates, self._initial_mix, adaptive=self.adaptive)
        rates = {t: self._rates.get(t, 1.0) for t in candidates}
        return self._pool.preload_initial(candidates, rates, shares or None, self.now)

    # -- the API -----------------------------------------------------------------------------
    def submit(
        self, task: str, inputs: Mapping[str, np.ndarray], *, deadline_ms: float | None = None
    ) -> Future:
        """Serve one request; the future resolves to the outputs (see ``TaskBinding.output_name``).

        ``deadline_ms`` overrides the task's latency bound for this request. Raises
        ``ConfigError`` for an unknown task, ``InputError`` for inputs the task does not take
        (``TaskBinding.check_inputs``) and ``RuntimeClosedError`` after ``close``, before
        anything is registered; every other failure arrives through the future.
        """
        meter = self.meter
        t0 = cpu_ns() if meter is not None else 0
        if deadline_ms is not None and not deadline_ms > 0:
            raise ConfigError(f"runtime: deadline_ms must be > 0, got {deadline_ms}")
        future: Future = Future()
        # running from the start: a caller's cancel() cannot race the workers' set_result
        future.set_running_or_notify_cancel()
        with self._lock:
            if self._closed:
                raise RuntimeClosedError("runtime is closed: no more requests")
            binding = self._binding(task)
            env = binding.check_inputs(inputs)
            arrival = self.now()
            bound = float(deadline_ms) if deadline_ms is not None else float(binding.latency_ms)
            deadline = arrival + bound / 1e3
            t1 = cpu_ns() if meter is not None else 0
            decision, reservations = self.scheduler.admit(
                task, binding.candidates, now_s=arrival, deadline_s=deadline,
                accuracy_floor=binding.accuracy_floor, adaptive=self.adaptive, priority=binding.priority,
            )
            if meter is not None:
                t2, priced = cpu_ns(), self.scheduler.priced  # admissions are serialized by _lock
            rid = next(self._ids)
            self._counts["submitted"] += 1
            req = None if decision.plan is None else Request(
                id=rid, binding=binding, decision=decision, plan=decision.plan,
                segments=decision.plan.segments(), reservations=reservations, arrival_s=arrival,
                deadline_s=deadline, bound_ms=bound, floor=binding.accuracy_floor, future=future,
                seq=next(self._seq),
            )
            if req is not None:
                self._live[rid] = req
        if req is None:
            self._reject(rid, binding, arrival, bound, decision, future)
        else:
            try:
                if self.preloader is not None:
                    self.preloader.record_use(req.plan, arrival)  # what is hot follows what is chosen
                self._enqueue(req, 0, env)
            except BaseException as exc:  # registered: from here on it ends through its future
                self._end(req, error=exc)
        if meter is not None:
            meter.admitted(t0, t1, t2, cpu_ns(), len(binding.candidates), priced)
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
            self._pool.paths.update({b: Path(p) for b, p in new.block_paths.items()})
            self._tasks[task] = new
            closed = self._closed
            candidates = {t: b.candidates for t, b in self._tasks.items()}
        if self.preloader is not None:
            # under a budget new blocks load on demand (evicting the coldest), keeping what
            # the tracker learned; loading them all here could evict the hot ones
            self.preloader.set_candidates(candidates)
        elif self.preload and not closed:
            for fut in self._pool.preload(new.candidates):
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
        workers, caches = self._pool.snapshot()
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
            "prefetches": self._pool.prefetches,
            "load_seconds": {p: c.load_seconds for p, c in caches.items()},
            "memory": self._pool.memory_stats(caches),
            "preload_errors": preload_errors,
            "correction": self.corrector.snapshot(now),
            "wake_ms": self.scheduler.wake_ms(now),
            # processor -> why: a call overran its bound (new requests avoid it), or was left running at close
            "unhealthy": {**self._pool.abandoned, **self.scheduler.unhealthy(now)},
        }

    # -- running a request ---------------------------------------------------------------------
    def _enqueue(self, req: Request, i: int, env: dict[str, np.ndarray]) -> None:
        proc = req.segments[i][0]
        key: JobKey = (*req.reservations[i].key, req.seq)  # late requests queue behind on-time ones
        try:
            self._pool.worker(proc).put(key, SegmentJob(self, req, i, env))
        except BaseException as exc:  # a worker that cannot start, or closed under a cancel
            self._end(req, error=exc)

    def _begin_segment(self, req: Request, i: int) -> bool:
        """Segment ``i`` starts on its processor now; False when ``req`` already ended (cancelled)."""
        if req.ended:
            return False
        meter = self.meter
        t0 = cpu_ns() if meter is not None else 0
        now = self.now()
        if now > req.deadline_s and self.scheduler.on_unservable == "reject":
            self._end(req, error=OverloadError(
                f"request {req.id} of task {req.binding.task!r}: its deadline passed while it waited for "
                f"processor {req.segments[i][0]!r}: rejected"))
            return False
        self.scheduler.start(req.reservations[i], now)
        if req.start_s is None:
            req.start_s = now
        if meter is not None:
            meter.add("begin", cpu_ns() - t0)
        return True

    def _execute_segment(self, req: Request, i: int, env: dict[str, np.ndarray]) -> LoadedBlock | BackendError:
        """Run the segment's blocks: the last block run, or the error that stopped them."""
        proc, slots = req.segments[i]
        try:
            return self._run_blocks(req, proc, slots, self._pool.caches[proc], env)
        except BackendError as err:
            return err

    def _finish_segment(self, req: Request, i: int, env: dict[str, np.ndarray],
                        outcome: LoadedBlock | BackendError) -> None:
        """After the segment: release its reservation, then hand off to the next one or deliver."""
        meter = self.meter
        t0 = cpu_ns() if meter is not None else 0
        self.scheduler.finish(req.reservations[i])
        kind = "hand_off" if i + 1 < len(req.segments) and not isinstance(outcome, BackendError) else "completion"
        if isinstance(outcome, BackendError):
            self._end(req, error=outcome)
        else:
            self._pool.maybe_prefetch(req.segments[i][0])
            if kind == "completion":
                self._deliver(req, outcome, env)
            elif not req.ended:
                self._enqueue(req, i + 1, env)
        if meter is not None:
            meter.add(kind, cpu_ns() - t0)

    def _run_blocks(
        self, req: Request, proc: str, slots: list[int], cache: BlockCache, env: dict[str, np.ndarray]
    ) -> LoadedBlock:
        """Run the slots' blocks in order, outputs into ``env``; the last block run.

        A block loads first when it is not resident (its load counts in the latency).
        Any failure comes out as a ``BackendError`` naming the block and processor.
        """
        meter = self.meter
        seg0 = cpu_ns() if meter is not None else 0
        run_ns = 0
        backend = cache.backend
        block_id = req.plan.block_ids[slots[0]]
        # held while the segment runs: a load on another worker must not evict them
        cache.hold([req.plan.block_ids[s] for s in slots])
        protect = plan_keys(req.plan) if self._pool.budget is not None else ()
        try:
            for s in slots:
                block_id = req.plan.block_ids[s]
                block = cache.get(block_id, protect)
                t0 = self.now()
                feeds = {n: env[n] for n in block.input_names if n in env}
                r0 = cpu_ns() if meter is not None else 0
                out = backend.run(block, feeds)
                if meter is not None:
                    run_ns += cpu_ns() - r0
                t1 = self.now()
                env.update(out)
                req.spans.append((proc, block_id, t0, t1))
                self.corrector.observe(block_id, proc, req.plan.block_ms[s], (t1 - t0) * 1e3, t1)
        except BaseException as exc:
            raise BackendError(
                f"request {req.id} of task {req.binding.task!r}: block {block_id} on processor {proc!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        finally:
            cache.unhold()
        if meter is not None:
            meter.ran_blocks(cpu_ns() - seg0, run_ns, len(slots))
        return block

    def _deliver(self, req: Request, block: LoadedBlock, env: dict[str, np.ndarray]) -> None:
        """End ``req`` with the plan's last block's outputs (or the one its task asks for)."""
        names = block.output_names
        try:
            outputs = {n: env[n] for n in names}
            name = req.binding.output_name
            result: Any = outputs if name is None else outputs[name]
        except KeyError as exc:
            self._end(req, error=BackendError(
                f"request {req.id} of task {req.binding.task!r}: output {exc} missing; "
                f"block {req.plan.block_ids[-1]} gives {names}"
            ))
            return
        wrong = req.binding.check_outputs(outputs, env)
        if wrong is not None:  # never resolve a request to what the model cannot have produced
            self._end(req, error=BackendError(
                f"request {req.id} of task {req.binding.task!r}: block {req.plan.block_ids[-1]} on processor "
                f"{req.plan.placement[-1]!r} returned a wrong result: {wrong}"
            ))
            return
        self._end(req, result=result)

    def _end(self, req: Request, *, result: Any = None, error: BaseException | None = None) -> None:
        """Finish a request exactly once: release its reservations, record it, resolve its future."""
        with self._lock:
            if req.ended:
                return
            req.ended = True
        status = "rejected" if isinstance(error, OverloadError) else "error"
        try:
            for r in req.reservations:
                self.scheduler.finish(r)
            end = self.now()
            latency = (end - req.arrival_s) * 1e3
            below = req.plan.accuracy < req.floor
            if error is None:
                status, below = slo_status(latency, req.bound_ms, req.plan.accuracy, req.floor)
                self.scheduler.observe_completion(req.plan, req.decision.predicted_finish_s, end)
            record = req.record(self.policy_name, end, status, below, error)
            # recorded before the future resolves: a caller that waited on it sees the record
            self._emit(record)
        finally:
            # whatever failed above, the future resolves and close() does not wait forever;
            # counted first, so that a caller that waited on the future sees it in stats()
            with self._lock:
                self._counts[status] += 1
                self._live.pop(req.id, None)
            try:
                if error is None:
                    req.future.set_result(result)
                else:
                    req.future.set_exception(error)
            finally:
                with self._lock:
                    self._idle.notify_all()

    def _reject(
        self, rid: int, binding: TaskBinding, arrival: float, bound: float, decision: Decision, future: Future
    ) -> None:
        kind = OverloadError if decision.shed else SloUnservableError
        error = kind(f"task {binding.task!r}: no plan can serve this request within {bound:g} ms at accuracy >= "
                     f"{binding.accuracy_floor:g} ({decision.reason})")
        self._emit(rejected_record(rid, binding, self.policy_name, arrival, bound, f"{kind.__name__}: {decision.reason}"))
        future.set_exception(error)
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
        after which what is left is cancelled), unless every request left waits on a
        processor whose call is stuck past its bound (``stats()["unhealthy"]``): those are
        failed with ``RuntimeClosedError``. ``cancel=True`` fails every request not yet
        finished with ``RuntimeClosedError`` at once. Never blocks without bound: the workers
        are joined for at most ``join_s`` (``cancel_join_s`` after a cancel); a call that does
        not return is abandoned (its thread is a daemon) and its processor reported unhealthy.
        """
        with self._lock:
            self._closed = True
            why = "cancelled" if cancel else self._drain(timeout)
            pending = list(self._live.values())
        stuck = self.scheduler.unhealthy(self.now())
        for req in pending:
            self._end(req, error=RuntimeClosedError(f"runtime closed before request {req.id} finished: {why}"))
        self._pool.shutdown(self.cancel_join_s if cancel else self.join_s, stuck)

    def _drain(self, timeout: float | None) -> str:
        """Wait (under ``_lock``) for the requests in flight to end; why it stopped before, if it did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._live:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return f"not finished within the close timeout of {timeout:g} s"
            self._idle.wait(0.1 if left is None else min(left, 0.1))
            stuck = self.scheduler.unhealthy(self.now())
            if stuck and all(any(r.processor in stuck and self.scheduler.holds(r) for r in req.reservations)
                             for req in self._live.values()):
                return "it waits on unhealthy processor(s): " + "; ".join(f"{p}: {w}" for p, w in stuck.items())
        return "drained"

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
