"""The per-request choice of a plan, from the task's candidates and the processors' backlogs.

For each candidate the scheduler predicts when it would finish if admitted now (corrected
block latencies, hand-offs, what is reserved ahead of it under EDF, loads when blocks are
not resident) and takes, among those meeting the accuracy floor and the deadline, the one
with the least busy time; ``admit`` reserves its segments. The rule and the measured facts
behind it: docs/serving.md.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from loom.core.errors import ConfigError
from loom.serving.correction import CorrectionView, LatencyCorrector
from loom.serving.pricing import (
    VECTOR_MIN,
    CandidateTable,
    Priced,
    Static,
    dispatch_ms,
    plan_structure,
)
from loom.serving.reservations import ON_UNSERVABLE, Decision, Reservation, processor_set
from placement.plan import Plan

__all__ = ["ON_UNSERVABLE", "Decision", "Reservation", "Scheduler", "dispatch_ms", "processor_set"]

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
        #: loading it (docs/serving.md, "Residency"). Either missing: no load priced.
        self.resident = resident
        self.load_ms = load_ms
        self._load: Callable[[str, str], float] | None = None
        self._lock = threading.Lock()
        self._reservations: dict[str, dict[int, Reservation]] = {p: {} for p in processors}
        self._ids = itertools.count()
        self._static: dict[int, tuple[Plan, Static]] = {}
        #: id(candidate list) -> its arrays (a task's list lives until set_candidates)
        self._tables: dict[int, CandidateTable] = {}
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
        #: a late request predicted to end more than this many times its latency bound after
        #: its deadline is shed (``violate``; ``reject`` refuses every late one): the late lane
        #: stays bounded at any offered load
        self.late_bound_factor = 10.0
        self._cheapest_memo: dict[tuple[int, float], tuple[Sequence[Plan], int]] = {}
        #: candidate pricings the last ``admit`` did (a plan priced twice counts twice; a
        #: candidate table counts its rows): a few integer adds per decision, read by
        #: ``loom.serving.overhead`` under the runtime's lock
        self.priced = 0
        self._procs_memo: dict[int, tuple[Sequence[Plan], set[str]]] = {}
        #: a processor whose running job has taken ``stuck_factor`` times its predicted ms, and
        #: at least ``stuck_floor_s``, is unhealthy: booked forever for new requests until that
        #: job returns (docs/serving.md, "Faults")
        self.stuck_factor = 10.0
        self.stuck_floor_s = 1.0

    # -- what predictions miss -------------------------------------------------------------
    def observe_completion(self, plan: Plan, predicted_finish_s: float, end_s: float) -> None:
        """Learn how much later than predicted requests on ``plan``'s processors end.

        What the per-block correction misses (wake-ups, hand-off overhead, preemption):
        an exponentially weighted mean per processor set (``residual_alpha``), which
        ``residual_ms`` gives the planner. Why: docs/serving.md, "Residuals".
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
        ``placement.optimizer.assign`` at the tasks' rates. A request takes the mix plan
        furthest behind its share (deficit round robin) among those meeting the floor and
        predicted on time; when none is on time, the full rule decides. ``None`` removes
        the mix. Why: docs/serving.md, "The planned mix".
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
                    if r.started_s is not None and self._overrun(r, now_s):
                        ahead = math.inf  # unhealthy: no new work is planned there
            out[p] = now_s + ahead / 1e3
            if ahead == 0.0 and self.wake_aware:
                # an idle worker first has to wake up: its recent tail of wake-up delays
                out[p] += self._wake_now(p, now_s)
        return out

    def _overrun(self, r: Reservation, now_s: float) -> bool:
        """Whether started reservation ``r`` has run past its bound (its processor is unhealthy)."""
        assert r.started_s is not None
        return now_s - r.started_s > max(self.stuck_factor * r.ms / 1e3, self.stuck_floor_s)

    def unhealthy(self, now_s: float) -> dict[str, str]:
        """Processors whose running job has overrun its bound, and why."""
        with self._lock:
            return {
                r.processor: f"a call running for {now_s - r.started_s:.1f} s, predicted {r.ms:.1f} ms"
                for rs in self._reservations.values() for r in rs.values()
                if r.started_s is not None and self._overrun(r, now_s)
            }

    def holds(self, reservation: Reservation) -> bool:
        """Whether ``reservation`` is still reserved (admitted, its job not ended)."""
        with self._lock:
            return reservation.id in self._reservations.get(reservation.processor, {})

    # -- waking an idle worker ----------------------------------------------------------------
    def observe_wake(self, processor: str, delay_s: float, now_s: float) -> None:
        """An idle worker of ``processor`` started a job ``delay_s`` after it was handed over.

        Tracks a high quantile (``wake_quantile``) of these delays per processor by
        stochastic approximation (steps of ``wake_step_s``), relaxed toward 0 with
        ``wake_half_life_s`` of no observations; with ``wake_aware`` (off by default) an
        idle processor's free time is pushed back by it. Only with an enabled corrector.
        Why, and why off: docs/serving.md, "Wake-up delays".
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

    def _structure(self, plan: Plan) -> Static:
        # keyed by id() (hashing a Plan hashes all its tuples); the plan is kept alongside
        # so that its id cannot be reused by another object while the entry lives
        hit = self._static.get(id(plan))
        if hit is not None and hit[0] is plan:
            return hit[1]
        if len(self._static) > 50_000:  # candidates replaced many times over: start afresh
            self._static.clear()
        st = plan_structure(plan)
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
    ) -> Priced:
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
        return Priced(index, plan, ready, busy, tuple(seg_ms))

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
        """The plan for one request of ``task`` arriving at ``now_s`` (docs/serving.md, "The rule")."""
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
        free: dict[str, float] | None = None,
    ) -> Decision:
        if not candidates:
            return Decision(None, math.inf, False, f"{task}: no candidate plans")
        free = free if free is not None else self._free_at(now_s, (deadline_s, -priority))
        view = self._view(now_s)
        memo: dict[tuple[str, str], float] = {}
        # set under the lock, read by every pricing of this decision
        self._load = self._load_cost()
        if not adaptive:
            self.priced += 1
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
            self.priced += 1
            c = self._price(best, candidates[best], now_s, free, view, memo)
            return Decision(
                c.plan, c.finish_s, True, f"least busy of {n_feasible} feasible of {len(candidates)}", c.segment_ms
            )
        if self.on_unservable == "reject":
            why = "none meets the accuracy floor" if not n_accurate else "none predicted to meet the deadline"
            return Decision(None, math.inf, False, f"{why} ({len(candidates)} candidates): rejected")
        if earliest is not None:
            self.priced += 1
            c = self._price(earliest, candidates[earliest], now_s, free, view, memo)
            return Decision(c.plan, c.finish_s, False, "no candidate meets the deadline: earliest finish",
                            c.segment_ms)
        top = max(p.accuracy for p in candidates)
        accurate = [self._price(i, p, now_s, free, view, memo) for i, p in enumerate(candidates) if p.accuracy == top]
        self.priced += len(accurate)
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
        best: tuple[float, float, float, Priced] | None = None
        load = self._load
        n = 0
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
            n += 1
            late = 0.0 if c.finish_s <= deadline_s else 1.0
            key = (late, -(share * total - chosen.get((p.config, p.placement), 0)), c.finish_s)
            if best is None or key < best[:3]:
                best = (*key, c)
        self.priced += n
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
        if len(candidates) < VECTOR_MIN or any(p.k != k for p in candidates):
            return self._best_loop(candidates, now_s, deadline_s, floor, free, view, memo)
        table = self._tables.get(id(candidates))
        if table is None or not table.matches(candidates):
            if len(self._tables) > 256:
                self._tables.clear()
            table = self._tables[id(candidates)] = CandidateTable(candidates)
        finish, busy = table.price(now_s, free, view, self._load)
        self.priced += len(candidates)
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
        earliest: Priced | None = None
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
        self.priced += n_acc
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
            self.priced = 0
            key = (deadline_s, -priority)
            free = self._free_at(now_s, key)
            if candidates and self._hopeless(candidates, now_s, deadline_s, free):
                # every processor is booked past the deadline: no plan needs pricing
                d = Decision(candidates[0], math.inf, False, "every processor is booked past the deadline")
                if self.on_unservable == "reject":
                    d = Decision(None, math.inf, False, f"{d.reason}: rejected", shed=True)
            else:
                d = self._choose(task, candidates, now_s, deadline_s, accuracy_floor, adaptive, priority, free)
            if d.plan is not None and d.predicted_finish_s > deadline_s:
                d, key = self._late(candidates, d, now_s, deadline_s, accuracy_floor, adaptive)
            if d.plan is None:
                return d, []
            out = []
            for (proc, _slots), ms in zip(d.plan.segments(), d.segment_ms, strict=True):
                r = Reservation(next(self._ids), proc, ms, key)
                self._reservations.setdefault(proc, {})[r.id] = r
                out.append(r)
            return d, out

    def _hopeless(self, candidates: Sequence[Plan], now_s: float, deadline_s: float, free: dict[str, float]) -> bool:
        """Whether every processor the candidates use is booked past ``deadline_s`` (a cheap early no)."""
        hit = self._procs_memo.get(id(candidates))
        if hit is None or hit[0] is not candidates:
            if len(self._procs_memo) > 256:
                self._procs_memo.clear()
            hit = self._procs_memo[id(candidates)] = (candidates, {p for plan in candidates for p in plan.placement})
        return min(free.get(p, now_s) for p in hit[1]) >= deadline_s

    def _late(self, candidates: Sequence[Plan], d: Decision, now_s: float, deadline_s: float, floor: float,
              adaptive: bool) -> tuple[Decision, tuple[float, float]]:
        """A request that no plan serves on time runs after every request that still can.

        Its jobs and reservations take the key (inf, arrival): behind all on-time work, in
        arrival order, so that the requests that can still make it do (EDF would put the
        late ones first, their deadlines being the earliest, and make everything late).
        It runs the plan that costs the processors least, and is shed when even that is
        predicted to end more than ``late_bound_factor`` times its bound after its deadline.
        """
        key = (math.inf, now_s)
        i = self._cheapest(candidates, floor) if adaptive else 0
        self._load = self._load_cost()
        free, view = self._free_at(now_s, key), self._view(now_s)
        c = self._price(i, candidates[i], now_s, free, view, {})
        self.priced += 1
        if adaptive and math.isinf(c.finish_s):  # it needs an unhealthy processor: the cheapest without
            avoid = {p for p, t in free.items() if math.isinf(t)}
            ok = [j for j, p in enumerate(candidates) if avoid.isdisjoint(p.placement)]
            if ok:
                j = ok[_least_cost([candidates[j] for j in ok], floor)]
                c = self._price(j, candidates[j], now_s, free, view, {})
                self.priced += 1
        if math.isinf(c.finish_s):
            stuck = sorted(p for p, t in free.items() if math.isinf(t))
            return Decision(None, math.inf, False, f"every plan needs an unhealthy processor {stuck} (a call stuck "
                                                   "past its bound): shed", shed=True), key
        if c.finish_s > deadline_s + self.late_bound_factor * (deadline_s - now_s):
            late_ms = (c.finish_s - deadline_s) * 1e3
            return Decision(None, math.inf, False, f"overload: predicted {late_ms:.1f} ms late: shed", shed=True), key
        return Decision(c.plan, c.finish_s, False, f"{d.reason}; late: after the requests on time, least cost",
                        c.segment_ms), key

    def _cheapest(self, candidates: Sequence[Plan], floor: float) -> int:
        """The candidate with the least predicted processor time among those meeting ``floor``
        (the most accurate when none does); remembered per candidate list, as it needs no queue."""
        hit = self._cheapest_memo.get((id(candidates), floor))
        if hit is not None and hit[0] is candidates:
            return hit[1]
        if len(self._cheapest_memo) > 256:
            self._cheapest_memo.clear()
        i = _least_cost(candidates, floor)
        self._cheapest_memo[(id(candidates), floor)] = (candidates, i)
        return i

    def start(self, reservation: Reservation, now_s: float) -> None:
        """Its job began running on the worker."""
        with self._lock:
            reservation.started_s = now_s

    def finish(self, reservation: Reservation) -> None:
        """Its job ended (or will never run). Idempotent."""
        with self._lock:
            self._reservations.get(reservation.processor, {}).pop(reservation.id, None)


def _least_cost(candidates: Sequence[Plan], floor: float) -> int:
    """Index of the least predicted latency among those meeting ``floor`` (else the most accurate)."""
    top = floor if any(p.accuracy >= floor for p in candidates) else max(p.accuracy for p in candidates)
    return min((i for i, p in enumerate(candidates) if p.accuracy >= top), key=lambda i: candidates[i].latency_ms)
