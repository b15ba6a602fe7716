"""The simulated runtime: the real ``Runtime`` on a simulated clock and a table-driven backend.

``SimRuntime`` builds a ``loom.serving.runtime.Runtime`` whose clock is an event loop's,
whose workers are simulated (``SimWorker``: one EDF queue per processor, non-preemptive)
and whose backend advances that clock by each block's time from a ``LatencyModel`` (or a
calibrated ``HostOverhead``). Admission, scheduling, block caches, the memory budget,
preloading, prefetching, correction and records are the runtime's own code.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.base import Backend, LoadedBlock
from loom.app.arrivals import TraceItem
from loom.app.sim_latency import LatencyModel
from loom.app.sim_overhead import HostOverhead
from loom.core.errors import RuntimeClosedError
from loom.serving.correction import LatencyCorrector
from loom.serving.metrics import RequestRecord
from loom.serving.pool import WorkerPool
from loom.serving.preload import Key
from loom.serving.runtime import Runtime, SegmentJob, TaskBinding
from placement.plan import Plan

__all__ = ["SimRuntime", "Slowdown"]


@dataclass(frozen=True)
class Slowdown:
    """A processor running ``factor`` times slower between two trace seconds (a competing process, DVFS)."""

    processor: str
    start_s: float
    end_s: float
    factor: float


class EventLoop:
    """Simulated time: callbacks in time order. ``t`` is the clock the runtime reads."""

    def __init__(self) -> None:
        self.t = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    def next_time(self) -> float | None:
        return self._events[0][0] if self._events else None

    def run_next(self) -> None:
        t, _, fn = heapq.heappop(self._events)
        self.t = max(self.t, t)
        fn()


class SimBackend(Backend):
    """A processor with no engine: ``load`` and ``run`` advance the simulated clock by the table's times."""

    name = "simulated"

    def __init__(self, processor: str, sim: SimRuntime) -> None:
        self.processor = processor
        self._sim = sim

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, "simulated: latencies from a table, no outputs"

    def unsupported_ops(self, model: onnx.ModelProto) -> list[str]:
        return []

    def load(self, model: onnx.ModelProto | str | Path, *, block_id: str | None = None) -> LoadedBlock:
        key = (str(block_id), self.processor)
        self._sim.loop.t += self._sim.latency.load(key) / 1e3
        return LoadedBlock(str(block_id), self.name, [], [], None, memory_bytes=self._sim.size(key))

    def run(self, block: LoadedBlock, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._sim.loop.t += self._sim.block_ms((block.block_id, self.processor)) / 1e3
        return {}

    def release(self, block: LoadedBlock) -> None:
        return None


class SimWorker:
    """A processor's simulated worker: EDF order, one job at a time, each taking simulated time.

    A request's segment begins when it is popped, executes on the simulated clock (its
    dispatch or hand-off, then its blocks), and finishes when that time has passed.
    """

    def __init__(self, name: str, sim: SimRuntime) -> None:
        self.name = name
        self._sim = sim
        self._heap: list[tuple[tuple[float, float, int], int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._busy = False
        self._closed = False

    def put(self, key: tuple[float, float, int], job: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeClosedError(f"worker {self.name!r} is closed")
        delay_ms = self._sim.ready_delay_ms(job) if isinstance(job, SegmentJob) else 0.0
        if delay_ms > 0:
            self._sim.loop.at(self._sim.loop.t + delay_ms / 1e3, lambda: self._push(key, job))
        else:
            self._push(key, job)

    def _push(self, key: tuple[float, float, int], job: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (key, next(self._seq), job))
        if not self._busy:
            self._start_next()

    def _start_next(self) -> None:
        loop = self._sim.loop
        while self._heap and not self._busy:
            _key, _, job = heapq.heappop(self._heap)
            t0 = loop.t
            done: Callable[[], None] | None = None
            with self._sim.ahead() as observed:
                if isinstance(job, SegmentJob):
                    if not job.begin():
                        continue
                    loop.t += self._sim.occupancy_ms(job) / 1e3
                    job.execute()
                    done = job.finish
                else:
                    job()  # a load or a release, timed by the backend
            t_end, loop.t = loop.t, t0
            self._busy = True
            loop.at(t_end, functools.partial(self._done, done, observed))

    def _done(self, finish: Callable[[], None] | None, observed: list[tuple[Any, ...]]) -> None:
        self._busy = False
        self._sim.replay(observed)
        if finish is not None:
            finish()
        self._sim.note_memory()
        self._start_next()

    def __len__(self) -> int:
        return len(self._heap)

    def close(self, timeout: float | None = None) -> None:
        self._closed = True


class SimPool(WorkerPool):
    """The runtime's worker pool with simulated workers, and no block files read."""

    def __init__(self, *, sim: SimRuntime, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sim = sim

    def new_worker(self, processor: str, backend: Backend) -> SimWorker:  # type: ignore[override]
        return SimWorker(processor, self.sim)

    def resolve(self, block_id: str) -> Path:
        return Path(block_id)  # never opened: the simulated backend loads by id

    def estimate_bytes(self, block_id: str, processor: str) -> int:
        return self.sim.size((block_id, processor))

    def load_on_workers(self, wanted: Mapping[str, list[str]]) -> list[Future]:
        if self.sim.running:
            return super().load_on_workers(wanted)
        t0 = self.sim.loop.t  # before the run: loaded at time 0, as the runtime waits for them
        for proc, ids in wanted.items():
            self.worker(proc)
            for b in ids:
                self.caches[proc].get(b)
        self.sim.loop.t = t0
        done: Future = Future()
        done.set_result(None)
        return [done]

    def shutdown(self, join_s: float = 5.0, abandon: Mapping[str, str] | None = None) -> None:
        for cache in self.caches.values():
            cache.release_all()
        for worker in self.workers.values():
            worker.close()


class SimRuntime:
    """A ``Runtime`` on simulated time: ``run`` serves a trace and timed control actions."""

    #: fewer measured hand-offs than this in a HostOverhead: use the plans' modelled ones
    MIN_SAMPLES = 30

    def __init__(
        self,
        *,
        tasks: Sequence[TaskBinding],
        processors: Sequence[str],
        latency: LatencyModel,
        policy_name: str,
        adaptive: bool,
        on_unservable: str = "violate",
        correction: LatencyCorrector | None = None,
        memory_budget_mb: float | None = None,
        slowdowns: Sequence[Slowdown] = (),
        seed: int = 0,
        rates: Mapping[str, float] | None = None,
        mix: Mapping[str, Mapping[Any, float]] | None = None,
        overhead: HostOverhead | None = None,
    ) -> None:
        self.latency = latency
        self.overhead = overhead
        self.loop = EventLoop()
        self.running = False
        self.records: list[RequestRecord] = []
        self.resident_series: list[tuple[float, int]] = []
        self.peak_resident_bytes = 0
        self._rng = np.random.default_rng(seed)
        self._slowdowns = list(slowdowns)
        self._plans = [p for b in tasks for p in b.candidates]
        correction = correction if correction is not None else LatencyCorrector()
        self._observe = correction.observe
        #: block times measured ahead of the event clock, told to the corrector when due
        self._ahead: list[tuple[Any, ...]] | None = None
        correction.observe = self._observe_when_due  # type: ignore[method-assign]
        self.runtime = Runtime(
            backends={p: SimBackend(p, self) for p in processors}, tasks=[self._simulated(b) for b in tasks],
            policy_name=policy_name, adaptive=adaptive, on_unservable=on_unservable, correction=correction,
            on_record=self.records.append, memory_budget_mb=memory_budget_mb, rates=rates, mix=mix,
            block_bytes={k: v for k, v in latency.memory_bytes.items() if v > 0},
            clock=self.loop.now, pool=functools.partial(SimPool, sim=self),
        )
        self.note_memory()

    def _simulated(self, binding: TaskBinding) -> TaskBinding:
        """The binding with a (never opened) path for every block the table knows, futures the raw
        outputs, and no input spec (the simulated requests carry no inputs)."""
        paths = {b: Path(b) for b, _p in self.latency.median_ms}
        paths.update({b: Path(b) for plan in binding.candidates for b in plan.block_ids})
        return replace(binding, block_paths=paths, output_name=None, inputs=None, outputs=None)

    # -- what control_events drives ---------------------------------------------------------
    @property
    def scheduler(self) -> Any:
        return self.runtime.scheduler

    @property
    def corrector(self) -> LatencyCorrector:
        return self.runtime.corrector

    @property
    def preloader(self) -> Any:
        return self.runtime.preloader

    @property
    def tasks(self) -> dict[str, TaskBinding]:
        return self.runtime.tasks

    def now(self) -> float:
        return self.loop.t

    def set_slo(self, task: str, *, latency_ms: float | None = None, accuracy_floor: float | None = None) -> None:
        self.runtime.set_slo(task, latency_ms=latency_ms, accuracy_floor=accuracy_floor)

    def set_candidates(self, task: str, plans: Sequence[Plan], **_: Any) -> None:
        self._plans += list(plans)
        self.runtime.set_candidates(task, plans)

    # -- the clock running ahead -------------------------------------------------------------
    @contextlib.contextmanager
    def ahead(self) -> Iterator[list[tuple[Any, ...]]]:
        """While a job runs ahead of the event clock: what it measures waits for its time."""
        self._ahead = observed = []
        try:
            yield observed
        finally:
            self._ahead = None

    def _observe_when_due(self, *args: Any) -> None:
        if self._ahead is not None:
            self._ahead.append(args)
        else:
            self._observe(*args)

    def replay(self, observed: list[tuple[Any, ...]]) -> None:
        """Tell the corrector what a job measured, now that the event clock has reached its end."""
        for args in observed:
            self._observe(*args)

    # -- the table ---------------------------------------------------------------------------
    def size(self, key: Key) -> int:
        """Bytes a loaded block holds: the table's, else its share of a plan's memory."""
        if key in self.latency.memory_bytes:
            return self.latency.memory_bytes[key]
        for plan in self._plans:
            if key[0] in plan.block_ids:
                return max(1, plan.memory_bytes // max(1, len(set(plan.block_ids))))
        return 1

    def _factor(self, proc: str, t: float) -> float:
        f = 1.0
        for s in self._slowdowns:
            if s.processor == proc and s.start_s <= t < s.end_s:
                f *= s.factor
        return f

    def block_ms(self, key: Key) -> float:
        """One run of a block: a draw from the table (or the calibrated ratio), slowed when due."""
        factor = self._factor(key[1], self.loop.t)
        if self.overhead is None:
            return self.latency.sample(key, self._rng) * factor
        return self.latency.median_ms[key] * self.overhead.draw(self.overhead.block_ratio, self._rng) * factor

    def occupancy_ms(self, job: SegmentJob) -> float:
        """Processor time before a segment's blocks: the plan's dispatch, or the hand-off into it."""
        if self.overhead is not None:
            return 0.0  # the measured delays (``ready_delay_ms``) hold dispatch and hand-off
        plan, slots = job.req.plan, job.req.segments[job.i][1]
        ms = plan.dispatch_ms if job.i == 0 else plan.transfer_ms[slots[0] - 1]
        return ms * self._factor(job.req.segments[job.i][0], self.loop.t)

    def ready_delay_ms(self, job: SegmentJob) -> float:
        """With a calibrated ``HostOverhead``: the measured wait before an idle worker starts the segment."""
        o = self.overhead
        if o is None:
            return 0.0
        if job.i == 0:
            return o.draw(o.start_delay_ms, self._rng)
        if len(o.hand_off_ms) >= self.MIN_SAMPLES:
            return o.draw(o.hand_off_ms, self._rng)
        return job.req.plan.transfer_ms[job.req.segments[job.i][1][0] - 1]  # too few measured: modelled

    # -- memory ------------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        return sum(sum(c.resident_bytes().values()) for c in self.runtime._pool.caches.values())

    def note_memory(self) -> None:
        if self.runtime.preloader is None:
            return
        total = self.resident_bytes()
        self.peak_resident_bytes = max(self.peak_resident_bytes, total)
        if not self.resident_series or self.resident_series[-1][1] != total:
            self.resident_series.append((self.loop.t, total))

    # -- running -----------------------------------------------------------------------------
    def run(self, trace: Sequence[TraceItem], timeline: Sequence[tuple[float, Callable[[], None]]] = ()) -> None:
        """Every arrival of ``trace`` and every action of ``timeline``, in time order, to the last completion."""
        for t, fn in timeline:
            self.loop.at(float(t), fn)
        self.running = True
        arrivals = iter(trace)
        nxt = next(arrivals, None)
        while nxt is not None or self.loop.next_time() is not None:
            t_event = self.loop.next_time()
            if nxt is not None and (t_event is None or nxt.t_s <= t_event):
                self.loop.t = max(self.loop.t, nxt.t_s)
                self.runtime.submit(nxt.task, {})
                nxt = next(arrivals, None)
            else:
                self.loop.run_next()
        self.running = False
        self.runtime.close()
