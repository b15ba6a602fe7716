"""What a candidate plan would cost if admitted now: its predicted finish and busy time.

The scheduler's arithmetic, apart from its choices: a plan's fixed structure priced once
(``plan_structure``), and a whole candidate list as arrays (``CandidateTable``), so that a
decision over hundreds of candidates is k vector steps. Design notes: docs/serving.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from loom.serving.correction import CorrectionView
from placement.plan import Plan

__all__ = ["VECTOR_MIN", "CandidateTable", "Priced", "Static", "dispatch_ms", "plan_structure"]

#: below this many candidates a plain loop is as fast as the arrays
VECTOR_MIN = 24


def dispatch_ms(plan: Plan) -> float:
    """The part of a plan's predicted latency that is neither blocks nor hand-offs."""
    return max(0.0, plan.latency_ms - sum(plan.block_ms) - sum(plan.transfer_ms))


@dataclass
class Priced:
    """One candidate priced for one decision."""

    index: int
    plan: Plan
    finish_s: float
    busy_ms: float
    segment_ms: tuple[float, ...]


#: a plan's fixed structure, priced once: (dispatch s, ((processor, hand-off s before, ((pair, ms), ...)), ...))
Static = tuple[float, tuple[tuple[str, float, tuple[tuple[tuple[str, str], float], ...]], ...]]


def plan_structure(plan: Plan) -> Static:
    """The plan's segments with their hand-offs and predicted block ms, for the pricing loop."""
    segs = []
    prev: int | None = None
    for proc, slots in plan.segments():
        hand_off = plan.transfer_ms[prev] / 1e3 if prev is not None and prev < len(plan.transfer_ms) else 0.0
        segs.append((proc, hand_off, tuple(((plan.block_ids[s], proc), plan.block_ms[s]) for s in slots)))
        prev = slots[-1]
    return dispatch_ms(plan) / 1e3, tuple(segs)


class CandidateTable:
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
