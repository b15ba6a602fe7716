"""The hot-subgraph preloader: which (block, processor) pairs stay resident within a memory budget.

``HotnessTracker`` keeps each pair's decayed use rate; ``replaceability`` says how much a
task loses without a pair; ``Preloader`` picks the initial set (greedy by hotness per
byte) and, before a load, what to evict (coldest first, never a protected pair). The
decisions are pure: the runtime loads and evicts. Design notes: docs/serving.md.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence

from placement.plan import Plan

__all__ = ["HotnessTracker", "Key", "Preloader", "plan_keys", "replaceability"]

#: (block id, processor)
Key = tuple[str, str]


def plan_keys(plan: Plan) -> list[Key]:
    """The distinct (block, processor) pairs a plan needs, in slot order."""
    return list(dict.fromkeys(zip(plan.block_ids, plan.placement, strict=True)))


class HotnessTracker:
    """Exponentially decayed use counts per (block, processor). Thread-safe."""

    def __init__(self, half_life_s: float = 30.0) -> None:
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.half_life_s = float(half_life_s)
        self._decay = math.log(2) / self.half_life_s
        self._lock = threading.Lock()
        #: key -> (decayed count, time it was last brought up to date)
        self._counts: dict[Key, tuple[float, float]] = {}

    def _at(self, key: Key, now_s: float) -> float:
        c, t = self._counts.get(key, (0.0, now_s))
        return c * math.exp(-self._decay * max(0.0, now_s - t))

    def record_use(self, plan: Plan, now_s: float, weight: float = 1.0) -> None:
        """One request ran (or will run) ``plan``: each of its pairs gets one use."""
        self.add(plan_keys(plan), now_s, weight)

    def add(self, keys: Iterable[Key], now_s: float, weight: float = 1.0) -> None:
        with self._lock:
            for k in keys:
                self._counts[k] = (self._at(k, now_s) + weight, now_s)

    def seed(self, rates: Mapping[Key, float], now_s: float) -> None:
        """Start pairs at a steady use rate (uses/s), e.g. the rates the initial set was chosen at.

        Without it every pair is cold until used, and the first evictions would pick at
        random among the initial set.
        """
        with self._lock:
            for k, r in rates.items():
                self._counts[k] = (max(0.0, r) / self._decay, now_s)

    def rate(self, key: Key, now_s: float) -> float:
        with self._lock:
            return self._at(key, now_s) * self._decay

    def scores(self, now_s: float) -> dict[Key, float]:
        """Decayed use rate (uses per second) of every pair seen."""
        with self._lock:
            return {k: self._at(k, now_s) * self._decay for k in self._counts}


def planned_shares(
    candidates_by_task: Mapping[str, Sequence[Plan]],
    mix: Mapping[str, Mapping[tuple[tuple[str, ...], tuple[str, ...]], float]],
    *,
    adaptive: bool,
) -> dict[str, list[float]]:
    """Each task's expected share of each candidate, for ``Preloader.initial_set``.

    A fixed-plan policy runs its first candidate; an adaptive one follows its planned
    ``mix`` (``{(config, placement): share}``); a task with neither is left out (its
    candidates are then taken as equally likely).
    """
    shares: dict[str, list[float]] = {}
    for t, plans in candidates_by_task.items():
        if not adaptive:
            shares[t] = [1.0] + [0.0] * (len(plans) - 1)
        elif mix.get(t):
            w = [float(mix[t].get((p.config, p.placement), 0.0)) for p in plans]
            if sum(w) > 0:
                shares[t] = w
    return shares


def replaceability(candidates_by_task: Mapping[str, Sequence[Plan]], max_slowdown: float = 4.0) -> dict[Key, float]:
    """The penalty of every pair the candidates use: ``need + slowdown``, the largest over tasks.

    Per task: ``need`` = the fraction of its candidates using the pair; ``slowdown`` =
    (best latency without the pair - best with it) / best with it, clipped to
    ``[0, max_slowdown]`` (``max_slowdown`` when no candidate does without it).
    """
    out: dict[Key, float] = {}
    for plans in candidates_by_task.values():
        if not plans:
            continue
        keys_of = [set(plan_keys(p)) for p in plans]
        for key in set().union(*keys_of):
            with_ = [p.latency_ms for p, ks in zip(plans, keys_of, strict=True) if key in ks]
            without = [p.latency_ms for p, ks in zip(plans, keys_of, strict=True) if key not in ks]
            best_with = min(with_)
            if not without:
                slowdown = max_slowdown
            else:
                slowdown = (min(without) - best_with) / max(best_with, 1e-9)
                slowdown = min(max(slowdown, 0.0), max_slowdown)
            penalty = len(with_) / len(plans) + slowdown
            out[key] = max(out.get(key, 0.0), penalty)
    return out


class Preloader:
    """Keeps the hottest (block, processor) pairs resident within ``budget_bytes``.

    Hotness = decayed use rate x (1 + replaceability penalty). The budget is soft by
    ``margin_bytes``: when protected pairs alone fill it, a load may go over by up to
    the margin; beyond that ``make_room`` reports the shortfall (the runtime still loads).

    The decisions are pure (no loading here): the runtime asks which pairs to load at
    start (``initial_set``) and which to evict before a load (``make_room``,
    ``on_request``), and reports uses and measured sizes back.
    """

    def __init__(
        self,
        budget_bytes: int,
        margin_bytes: int = 0,
        *,
        half_life_s: float = 30.0,
        sizes: Mapping[Key, int] | None = None,
        max_slowdown: float = 4.0,
    ) -> None:
        if budget_bytes < 0 or margin_bytes < 0:
            raise ValueError(f"budget and margin must be >= 0, got {budget_bytes}, {margin_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.margin_bytes = int(margin_bytes)
        self.max_slowdown = float(max_slowdown)
        self.tracker = HotnessTracker(half_life_s)
        self._lock = threading.Lock()
        self._penalty: dict[Key, float] = {}
        self._sizes: dict[Key, int] = dict(sizes or {})

    # -- what the runtime tells it -------------------------------------------------------
    def set_candidates(self, candidates_by_task: Mapping[str, Sequence[Plan]]) -> None:
        penalty = replaceability(candidates_by_task, self.max_slowdown)
        with self._lock:
            self._penalty = penalty

    def note_size(self, key: Key, nbytes: int) -> None:
        """A measured footprint (a load's ``memory_bytes``): better than any estimate."""
        with self._lock:
            self._sizes[key] = int(nbytes)

    def size(self, key: Key, default: int = 0) -> int:
        with self._lock:
            return self._sizes.get(key, default)

    def record_use(self, plan: Plan, now_s: float) -> None:
        self.tracker.record_use(plan, now_s)

    # -- scores --------------------------------------------------------------------------
    def penalty(self, key: Key) -> float:
        with self._lock:
            return self._penalty.get(key, 0.0)

    def hotness(self, now_s: float) -> dict[Key, float]:
        """decayed use rate x (1 + replaceability penalty), for every pair seen or planned."""
        rates = self.tracker.scores(now_s)
        with self._lock:
            keys = set(rates) | set(self._penalty)
            return {k: rates.get(k, 0.0) * (1.0 + self._penalty.get(k, 0.0)) for k in keys}

    # -- decisions -----------------------------------------------------------------------
    def initial_set(
        self,
        candidates_by_task: Mapping[str, Sequence[Plan]],
        rates: Mapping[str, float],
        sizes: Mapping[Key, int],
        shares: Mapping[str, Sequence[float]] | None = None,
        *,
        now_s: float = 0.0,
    ) -> set[Key]:
        """The pairs to load at start: greedy by expected hotness per byte within the budget.

        ``rates``: task -> requests per second (a task not listed: 1). ``shares``: task ->
        planned share of each candidate (the joint assignment's mix), aligned with its
        candidates; without it the candidates are taken as equally likely. A pair's
        expected use rate is the sum over tasks of rate x shares of the plans using it.
        The tracker is seeded with these rates, so that run-time evictions start from
        the same view.
        """
        self.set_candidates(candidates_by_task)
        expected: dict[Key, float] = {}
        for task, plans in candidates_by_task.items():
            if not plans:
                continue
            given = shares.get(task) if shares is not None else None
            w = [float(s) for s in given] if given is not None else [1.0] * len(plans)
            total = sum(w) or 1.0
            rate = float(rates.get(task, 1.0))
            for p, wi in zip(plans, w, strict=True):
                for k in plan_keys(p):
                    expected[k] = expected.get(k, 0.0) + rate * wi / total
        self.tracker.seed(expected, now_s)
        for k, b in sizes.items():
            self._sizes.setdefault(k, int(b))
        score = {k: r * (1.0 + self.penalty(k)) for k, r in expected.items()}

        def density(k: Key) -> float:
            return score[k] / max(int(sizes.get(k, 0)), 1)

        chosen: set[Key] = set()
        used = 0
        # smaller items may still fit after a big one does not: skip, do not stop
        for k in sorted(score, key=lambda k: (-density(k), k)):
            b = int(sizes.get(k, 0))
            if used + b <= self.budget_bytes:
                chosen.add(k)
                used += b
        return chosen

    def make_room(
        self,
        need_bytes: int,
        resident: Mapping[Key, int],
        protect: Iterable[Key] = (),
        now_s: float = 0.0,
    ) -> tuple[list[Key], bool]:
        """Pairs to evict, coldest first, so that ``resident + need_bytes`` fits the budget.

        ``resident``: pair -> bytes of what is loaded now (every processor); ``protect``:
        pairs that must stay (the running plan's, those a worker is using). Evicts down to
        the budget when it can; when only protected pairs are left, going over by up to the
        margin is allowed. Returns the evictions and whether the result is within
        budget + margin.
        """
        total = sum(resident.values()) + need_bytes
        if total <= self.budget_bytes:
            return [], True
        keep = set(protect)
        heat = self.hotness(now_s)
        victims = sorted(
            (k for k in resident if k not in keep),
            # coldest first; among equally cold, the largest frees the most with one eviction
            key=lambda k: (heat.get(k, 0.0), -resident[k], k),
        )
        out: list[Key] = []
        for k in victims:
            if total <= self.budget_bytes:
                break
            out.append(k)
            total -= resident[k]
        return out, total <= self.budget_bytes + self.margin_bytes

    def on_request(
        self, plan: Plan, caches: Mapping[str, Mapping[str, int]], now_s: float, *, record: bool = True
    ) -> list[Key]:
        """Record a request's use of ``plan`` and say what to evict to load its missing blocks.

        ``caches``: processor -> {resident block id: bytes}. The plan's own pairs are never
        evicted; a missing pair's size is its measured one when known (0 otherwise).
        """
        if record:
            self.record_use(plan, now_s)
        resident = {(b, p): n for p, blocks in caches.items() for b, n in blocks.items()}
        keys = plan_keys(plan)
        need = sum(self.size(k) for k in keys if k not in resident)
        evict, _ok = self.make_room(need, resident, keys, now_s)
        return evict

    def prefetch_hint(self, plans: Iterable[Plan], resident: Iterable[Key] = (), now_s: float = 0.0) -> list[Key]:
        """Pairs of ``plans`` not resident, hottest first: what to load when a worker idles.

        The runtime loads from it when a worker idles (``WorkerPool.maybe_prefetch``).
        """
        have = set(resident)
        want = list(dict.fromkeys(k for p in plans for k in plan_keys(p) if k not in have))
        heat = self.hotness(now_s)
        return sorted(want, key=lambda k: -heat.get(k, 0.0))
