"""The per-request choice of a plan, from the task's candidates and the processors' backlogs.

The optimizer hands each task a list of candidate plans (a Pareto set, or a single
plan for the fixed-plan baselines). For every request the scheduler predicts, for each
candidate, when it would finish if admitted now: walking the plan's segments (runs of
consecutive slots on one processor), a segment starts when both its input is ready and
its processor is free, and lasts the sum of its blocks' *corrected* predicted
latencies (``loom.serving.correction``); a hand-off between processors adds the plan's
``transfer_ms``; the first processor's dispatch cost comes first.

When a processor is free comes from the **reservations**: admitting a request reserves
each of its segments' corrected ms on its processor, a worker marks a reservation
started when the job begins and finished when it ends. Workers run their queue
earliest deadline first, so a new request waits only for the running job and for the
reservations that would run before it (earlier deadline, or equal deadline and not
lower priority): ``free_at`` counts exactly those. A reservation for a later segment
counts on its processor from admission on, although its job is queued there only when
the earlier segment is done: a conservative estimate (the processor may idle
meanwhile), never an optimistic one.

The rule (adaptive policies): among the candidates that meet the accuracy floor and are
predicted to finish by the deadline, take the one with the **least total corrected busy
time** (ties: earliest predicted finish, then the candidates' order). Why this and not
the earliest finish: every candidate of that set already meets this request's SLO, so
finishing earlier buys this request nothing, while processor time is what the *other*
requests, of this task and of the others, need; spending the least of it keeps the
most capacity for them, and the deadline check already keeps this request safe. It is
the work-conserving choice under load: the fastest processor for a block fills first,
and work spills to slower ones only when the fast one's backlog would break a deadline.

When no candidate is feasible, ``on_unservable`` decides: ``"violate"`` runs the
candidate with the earliest predicted finish among those meeting the floor (the most
accurate one when none meets it), marked infeasible, so the violation is as small as
the plans allow; ``"reject"`` refuses the request (plan ``None``) so that it costs no
processor time. Non-adaptive policies always take ``candidates[0]``; its feasibility is
still predicted, and ``"reject"`` applies to it as well: rejecting is an admission rule
of the runtime, not a choice of plan, and applying it to every policy keeps
comparisons fair.

Residency (optional, ``resident`` and ``load_ms``): a block that is not resident on
its processor is loaded on demand inside the request's job, so its predicted load
time is added to that segment (its finish and its busy time, hence its reservation).
Plans whose blocks are resident then win whenever a load would break the deadline,
and, among feasible plans, unless the load is cheaper than the busy time it saves.
Without them every block counts as resident (the behaviour before the preloader).

Cost: one lock-free snapshot of the corrector per decision; a task's candidate list is
turned into arrays once (``_Table``) and each decision is then k vector steps over all
candidates: about 0.2 ms for 300 candidates on the 2-core development machine (short
lists take a plain loop, which is as fast there).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from loom.core.errors import ConfigError
from loom.serving.correction import CorrectionView, LatencyCorrector
from placement.plan import Plan

__all__ = ["ON_UNSERVABLE", "Decision", "Reservation", "Scheduler", "dispatch_ms", "processor_set"]

ON_UNSERVABLE = ("violate", "reject")


@dataclass(frozen=True)
class Decision:
    plan: Plan | None
    #: predicted completion (seconds, the caller's clock); inf when rejected
    predicted_finish_s: float
    #: the plan meets the accuracy floor and is predicted to finish by the deadline
    feasible: bool
    reason: str
    #: corrected busy ms of each of the plan's segments (what ``admit`` reserves)
    segment_ms: tuple[float, ...] = ()


@dataclass(eq=False)
class Reservation:
    """One segment's predicted work on one processor, from admission to the end of its job."""

    id: int
    processor: str
    ms: float
    #: EDF order of the job on its worker: (deadline, -priority)
    key: tuple[float, float]
    started_s: float | None = None

    def remaining_ms(self, now_s: float) -> float:
        if self.started_s is None:
            return self.ms
        return max(0.0, self.ms - (now_s - self.started_s) * 1e3)


def dispatch_ms(plan: Plan) -> float:
    """The part of a plan's predicted latency that is neither blocks nor hand-offs."""
    return max(0.0, plan.latency_ms - sum(plan.block_ms) - sum(plan.transfer_ms))


@dataclass
class _Priced:
    index: int
    plan: Plan
    finish_s: float
    busy_ms: float
    segment_ms: tuple[float, ...]


#: a plan's fixed structure, priced once: (dispatch s, ((processor, hand-off s before, ((pair, ms), ...)), ...))
_Static = tuple[float, tuple[tuple[str, float, tuple[tuple[tuple[str, str], float], ...]], ...]]


def _static(plan: Plan) -> _Static:
    segs = []
    prev: int | None = None
    for proc, slots in plan.segments():
        hand_off = plan.transfer_ms[prev] / 1e3 if prev is not None and prev < len(plan.transfer_ms) else 0.0
        segs.append((proc, hand_off, tuple(((plan.block_ids[s], proc), plan.block_ms[s]) for s in slots)))
        prev = slots[-1]
    return dispatch_ms(plan) / 1e3, tuple(segs)


class _Table:
    """A candidate list as arrays, built once per list: a decision is then k vector steps.

    Slot by slot, ``ready = max(ready + hand-off, free[processor]) + corrected ms`` is the
    segment walk: inside a segment ``ready`` is already past the processor's free time,
    so taking the max at every slot changes nothing.
    """

    def __init__(self, plans: Sequence[Plan]) -> None:
        self.plans = list(plans)
        n, k = len(plans), plans[0].k
        self.procs: list[str] = []
        self.pairs: list[tuple[str, str]] = []
        proc_ix: dict[str, int] = {}
        pair_ix: dict[tuple[str, str], int] = {}
        self.accuracy = np.array([p.accuracy for p in plans], dtype=np.float64)
        self.dispatch_s = np.array([dispatch_ms(p) / 1e3 for p in plans], dtype=np.float64)
        self.ms = np.zeros((n, k))
        self.hand_off_s = np.zeros((n, k))
        self.proc = np.zeros((n, k), dtype=np.intp)
        self.pair = np.zeros((n, k), dtype=np.intp)
        for i, plan in enumerate(plans):
            for s, (b, proc) in enumerate(zip(plan.block_ids, plan.placement, strict=True)):
                self.proc[i, s] = proc_ix.setdefault(proc, len(proc_ix))
                self.pair[i, s] = pair_ix.setdefault((b, proc), len(pair_ix))
                self.ms[i, s] = plan.block_ms[s]
                if s and plan.placement[s - 1] != proc and s - 1 < len(plan.transfer_ms):
                    self.hand_off_s[i, s] = plan.transfer_ms[s - 1] / 1e3
        self.procs = list(proc_ix)
        self.pairs = list(pair_ix)

    def matches(self, plans: Sequence[Plan]) -> bool:
        return len(plans) == len(self.plans) and all(a is b for a, b in zip(plans, self.plans, strict=True))

    def price(
        self, now_s: float, free: dict[str, float], view: CorrectionView,
        load_ms: Callable[[str, str], float] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Predicted finish (s) and corrected busy ms of every candidate (loads included)."""
        mult = np.array([view.multiplier(b, p) for b, p in self.pairs]) if view.enabled else None
        cms = self.ms * mult[self.pair] if mult is not None else self.ms
        if load_ms is not None:
            cms = cms + np.array([load_ms(b, p) for b, p in self.pairs])[self.pair]
        free_v = np.array([free.get(p, now_s) for p in self.procs])
        ready = now_s + self.dispatch_s
        for s in range(self.ms.shape[1]):
            ready = np.maximum(ready + self.hand_off_s[:, s], free_v[self.proc[:, s]]) + cms[:, s] / 1e3
        return ready, cms.sum(axis=1)


def processor_set(plan: Plan) -> tuple[str, ...]:
    """What a plan's residual is learned by: the processors it uses (few keys, each well observed)."""
    return tuple(sorted(set(plan.placement)))


#: below this many candidates a plain loop is as fast as the arrays
_VECTOR_MIN = 24


class Scheduler:
    """Picks a plan per request from the candidates and the predicted processor backlogs."""

    def __init__(
        self,
        processors: Iterable[str] = (),
        *,
        corrector: LatencyCorrector | None = None,
        on_unservable: str = "violate",
        resident: Callable[[str, str], bool] | None = None,
        load_ms: Callable[[str, str], float] | None = None,
    ) -> None:
        if on_unservable not in ON_UNSERVABLE:
            raise ConfigError(f"on_unservable must be one of {list(ON_UNSERVABLE)}, got {on_unservable!r}")
        self.corrector = corrector
        self.on_unservable = on_unservable
        #: (block, processor) -> is it loaded there; with ``load_ms``, the predicted ms of
        #: loading it (see the module's note on residency). Either missing: no load priced.
        self.resident = resident
        self.load_ms = load_ms
        self._load: Callable[[str, str], float] | None = None
        self._lock = threading.Lock()
        self._reservations: dict[str, dict[int, Reservation]] = {p: {} for p in processors}
        self._ids = itertools.count()
        self._static: dict[int, tuple[Plan, _Static]] = {}
        #: id(candidate list) -> its arrays (a task's list lives until set_candidates)
        self._tables: dict[int, _Table] = {}
        #: task -> {(config, placement): share} from the joint assignment, and how often
        #: each was chosen since (see ``set_mix``)
        self._mix: dict[str, dict[tuple[tuple[str, ...], tuple[str, ...]], float]] = {}
        self._chosen: dict[str, dict[tuple[tuple[str, ...], tuple[str, ...]], int]] = {}
        #: processor set -> mean (measured end - predicted finish), seconds
        self._residual: dict[tuple[str, ...], float] = {}
        self.residual_alpha = 0.05
        #: processor -> (wake-up delay quantile in s, when last observed); see observe_wake
        self._wake: dict[str, tuple[float, float]] = {}
        self.wake_quantile = 0.9
        self.wake_step_s = 2e-4
        self.wake_half_life_s = 5.0
        self.wake_aware = False

    # -- what predictions miss -------------------------------------------------------------
    def observe_completion(self, plan: Plan, predicted_finish_s: float, end_s: float) -> None:
        """Learn how much later than predicted requests on ``plan``'s processors end.

        Block latencies are corrected one by one (``loom.serving.correction``); the rest of a
        request's way is not: the engine waking after an idle spell, the Python around
        each hand-off, a worker preempted by the threads that submit. On the host,
        a text request on the OpenVINO core took 4.4 ms for 1.5 ms predicted while
        its blocks alone ran close to their prediction. The mean residual per processor
        set (exponentially weighted, ``residual_alpha``) is what ``residual_ms`` gives the
        planner, which adds it to the plans' latencies when it re-plans.
        """
        key = processor_set(plan)
        err = end_s - predicted_finish_s
        with self._lock:
            old = self._residual.get(key)
            self._residual[key] = err if old is None else old + self.residual_alpha * (err - old)

    def residual_ms(self, plan: Plan) -> float:
        """The learned mean residual (ms) of requests on ``plan``'s processors (0 before any)."""
        return max(0.0, self._residual.get(processor_set(plan), 0.0) * 1e3)

    def residuals(self) -> dict[str, float]:
        """Learned residual (ms) per processor set, for reports."""
        with self._lock:
            return {"+".join(k): v * 1e3 for k, v in self._residual.items()}

    # -- the planned mix ------------------------------------------------------------------
    def set_mix(self, task: str, shares: dict[tuple[tuple[str, ...], tuple[str, ...]], float] | None) -> None:
        """Steer an adaptive task toward the joint assignment's mix of plans.

        ``shares``: (config, placement) -> share of the task's requests, from
        ``placement.optimizer.assign`` at the tasks' rates (the caller re-solves it when
        rates or corrected latencies move). Why: the greedy per-request rule (least busy
        time) fills the fastest processor first and spills only when the model predicts
        a missed deadline. On the host that put every task on onnxruntime's core, where
        image-cls's 6 ms blocks held up the 3 ms-bound small tasks (workers do not
        preempt), while predictions made optimistic by the load said all was well: 33%
        violations against 12% for the static split. The LP balances all tasks at once.

        With a mix, a request takes the mix plan furthest behind its share (deficit
        round robin) among those meeting the floor and predicted on time; when none is
        on time, still the one furthest behind (the plan stays the plan: a spill to a
        plan off the mix lands on the processor the LP kept free for another task).
        ``None`` removes the mix: the greedy rule applies again.
        """
        with self._lock:
            if shares:
                total = sum(shares.values())
                self._mix[task] = {k: v / total for k, v in shares.items() if v > 0}
            else:
                self._mix.pop(task, None)
            self._chosen[task] = {}

    # -- backlog --------------------------------------------------------------------------
    def free_at(self, now_s: float, *, deadline_s: float = math.inf, priority: float = 0.0) -> dict[str, float]:
        """When each processor would start a job of a request with this deadline, under EDF."""
        with self._lock:
            return self._free_at(now_s, (deadline_s, -priority))

    def _free_at(self, now_s: float, key: tuple[float, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for p, reservations in self._reservations.items():
            ahead = 0.0
            for r in reservations.values():
                # the running job is never preempted; queued ones run before us if EDF says so
                if r.started_s is not None or r.key <= key:
                    ahead += r.remaining_ms(now_s)
            out[p] = now_s + ahead / 1e3
            if ahead == 0.0 and self.wake_aware:
                # an idle worker first has to wake up: its recent tail of wake-up delays
                out[p] += self._wake_now(p, now_s)
        return out

    # -- waking an idle worker ----------------------------------------------------------------
    def observe_wake(self, processor: str, delay_s: float, now_s: float) -> None:
        """An idle worker of ``processor`` started a job ``delay_s`` after it was handed over.

        What a competing process on the worker's core costs shows here, not in the
        blocks: the kernel lets the woken worker run its block at full speed, but now
        and then it first waits out the other process's time slice (measured on the
        host with a busy loop pinned to core 0: the p90 of submit-to-first-block went
        from 0.9 to 3.7 ms, block times unchanged). A high quantile (``wake_quantile``)
        is tracked per processor by stochastic approximation (steps of
        ``wake_step_s``), relaxed toward 0 with ``wake_half_life_s`` of no
        observations, so a processor avoided for being slow to wake gets probed again;
        with ``wake_aware`` an idle processor's free time is pushed back by it
        (``free_at``). Only with an enabled corrector: it is part of the online correction.

        ``wake_aware`` is off by default. Measured on the host (175 requests/s, a busy
        loop on core 0 for 6 s): it moved the load off core 0 (share 95% -> 12%) and back
        after, but violations during the contention rose from 23% to 55%: the only other
        processor runs these blocks 2-5x slower and shares its core with the runtime's
        own threads. Where the alternative is not that much slower (an SoC's GPU or
        NPU), it is the signal to act on; the tracking always runs (``wake_ms``).
        """
        if self.corrector is None or not self.corrector.enabled or not math.isfinite(delay_s):
            return
        with self._lock:
            q = self._wake_now(processor, now_s)
            tau = self.wake_quantile
            q += self.wake_step_s * (tau - (1.0 if delay_s <= q else 0.0)) / max(tau, 1.0 - tau)
            self._wake[processor] = (max(0.0, q), now_s)

    def _wake_now(self, processor: str, now_s: float) -> float:
        q, last = self._wake.get(processor, (0.0, now_s))
        return q * 0.5 ** (max(0.0, now_s - last) / self.wake_half_life_s)

    def wake_ms(self, now_s: float) -> dict[str, float]:
        """The wake-up delay quantile (ms) now, per processor, for reports."""
        with self._lock:
            return {p: self._wake_now(p, now_s) * 1e3 for p in self._wake}

    def backlog_ms(self, now_s: float) -> dict[str, float]:
        """Predicted ms of work reserved on each processor (running and waiting)."""
        with self._lock:
            return {p: sum(r.remaining_ms(now_s) for r in rs.values()) for p, rs in self._reservations.items()}

    def reserved(self) -> dict[str, int]:
        """Number of reserved (admitted, not finished) segments per processor."""
        with self._lock:
            return {p: len(rs) for p, rs in self._reservations.items()}

    # -- choosing -------------------------------------------------------------------------
    def _load_cost(self) -> Callable[[str, str], float] | None:
        """ms a decision adds for a pair's load: 0 when resident; None when loads are not priced."""
        resident, load_ms = self.resident, self.load_ms
        if resident is None or load_ms is None:
            return None
        cache: dict[tuple[str, str], float] = {}

        def cost(block: str, processor: str) -> float:
            # one answer per pair per decision: residency may change under us, and the
            # callables may be slow (they read the caches)
            v = cache.get((block, processor))
            if v is None:
                v = cache[(block, processor)] = 0.0 if resident(block, processor) else float(load_ms(block, processor))
            return v

        return cost

    def _view(self, now_s: float) -> CorrectionView:
        return self.corrector.view(now_s) if self.corrector is not None else CorrectionView(False)

    def _structure(self, plan: Plan) -> _Static:
        # keyed by id() (hashing a Plan hashes all its tuples); the plan is kept alongside
        # so that its id cannot be reused by another object while the entry lives
        hit = self._static.get(id(plan))
        if hit is not None and hit[0] is plan:
            return hit[1]
        if len(self._static) > 50_000:  # candidates replaced many times over: start afresh
            self._static.clear()
        st = _static(plan)
        self._static[id(plan)] = (plan, st)
        return st

    def _price(
        self,
        index: int,
        plan: Plan,
        now_s: float,
        free: dict[str, float],
        view: CorrectionView,
        memo: dict[tuple[str, str], float],
        *,
        detail: bool = True,
    ) -> _Priced:
        """Predicted finish and corrected busy time of ``plan`` if admitted at ``now_s``.

        The hot loop of a decision: plain floats and dict lookups only.
        """
        dispatch_s, segs = self._structure(plan)
        load = self._load
        ready = now_s + dispatch_s
        busy = 0.0
        seg_ms: list[float] = []
        for proc, hand_off_s, blocks in segs:
            ready += hand_off_s
            ms = 0.0
            for pair, predicted in blocks:
                mult = memo.get(pair)
                if mult is None:
                    mult = memo[pair] = view.multiplier(*pair)
                ms += predicted * mult
                if load is not None:
                    ms += load(*pair)
            # a processor no reservation knows of is free now
            free_s = free.get(proc, now_s)
            if free_s > ready:
                ready = free_s
            ready += ms / 1e3
            busy += ms
            if detail:
                seg_ms.append(ms)
        return _Priced(index, plan, ready, busy, tuple(seg_ms))

    def choose(
        self,
        task: str,
        candidates: Sequence[Plan],
        *,
        now_s: float,
        deadline_s: float,
        accuracy_floor: float,
        adaptive: bool,
        priority: float = 0.0,
    ) -> Decision:
        """The plan for one request of ``task`` arriving at ``now_s`` (see the module's rule)."""
        with self._lock:
            return self._choose(task, candidates, now_s, deadline_s, accuracy_floor, adaptive, priority)

    def _choose(
        self,
        task: str,
        candidates: Sequence[Plan],
        now_s: float,
        deadline_s: float,
        floor: float,
        adaptive: bool,
        priority: float,
    ) -> Decision:
        if not candidates:
            return Decision(None, math.inf, False, f"{task}: no candidate plans")
        free = self._free_at(now_s, (deadline_s, -priority))
        view = self._view(now_s)
        memo: dict[tuple[str, str], float] = {}
        # set under the lock, read by every pricing of this decision
        self._load = self._load_cost()
        if not adaptive:
            c = self._price(0, candidates[0], now_s, free, view, memo)
            accurate = c.plan.accuracy >= floor
            on_time = c.finish_s <= deadline_s
            if accurate and on_time:
                return Decision(c.plan, c.finish_s, True, "fixed plan: feasible", c.segment_ms)
            why = "below the accuracy floor" if not accurate else "predicted to miss the deadline"
            if self.on_unservable == "reject":
                return Decision(None, math.inf, False, f"fixed plan {why}: rejected")
            return Decision(c.plan, c.finish_s, False, f"fixed plan {why}", c.segment_ms)

        mix = self._mix.get(task)
        if mix:
            picked = self._pick_from_mix(task, mix, candidates, now_s, deadline_s, floor, free, view, memo)
            if picked is not None:
                return picked
        best, earliest, n_accurate, n_feasible = self._best(candidates, now_s, deadline_s, floor, free, view, memo)
        if best is not None:
            c = self._price(best, candidates[best], now_s, free, view, memo)
            return Decision(
                c.plan, c.finish_s, True, f"least busy of {n_feasible} feasible of {len(candidates)}", c.segment_ms
            )
        if self.on_unservable == "reject":
            why = "none meets the accuracy floor" if not n_accurate else "none predicted to meet the deadline"
            return Decision(None, math.inf, False, f"{why} ({len(candidates)} candidates): rejected")
        if earliest is not None:
            c = self._price(earliest, candidates[earliest], now_s, free, view, memo)
            return Decision(c.plan, c.finish_s, False, "no candidate meets the deadline: earliest finish",
                            c.segment_ms)
        top = max(p.accuracy for p in candidates)
        accurate = [self._price(i, p, now_s, free, view, memo) for i, p in enumerate(candidates) if p.accuracy == top]
        best = min(accurate, key=lambda c: (c.finish_s, c.index))
        return Decision(best.plan, best.finish_s, False, "no candidate meets the accuracy floor: most accurate",
                        best.segment_ms)

    def _pick_from_mix(
        self,
        task: str,
        mix: dict[tuple[tuple[str, ...], tuple[str, ...]], float],
        candidates: Sequence[Plan],
        now_s: float,
        deadline_s: float,
        floor: float,
        free: dict[str, float],
        view: CorrectionView,
        memo: dict[tuple[str, str], float],
    ) -> Decision | None:
        chosen = self._chosen.setdefault(task, {})
        total = sum(chosen.values()) + 1
        best: tuple[float, float, float, _Priced] | None = None
        load = self._load
        for i, p in enumerate(candidates):
            share = mix.get((p.config, p.placement))
            if share is None or p.accuracy < floor:
                continue
            if load is not None and any(load(b, q) for b, q in zip(p.block_ids, p.placement, strict=True)):
                # under a memory budget the mix takes only resident plans: the mix knows
                # nothing of memory, and following it into loads evicts what the next
                # request needs (thrashing). The full rule below prices the loads.
                continue
            c = self._price(i, p, now_s, free, view, memo)
            late = 0.0 if c.finish_s <= deadline_s else 1.0
            key = (late, -(share * total - chosen.get((p.config, p.placement), 0)), c.finish_s)
            if best is None or key < best[:3]:
                best = (*key, c)
        if best is None:
            return None
        c = best[3]
        if best[0]:
            # no plan of the mix is on time: the whole candidate set may still have one
            return None
        k = (c.plan.config, c.plan.placement)
        chosen[k] = chosen.get(k, 0) + 1
        return Decision(c.plan, c.finish_s, True, "the planned mix: furthest behind its share", c.segment_ms)

    def _best(
        self,
        candidates: Sequence[Plan],
        now_s: float,
        deadline_s: float,
        floor: float,
        free: dict[str, float],
        view: CorrectionView,
        memo: dict[tuple[str, str], float],
    ) -> tuple[int | None, int | None, int, int]:
        """Index of the best feasible candidate and of the earliest finish meeting the floor.

        Also the numbers meeting the floor and feasible, for the decision's reason.
        """
        k = candidates[0].k
        if len(candidates) < _VECTOR_MIN or any(p.k != k for p in candidates):
            return self._best_loop(candidates, now_s, deadline_s, floor, free, view, memo)
        table = self._tables.get(id(candidates))
        if table is None or not table.matches(candidates):
            if len(self._tables) > 256:
                self._tables.clear()
            table = self._tables[id(candidates)] = _Table(candidates)
        finish, busy = table.price(now_s, free, view, self._load)
        accurate = table.accuracy >= floor
        feasible = accurate & (finish <= deadline_s)
        n_acc, n_feas = int(accurate.sum()), int(feasible.sum())
        best = earliest = None
        if n_feas:
            ix = np.flatnonzero(feasible)
            # lexsort: the last key is the primary one
            order = np.lexsort((ix, finish[ix], np.round(busy[ix], 9)))
            best = int(ix[order[0]])
        if n_acc:
            ix = np.flatnonzero(accurate)
            earliest = int(ix[np.lexsort((ix, finish[ix]))[0]])
        return best, earliest, n_acc, n_feas

    def _best_loop(
        self,
        candidates: Sequence[Plan],
        now_s: float,
        deadline_s: float,
        floor: float,
        free: dict[str, float],
        view: CorrectionView,
        memo: dict[tuple[str, str], float],
    ) -> tuple[int | None, int | None, int, int]:
        """``_best`` one plan at a time: for short lists, and the reference of the arrays."""
        best_key: tuple[float, float] | None = None
        best: int | None = None
        earliest: _Priced | None = None
        n_acc = n_feas = 0
        for i, p in enumerate(candidates):
            if p.accuracy < floor:
                continue
            n_acc += 1
            c = self._price(i, p, now_s, free, view, memo, detail=False)
            if earliest is None or c.finish_s < earliest.finish_s:
                earliest = c
            if c.finish_s <= deadline_s:
                n_feas += 1
                key = (round(c.busy_ms, 9), c.finish_s)
                if best_key is None or key < best_key:
                    best_key, best = key, i
        return best, None if earliest is None else earliest.index, n_acc, n_feas

    # -- admission and the workers' reports ------------------------------------------------
    def admit(
        self,
        task: str,
        candidates: Sequence[Plan],
        *,
        now_s: float,
        deadline_s: float,
        accuracy_floor: float,
        adaptive: bool,
        priority: float = 0.0,
    ) -> tuple[Decision, list[Reservation]]:
        """``choose`` and reserve the chosen plan's segments, atomically.

        Atomic so that two requests submitted at once from two threads do not both see
        the same idle processor and pile onto it.
        """
        with self._lock:
            d = self._choose(task, candidates, now_s, deadline_s, accuracy_floor, adaptive, priority)
            if d.plan is None:
                return d, []
            key = (deadline_s, -priority)
            out = []
            for (proc, _slots), ms in zip(d.plan.segments(), d.segment_ms, strict=True):
                r = Reservation(next(self._ids), proc, ms, key)
                self._reservations.setdefault(proc, {})[r.id] = r
                out.append(r)
            return d, out

    def start(self, reservation: Reservation, now_s: float) -> None:
        """Its job began running on the worker."""
        with self._lock:
            reservation.started_s = now_s

    def finish(self, reservation: Reservation) -> None:
        """Its job ended (or will never run). Idempotent."""
        with self._lock:
            self._reservations.get(reservation.processor, {}).pop(reservation.id, None)
