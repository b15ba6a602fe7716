"""The simulated runtime: the real scheduler, corrector and preloader over simulated workers.

``SimRuntime`` has the control surface ``control_events`` drives (the real ``Runtime``'s)
and runs a trace as discrete events: one EDF worker per processor, non-preemptive, each
block's time drawn from a ``LatencyModel`` (or a calibrated ``HostOverhead``), the clock
jumping from event to event. What it models and what it leaves out: ``docs/app.md``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from loom.app.arrivals import TraceItem
from loom.app.sim_latency import LatencyModel
from loom.app.sim_overhead import HostOverhead
from loom.serving.correction import LatencyCorrector
from loom.serving.metrics import RequestRecord, slo_status
from loom.serving.preload import Key, Preloader, plan_keys, planned_shares
from loom.serving.runtime import TaskBinding
from loom.serving.scheduler import Reservation, Scheduler
from placement.plan import Plan


@dataclass(frozen=True)
class Slowdown:
    """A processor running ``factor`` times slower between two trace seconds (a competing process, DVFS)."""

    processor: str
    start_s: float
    end_s: float
    factor: float


@dataclass(eq=False)
class _SimRequest:
    id: int
    binding: TaskBinding
    plan: Plan
    predicted_finish_s: float
    segments: list[tuple[str, list[int]]]
    reservations: list[Reservation]
    arrival_s: float
    deadline_s: float
    bound_ms: float
    seq: int
    spans: list[tuple[str, str, float, float]] = field(default_factory=list)
    start_s: float | None = None


class SimRuntime:
    """The runtime's control surface over simulated workers (what ``control_events`` drives)."""

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
        self.policy_name = policy_name
        self.overhead = overhead
        self.adaptive = adaptive
        self.latency = latency
        self.corrector = correction if correction is not None else LatencyCorrector()
        self.processors = list(processors)
        self._tasks = {b.task: b for b in tasks}
        self._now = 0.0
        self._rng = np.random.default_rng(seed)
        self._slowdowns = list(slowdowns)
        self._rates = dict(rates or {})
        self._initial_mix = {t: dict(m) for t, m in (mix or {}).items()}
        self.preloader: Preloader | None = None
        self._resident: dict[str, dict[str, int]] = {p: {} for p in self.processors}
        if memory_budget_mb is not None:
            self.preloader = Preloader(int(memory_budget_mb * 2**20))
        self.scheduler = Scheduler(
            self.processors, corrector=self.corrector, on_unservable=on_unservable,
            resident=self._is_resident if self.preloader is not None else None,
            load_ms=self._load_ms if self.preloader is not None else None,
        )
        # per processor: the EDF heap of ready segments, and the end of the running one
        self._queues: dict[str, list[tuple[tuple[float, float, int], _SimRequest, int]]] = {p: [] for p in self.processors}
        self._busy: dict[str, bool] = {p: False for p in self.processors}
        self._busy_s: dict[str, float] = {p: 0.0 for p in self.processors}
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self.records: list[RequestRecord] = []
        self.loads = 0
        self.evictions = 0
        self.peak_resident_bytes = 0
        self.resident_series: list[tuple[float, int]] = []
        if self.preloader is not None:
            self._preload_initial()

    # -- what control_events needs ----------------------------------------------------------------
    @property
    def tasks(self) -> dict[str, TaskBinding]:
        return dict(self._tasks)

    def now(self) -> float:
        return self._now

    def set_slo(self, task: str, *, latency_ms: float | None = None, accuracy_floor: float | None = None) -> None:
        b = self._tasks[task]
        self._tasks[task] = replace(
            b, latency_ms=b.latency_ms if latency_ms is None else float(latency_ms),
            accuracy_floor=b.accuracy_floor if accuracy_floor is None else float(accuracy_floor))

    def set_candidates(self, task: str, plans: Sequence[Plan], **_: Any) -> None:
        self._tasks[task] = replace(self._tasks[task], candidates=list(plans))
        if self.preloader is not None:
            self.preloader.set_candidates({t: b.candidates for t, b in self._tasks.items()})

    # -- memory ---------------------------------------------------------------------------------
    def _size(self, key: Key) -> int:
        if key in self.latency.memory_bytes:
            return self.latency.memory_bytes[key]
        for b in self._tasks.values():
            for plan in b.candidates:
                if key[0] in plan.block_ids:
                    return max(1, plan.memory_bytes // max(1, len(set(plan.block_ids))))
        return 1

    def _is_resident(self, block_id: str, processor: str) -> bool:
        return block_id in self._resident.get(processor, ())

    def _load_ms(self, block_id: str, processor: str) -> float:
        return self.latency.load((block_id, processor))

    def resident_bytes(self) -> int:
        return sum(sum(r.values()) for r in self._resident.values())

    def _preload_initial(self) -> None:
        assert self.preloader is not None
        candidates = {t: b.candidates for t, b in self._tasks.items()}
        sizes = {k: self._size(k) for plans in candidates.values() for plan in plans for k in plan_keys(plan)}
        shares = planned_shares(candidates, self._initial_mix, adaptive=self.adaptive)
        rates = {t: self._rates.get(t, 1.0) for t in candidates}
        for b, p in self.preloader.initial_set(candidates, rates, sizes, shares or None, now_s=0.0):
            self._resident[p][b] = sizes[(b, p)]
        self._note_memory()

    def _note_memory(self) -> None:
        total = self.resident_bytes()
        self.peak_resident_bytes = max(self.peak_resident_bytes, total)
        self.resident_series.append((self._now, total))

    def _ensure(self, block_id: str, proc: str, protect: set[Key]) -> float:
        """Make the block resident (evicting within the budget); the load ms it costs (0 when resident)."""
        if self.preloader is None or block_id in self._resident[proc]:
            return 0.0
        key = (block_id, proc)
        need = self._size(key)
        resident = {(b, p): n for p, blocks in self._resident.items() for b, n in blocks.items()}
        victims, _ok = self.preloader.make_room(need, resident, protect | {key}, self._now)
        for b, p in victims:
            self._resident[p].pop(b, None)
            self.evictions += 1
        self._resident[proc][block_id] = need
        self.preloader.note_size(key, need)
        self.loads += 1
        self._note_memory()
        return self.latency.load(key)

    # -- events ---------------------------------------------------------------------------------
    def _at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    def _factor(self, proc: str, t: float) -> float:
        f = 1.0
        for s in self._slowdowns:
            if s.processor == proc and s.start_s <= t < s.end_s:
                f *= s.factor
        return f

    def submit(self, task: str, *, deadline_ms: float | None = None) -> None:
        """A request of ``task`` arrives now."""
        binding = self._tasks[task]
        rid = next(self._ids)
        now = self._now
        bound = float(deadline_ms if deadline_ms is not None else binding.latency_ms)
        deadline = now + bound / 1e3
        decision, reservations = self.scheduler.admit(
            task, binding.candidates, now_s=now, deadline_s=deadline, accuracy_floor=binding.accuracy_floor,
            adaptive=self.adaptive, priority=binding.priority,
        )
        if decision.plan is None:
            self.records.append(RequestRecord(
                id=rid, task=task, policy=self.policy_name, arrival_s=now, start_s=None, end_s=None,
                latency_ms=None, latency_bound_ms=bound, accuracy_floor=binding.accuracy_floor, status="rejected",
                error=decision.reason))
            return
        req = _SimRequest(rid, binding, decision.plan, decision.predicted_finish_s, decision.plan.segments(),
                          reservations, now, deadline, bound, next(self._seq))
        if self.preloader is not None:
            self.preloader.record_use(req.plan, now)
        self._ready(req, 0)

    def _ready(self, req: _SimRequest, i: int) -> None:
        if self.overhead is not None:
            # the measured wait before an idle worker starts the segment (submit and
            # scheduling, or the hand-off; the worker's wake-up): not processor time
            o = self.overhead
            if i == 0:
                delay = o.draw(o.start_delay_ms, self._rng)
            elif len(o.hand_off_ms) >= self.MIN_SAMPLES:
                delay = o.draw(o.hand_off_ms, self._rng)
            else:  # a calibration run with (almost) no hand-offs: the modelled one
                delay = req.plan.transfer_ms[req.segments[i][1][0] - 1]
            self._at(self._now + delay / 1e3, lambda: self._queue(req, i))
            return
        self._queue(req, i)

    def _queue(self, req: _SimRequest, i: int) -> None:
        proc = req.segments[i][0]
        heapq.heappush(self._queues[proc], ((req.deadline_s, -float(req.binding.priority), req.seq), req, i))
        if not self._busy[proc]:
            self._start_next(proc)

    def _start_next(self, proc: str) -> None:
        queue = self._queues[proc]
        if not queue:
            self._busy[proc] = False
            return
        _key, req, i = heapq.heappop(queue)
        self._busy[proc] = True
        now = self._now
        self.scheduler.start(req.reservations[i], now)
        if req.start_s is None:
            req.start_s = now
        _proc, slots = req.segments[i]
        factor = self._factor(proc, now)
        # the work that lands on this processor before its blocks: the plan's dispatch on
        # the first segment, the hand-off into this one on later segments
        if self.overhead is None:
            t = now + (req.plan.dispatch_ms if i == 0 else req.plan.transfer_ms[slots[0] - 1]) * factor / 1e3
        else:
            t = now  # the measured delays hold dispatch and hand-off (see _ready)
        protect = set(plan_keys(req.plan)) if self.preloader is not None else set()
        observed = []
        for s in slots:
            b = req.plan.block_ids[s]
            t += self._ensure(b, proc, protect) / 1e3
            if self.overhead is None:
                ms = self.latency.sample((b, proc), self._rng) * factor
            else:
                ms = self.latency.median_ms[(b, proc)] * self.overhead.draw(self.overhead.block_ratio, self._rng) * factor
            req.spans.append((proc, b, t, t + ms / 1e3))
            observed.append((b, req.plan.block_ms[s], ms, t + ms / 1e3))
            t += ms / 1e3
        self._busy_s[proc] += t - now
        self._at(t, lambda: self._segment_done(req, i, observed))

    def _segment_done(self, req: _SimRequest, i: int, observed: list[tuple[str, float, float, float]]) -> None:
        proc = req.segments[i][0]
        for b, predicted, ms, end in observed:
            self.corrector.observe(b, proc, predicted, ms, end)
        self.scheduler.finish(req.reservations[i])
        if i + 1 < len(req.segments):
            self._ready(req, i + 1)
        else:
            self._complete(req)
        self._start_next(proc)

    def _complete(self, req: _SimRequest) -> None:
        end = self._now
        latency = (end - req.arrival_s) * 1e3
        status, below = slo_status(latency, req.bound_ms, req.plan.accuracy, req.binding.accuracy_floor)
        self.scheduler.observe_completion(req.plan, req.predicted_finish_s, end)
        self.records.append(RequestRecord(
            id=req.id, task=req.binding.task, policy=self.policy_name, arrival_s=req.arrival_s,
            start_s=req.start_s, end_s=end, latency_ms=latency, latency_bound_ms=req.bound_ms,
            accuracy_floor=req.binding.accuracy_floor, plan_accuracy=req.plan.accuracy, config=req.plan.config,
            placement=req.plan.placement, status=status, below_floor=below, spans=req.spans))

    def run(self, trace: Sequence[TraceItem], timeline: Sequence[tuple[float, Callable[[], None]]] = ()) -> None:
        """Every arrival of ``trace`` and every action of ``timeline``, in time order, to the last completion."""
        for t, fn in timeline:
            self._at(float(t), fn)
        arrivals = iter(trace)
        nxt = next(arrivals, None)
        while nxt is not None or self._events:
            if nxt is not None and (not self._events or nxt.t_s <= self._events[0][0]):
                self._now = max(self._now, nxt.t_s)
                self.submit(nxt.task)
                nxt = next(arrivals, None)
            else:
                t, _, fn = heapq.heappop(self._events)
                self._now = max(self._now, t)
                fn()

