"""A discrete-event simulator that runs the real scheduling code against latency tables.

Nothing is inferred here: each block's run time is drawn from a ``LatencyModel`` and
the clock jumps from event to event. Everything that *decides* is the production code:

- the plans come from ``Deployment.candidates`` (the policies and the optimizer) and the
  joint mix from ``Deployment.mixes`` (the same ``latency_aware_mix``);
- every request is admitted by ``loom.serving.scheduler.Scheduler.admit`` (its reservations
  started and finished as the simulated workers run them);
- measured block times feed ``loom.serving.correction.LatencyCorrector``, and the re-planning
  and SLO changes are ``loom.app.serve.control_events``, the closures ``run_trace`` runs;
- under a memory budget, residency is decided by ``loom.serving.preload.Preloader``
  (``initial_set`` at start, ``make_room`` before a load, ``record_use`` per request),
  and the scheduler prices loads through the same ``resident``/``load_ms`` hooks.

What is modelled (the runtime's own behaviour, ``loom/serving/runtime.py``): one worker per
processor running its queue earliest deadline first (ties: higher priority, then
arrival), non-preemptive; a request's segments run in order, each queued on its
processor when the previous one ends; the first segment also carries the plan's
dispatch cost and each later one the hand-off into it (the optimizer's
``Plan.processor_ms`` model: that work lands on the receiving processor); a block that
is not resident is loaded inside its segment, its load time added.

What is not: the Python runtime's own CPU time competing with the processors (on a
2-core host it shares their cores), the operating system's scheduling, caches warming.
``scripts/bench_sim.py`` measures how far that leaves the simulation from the real
runtime on the host.

Latencies (``LatencyModel``): from a profile dataset (each block's measured median, with
a log-normal spread matched to its measured p90), from the estimators' predictions, or
from a roofline over a device profile's datasheet figures (``characteristics``) for a
device that is not here. Results say which, and that they are simulated.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from loom.app.arrivals import TraceItem, make_trace
from loom.core.errors import ConfigError
from loom.processors.device import DeviceProfile
from loom.profiling.fitting import link_model, partition_features
from loom.profiling.profile import ProfileDataset
from loom.serving.correction import LatencyCorrector
from loom.serving.metrics import RequestRecord, slo_status, summarize
from loom.serving.preload import Key, Preloader, plan_keys, planned_shares
from loom.serving.runtime import TaskBinding
from loom.serving.scheduler import Reservation, Scheduler
from placement.plan import Plan
from placement.policies import get_policy

__all__ = [
    "HostOverhead",
    "LatencyModel",
    "SimResult",
    "SimRuntime",
    "Slowdown",
    "on_device",
    "roofline_ms",
    "simulate",
]

#: z of the 90th percentile of a standard normal: sigma of a log-normal from median and p90
_Z90 = 1.2815515655446004


# -- latencies ------------------------------------------------------------------------------------
@dataclass
class LatencyModel:
    """Run times of (block, processor) pairs: a median and a log-normal spread (sigma of ln ms)."""

    median_ms: dict[Key, float]
    sigma: dict[Key, float] = field(default_factory=dict)
    #: ms to load a block on a processor (absent: ``default_load_ms``)
    load_ms: dict[Key, float] = field(default_factory=dict)
    #: bytes a loaded block holds (absent: the plan's block size)
    memory_bytes: dict[Key, int] = field(default_factory=dict)
    default_load_ms: float = 5.0
    #: where the numbers come from, for reports
    source: str = ""

    def sample(self, key: Key, rng: np.random.Generator) -> float:
        m = self.median_ms.get(key)
        if m is None:
            raise ConfigError(f"simulator: no latency for block {key[0]} on processor {key[1]!r} ({self.source})")
        s = self.sigma.get(key, 0.0)
        return m * math.exp(s * rng.standard_normal()) if s > 0 else m

    def load(self, key: Key) -> float:
        return self.load_ms.get(key, self.default_load_ms)

    @classmethod
    def from_dataset(cls, data: ProfileDataset, *, max_sigma: float = 1.0) -> LatencyModel:
        """Measured medians, spread from each pair's p90, load times and resident bytes."""
        med, sig, load, mem = {}, {}, {}, {}
        for r in data.blocks:
            if r["status"] != "ok" or not r["latency_ms_median"]:
                continue
            key = (r["block_id"], r["processor"])
            m = float(r["latency_ms_median"])
            med[key] = m
            p90 = r.get("latency_ms_p90")
            if p90 and p90 > m:
                sig[key] = min(max_sigma, math.log(float(p90) / m) / _Z90)
            if r.get("load_ms"):
                load[key] = float(r["load_ms"])
            if r.get("memory_bytes"):
                mem[key] = int(r["memory_bytes"])
        if not med:
            raise ConfigError(f"{data.root}: no measured block rows to simulate from")
        loads = list(load.values())
        return cls(med, sig, load, mem, default_load_ms=float(np.median(loads)) if loads else 5.0,
                   source=f"profile dataset {data.root}")

    @classmethod
    def from_plans(cls, spaces: Mapping[str, Any], *, sigma: float = 0.0, source: str = "estimators") -> LatencyModel:
        """The task spaces' (predicted) block latencies, with an optional uniform spread."""
        med = {k: float(v) for space in spaces.values() for k, v in space.block_ms.items()}
        return cls(med, {k: sigma for k in med} if sigma > 0 else {}, source=source)


@dataclass
class HostOverhead:
    """What a real runtime adds around the blocks, as empirical samples from a real run.

    The block tables say how long a block takes alone; a Python runtime on a small host
    adds the wait before an idle worker starts a request's first segment (submit,
    scheduling decision, thread wake-up, the GIL), the same wait at each hand-off, and
    blocks that run slower than alone (the runtime's threads and the other worker share
    the memory system and the cores). ``from_records`` measures all three from one
    real run's per-request spans; the simulator then draws from them instead of using
    the plans' modelled dispatch and hand-off costs (which they contain). Calibrate on
    one run and validate on others (``scripts/bench_sim.py``).
    """

    start_delay_ms: np.ndarray
    hand_off_ms: np.ndarray
    block_ratio: np.ndarray
    source: str = ""

    @classmethod
    def from_records(cls, records: Sequence[RequestRecord], latency: LatencyModel, *, source: str = "") -> HostOverhead:
        spans_by_proc: dict[str, list[tuple[float, float]]] = {}
        for r in records:
            for proc, _b, s0, s1 in r.spans:
                spans_by_proc.setdefault(proc, []).append((s0, s1))
        starts: dict[str, np.ndarray] = {}
        ends: dict[str, np.ndarray] = {}
        for proc, spans in spans_by_proc.items():
            spans.sort()
            starts[proc] = np.array([a for a, _ in spans])
            ends[proc] = np.maximum.accumulate(np.array([b for _, b in spans]))

        def idle_between(proc: str, t0: float, t1: float) -> bool:
            """No block ran on ``proc`` between t0 and t1 (t1: the start of the segment in question)."""
            j = int(np.searchsorted(starts[proc], t1, side="left")) - 1  # blocks that started before t1
            return j < 0 or ends[proc][j] <= t0

        start, hand, ratio = [], [], []
        for r in records:
            if not r.spans or r.latency_ms is None:
                continue
            first_proc, _b, first_start, _e = r.spans[0]
            if idle_between(first_proc, r.arrival_s, first_start):
                start.append((first_start - r.arrival_s) * 1e3)
            for (p0, _b0, _s0, e0), (p1, _b1, s1, _e1) in zip(r.spans, r.spans[1:], strict=False):
                if p0 != p1 and idle_between(p1, e0, s1):
                    hand.append((s1 - e0) * 1e3)
            for proc, b, s0, s1 in r.spans:
                m = latency.median_ms.get((b, proc))
                if m:
                    ratio.append((s1 - s0) * 1e3 / m)
        if not start or not ratio:
            raise ConfigError("host overhead: the run has no request that started on an idle processor")
        return cls(np.array(start), np.array(hand), np.array(ratio), source=source)

    def draw(self, samples: np.ndarray, rng: np.random.Generator) -> float:
        return float(samples[rng.integers(len(samples))])

    def summary(self) -> dict[str, Any]:
        def q(a: np.ndarray) -> dict[str, float]:
            return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                    "p99": float(np.percentile(a, 99))}
        return {"start_delay_ms": q(self.start_delay_ms),
                "hand_off_ms": q(self.hand_off_ms) if self.hand_off_ms.size else {"n": 0},
                "block_ratio": q(self.block_ratio), "source": self.source}


#: Share of a processor's datasheet peak that one batch-1 block reaches (an estimate: small
#: blocks at batch 1 leave wide units idle; on the 2-core host, onnxruntime's fp32 convs
#: of the zoo's CNN run near an AVX2 core's peak, but its transformer blocks at ~20%).
COMPUTE_EFFICIENCY = {"cpu": 0.35, "gpu": 0.10, "npu": 0.15}
#: Share of the memory bandwidth a block's weights and activations stream at (estimate).
MEMORY_EFFICIENCY = {"cpu": 0.5, "gpu": 0.4, "npu": 0.4}


def roofline_ms(features: Mapping[str, float], processor: Any) -> float | None:
    """A block's batch-1 latency on a processor from its datasheet figures, or None when it cannot run it.

    ``launch + max(ops / (peak x efficiency), bytes / (bandwidth x efficiency))``, at the
    block's precision (int8 / fp16 / fp32: whichever holds most of its MACs). A
    processor without a peak for that precision runs a float block at fp16 when it has
    one (GPUs and NPUs behind TensorRT with its fp16 flag do) and cannot run it
    otherwise (an NPU without float units).
    """
    c = processor.characteristics
    if c is None or not c.peak_gops:
        return None
    prec = max(("int8", "fp16", "fp32"), key=lambda p: features.get(f"prec_{p}", 0.0))
    peak = c.peak_gops.get(prec)
    if peak is None and prec in ("fp32", "fp16"):
        peak = c.peak_gops.get("fp16") or c.peak_gops.get("tf32")
    if peak is None and prec == "int8":
        peak = c.peak_gops.get("fp16")
    if not peak:
        return None
    kind = processor.kind
    ops = 2.0 * float(features.get("macs_total", 0.0))
    nbytes = float(features.get("weight_bytes", 0.0)) + float(features.get("act_total_bytes", 0.0))
    compute_s = ops / (peak * 1e9 * COMPUTE_EFFICIENCY.get(kind, 0.2))
    memory_s = nbytes / (c.mem_gbps * 1e9 * MEMORY_EFFICIENCY.get(kind, 0.4)) if c.mem_gbps else 0.0
    launch_ms = (c.launch_us or 0.0) / 1e3
    return launch_ms + max(compute_s, memory_s) * 1e3


def on_device(dep: Any, device: DeviceProfile, *, sigma: float = 0.1) -> tuple[Any, LatencyModel]:
    """``dep`` moved onto a device that is not here: block latencies from ``roofline_ms``.

    Accuracy is the device-independent part and stays the estimators'; links and
    dispatch costs are the profile's. Returns the new deployment and its latency model
    (with a log-normal spread ``sigma``: datasheets give no variance).
    """
    from loom.app.serve import Deployment  # the wiring sits above the simulator

    links = link_model(None, device)
    spaces, med = {}, {}
    for task, space in dep.spaces.items():
        feats = partition_features(dep.partitions[task])
        table = {}
        for b in {space.blocks[k] for k in space.blocks}:
            for p in device.processors:
                ms = roofline_ms(feats[b], p)
                if ms is not None:
                    table[(b, p.name)] = ms
        if not table:
            raise ConfigError(f"device {device.name!r}: no processor has datasheet figures (characteristics) "
                              "to simulate from")
        med.update(table)
        spaces[task] = replace(space, processors=list(device.processor_names), block_ms=table, link_model=links)
    moved = Deployment(dep.config, device, dep.estimates, dep.partitions, dep.families, spaces, dep.store)
    model = LatencyModel(med, {k: sigma for k in med}, source=f"roofline over {device.name}'s datasheet figures")
    return moved, model


# -- the simulated runtime -------------------------------------------------------------------------
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


@dataclass
class SimResult:
    policy: str
    records: list[RequestRecord]
    summary: dict[str, Any]
    #: seconds the simulation itself took (wall clock)
    wall_s: float
    requests: int
    latency_source: str
    peak_resident_mb: float | None = None
    resident_series: list[tuple[float, int]] = field(default_factory=list)
    simulated: bool = True

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else math.inf


def simulate(
    dep: Any,
    policy_name: str,
    latency: LatencyModel,
    *,
    duration_s: float | None = None,
    rate_scale: float = 1.0,
    correction: bool | None = None,
    slowdowns: Sequence[Slowdown] = (),
    replan_s: float = 1.0,
    seed: int | None = None,
    trace: Sequence[TraceItem] | None = None,
    overhead: HostOverhead | None = None,
) -> SimResult:
    """``run_trace``'s run, simulated: the config's seeded trace under one policy.

    Same trace as the real run for the same config, seed, duration and ``rate_scale``.
    ``seed`` seeds the latency draws (default: the config's run seed).
    """
    from loom.app.serve import control_events  # the wiring sits above the simulator

    cfg = dep.config
    duration = cfg.run.duration_s if duration_s is None else duration_s
    if trace is None:
        # the samples drawn do not matter here, but their count keeps the trace run_trace's
        n_samples = {t: len(dep.inputs(t)) for t in cfg.task_names}
        trace = make_trace(cfg, n_samples, duration_s=duration, rate_scale=rate_scale)
    policy = get_policy(policy_name)
    bindings = dep.bindings(policy.name)
    mix = dep.mixes({b.task: b.candidates for b in bindings}) if policy.adaptive else {}
    sim = SimRuntime(
        tasks=bindings, processors=list(dep.device.processor_names), latency=latency, policy_name=policy.name,
        adaptive=policy.adaptive, on_unservable=cfg.on_unservable, correction=dep.corrector(correction),
        memory_budget_mb=cfg.memory_budget_mb, slowdowns=slowdowns,
        seed=cfg.run.seed if seed is None else seed, rates=dep.rates(), mix=mix, overhead=overhead,
    )
    dep.steer(sim.scheduler, policy.name, bindings, mix)
    timeline = control_events(dep, policy.name, sim, duration_s=duration, correction=correction,
                              replan_s=replan_s, clock=sim.now)
    t0 = time.perf_counter()
    sim.run(trace, sorted(timeline, key=lambda e: e[0]))
    wall = time.perf_counter() - t0
    records = sorted(sim.records, key=lambda r: r.id)
    summary = summarize(records, duration, warmup_s=min(cfg.run.warmup_s, duration / 2))
    peak = sim.peak_resident_bytes / 2**20 if sim.preloader is not None else None
    return SimResult(policy.name, records, summary, wall, len(trace), latency.source, peak, sim.resident_series)
