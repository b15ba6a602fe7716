"""A mix of plans per task that keeps queueing delay low, not just load balanced.

Each processor is an M/G/1 queue (deadline order, no preemption); a request's
expected latency is its plan's own plus, on each processor it uses, the
Pollaczek-Khinchine mean wait. ``latency_aware_mix`` minimizes the rate-weighted
expected latency relative to each task's bound: a greedy over chunks of each task's
rate, then passes moving single chunks. Why not ``assign``'s LP: ``docs/placement.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from placement.plan import Plan

Key = tuple[tuple[str, ...], tuple[str, ...]]


def latency_aware_mix(
    candidates: Mapping[str, Sequence[Plan]],
    rates_rps: Mapping[str, float],
    bounds_ms: Mapping[str, float],
    *,
    chunks: int = 20,
    passes: int = 3,
    max_utilization: float = 0.95,
) -> dict[str, dict[Key, float]]:
    """Each task's share of each candidate plan (``{task: {(config, placement): share}}``).

    Vectorized over a task's plans: adding one chunk to plan i changes the utilization
    and second moment of i's processors, and the objective is then
    ``sum_t w_t * (lat_t + sum_p U_tp * W_p)`` with ``w_t = chunk rate / bound``, so
    every plan's candidate objective is one (plans x processors) array expression.
    A replan of 3 tasks x 30 plans takes a few milliseconds.
    """
    tasks = [t for t in candidates if candidates[t] and rates_rps.get(t, 0.0) > 0]
    if not tasks:
        return {}
    usable: dict[str, list[Plan]] = {}
    for t in tasks:
        quick = [p for p in candidates[t] if p.latency_ms <= bounds_ms[t]]
        usable[t] = quick or sorted(candidates[t], key=lambda p: p.latency_ms)[:1]
    q = _Queues(usable, rates_rps, bounds_ms, chunks, max_utilization)
    # greedy: the largest jobs first (they are the hardest to place), one chunk at a time
    order = sorted(tasks, key=lambda t: -float(q.S[t].max()))
    for t in order:
        for _ in range(chunks):
            obj = q.objectives(t)
            i = int(np.argmin(obj))
            q.move(t, i, +1)
    for _ in range(passes):
        if not q.improve(order):
            break
    out: dict[str, dict[Key, float]] = {}
    for t in tasks:
        out[t] = {(usable[t][i].config, usable[t][i].placement): int(n) / chunks
                  for i, n in enumerate(q.count[t]) if n > 0}
    return out


class _Queues:
    """The processors' queues under a mix being built: utilization, second moments, objective."""

    def __init__(self, usable: Mapping[str, list[Plan]], rates_rps: Mapping[str, float],
                 bounds_ms: Mapping[str, float], chunks: int, max_utilization: float) -> None:
        tasks = list(usable)
        procs = sorted({p for t in tasks for plan in usable[t] for p in plan.placement})
        pix = {p: i for i, p in enumerate(procs)}
        P = len(procs)
        self.max_utilization = max_utilization
        self.lam = {t: rates_rps[t] / chunks / 1000.0 for t in tasks}  # per ms, per chunk
        self.w = {t: rates_rps[t] / chunks / bounds_ms[t] for t in tasks}
        # busy ms (n, P), uses (n, P), own latency (n,)
        self.S: dict[str, np.ndarray] = {}
        self.U: dict[str, np.ndarray] = {}
        self.L: dict[str, np.ndarray] = {}
        for t in tasks:
            self.S[t] = np.zeros((len(usable[t]), P))
            for i, plan in enumerate(usable[t]):
                for p, ms in plan.processor_ms().items():
                    self.S[t][i, pix[p]] = ms
            self.U[t] = (self.S[t] > 0).astype(float)
            self.L[t] = np.array([p.latency_ms for p in usable[t]])
        self.count = {t: np.zeros(len(usable[t]), dtype=np.int64) for t in tasks}
        self.rho = np.zeros(P)
        self.second = np.zeros(P)
        self.usage = np.zeros(P)  # sum_t w_t * sum_i n_ti * U_tip
        self.own = 0.0  # sum_t w_t * sum_i n_ti * L_ti

    def objectives(self, t: str) -> np.ndarray:
        """The objective if one more chunk of ``t`` went to each of its plans."""
        r = self.rho[None, :] + self.lam[t] * self.S[t] / 1.0
        m = self.second[None, :] + self.lam[t] * self.S[t] ** 2
        # Past the cap the queue has no steady state; the wait there is priced as the
        # wait at the cap times a steep factor of the excess, so that an overloaded mix
        # still has a gradient (the passes below then spread the overload instead of
        # leaving it where the greedy put it).
        over = np.maximum(r - self.max_utilization, 0.0)
        W = m / (2.0 * (1.0 - np.minimum(r, self.max_utilization))) * (1.0 + 1e3 * over)
        return self.own + self.w[t] * self.L[t] + (W * (self.usage[None, :] + self.w[t] * self.U[t])).sum(axis=1)

    def move(self, t: str, i: int, sign: int) -> None:
        """Add (``sign`` +1) or remove (-1) one chunk of ``t`` on its plan ``i``."""
        self.count[t][i] += sign
        self.rho[:] += sign * self.lam[t] * self.S[t][i]
        self.second[:] += sign * self.lam[t] * self.S[t][i] ** 2
        self.usage[:] += sign * self.w[t] * self.U[t][i]
        self.own += sign * self.w[t] * self.L[t][i]

    def improve(self, order: Sequence[str]) -> bool:
        """One pass: take each chunk off its plan and put it where it helps most. False: nothing moved."""
        moved = False
        for t in order:
            for i in [j for j in range(len(self.count[t])) for _ in range(int(self.count[t][j]))]:
                self.move(t, i, -1)
                obj = self.objectives(t)
                best = int(np.argmin(obj))
                if obj[best] < obj[i] - 1e-12:
                    moved = True
                else:
                    best = i
                self.move(t, best, +1)
        return moved


__all__ = ["latency_aware_mix"]
