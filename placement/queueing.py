"""A mix of plans per task that keeps queueing delay low, not just load balanced.

``assign`` (the LP) minimizes the busiest processor's utilization: the right goal near
saturation, the wrong one at moderate load, where it moves work onto a slower
processor only to even the load out, and where what breaks deadlines is *waiting*:
a 3 ms-bound request queued behind a 5 ms job of another task. Serving on the host
showed both (image-cls blocks on onnxruntime's core holding up the small tasks; small
tasks balanced onto the slower OpenVINO core).

Here each processor is an M/G/1 queue, served in deadline order but without
preemption, and a request's expected latency is its plan's own latency plus, on each
processor it uses, the Pollaczek-Khinchine mean wait

    W_p = sum_i lambda_i * E[S_i^2] / (2 * (1 - rho_p))

over the work i the mix puts on p: long jobs weigh by the square of their length,
which is exactly the head-of-line blocking the LP cannot see. The mix minimizes the
rate-weighted expected latency *relative to each task's bound* (a 10 ms wait matters
to a 3 ms task, not to a 100 ms one), by a greedy over chunks of each task's rate
followed by a few passes that move single chunks while that helps. Plans that cannot
finish within their bound even idle are never used when the task has another; a
processor is never planned past ``max_utilization``.
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
    procs = sorted({p for t in tasks for plan in usable[t] for p in plan.placement})
    pix = {p: i for i, p in enumerate(procs)}
    P = len(procs)
    lam = {t: rates_rps[t] / chunks / 1000.0 for t in tasks}  # per ms, per chunk
    w = {t: rates_rps[t] / chunks / bounds_ms[t] for t in tasks}
    S, U, L = {}, {}, {}  # busy ms (n, P), uses (n, P), own latency (n,)
    for t in tasks:
        S[t] = np.zeros((len(usable[t]), P))
        for i, plan in enumerate(usable[t]):
            for p, ms in plan.processor_ms().items():
                S[t][i, pix[p]] = ms
        U[t] = (S[t] > 0).astype(float)
        L[t] = np.array([p.latency_ms for p in usable[t]])
    count = {t: np.zeros(len(usable[t]), dtype=np.int64) for t in tasks}
    rho = np.zeros(P)
    second = np.zeros(P)
    usage = np.zeros(P)  # sum_t w_t * sum_i n_ti * U_tip
    own = 0.0  # sum_t w_t * sum_i n_ti * L_ti

    def candidate_objectives(t: str) -> np.ndarray:
        """The objective if one more chunk of ``t`` went to each of its plans."""
        r = rho[None, :] + lam[t] * S[t] / 1.0
        m = second[None, :] + lam[t] * S[t] ** 2
        # Past the cap the queue has no steady state; the wait there is priced as the
        # wait at the cap times a steep factor of the excess, so that an overloaded mix
        # still has a gradient (the passes below then spread the overload instead of
        # leaving it where the greedy put it).
        over = np.maximum(r - max_utilization, 0.0)
        W = m / (2.0 * (1.0 - np.minimum(r, max_utilization))) * (1.0 + 1e3 * over)
        return own + w[t] * L[t] + (W * (usage[None, :] + w[t] * U[t])).sum(axis=1)

    def move(t: str, i: int, sign: int) -> None:
        nonlocal own
        count[t][i] += sign
        rho[:] += sign * lam[t] * S[t][i]
        second[:] += sign * lam[t] * S[t][i] ** 2
        usage[:] += sign * w[t] * U[t][i]
        own += sign * w[t] * L[t][i]

    # greedy: the largest jobs first (they are the hardest to place), one chunk at a time
    order = sorted(tasks, key=lambda t: -float(S[t].max()))
    for t in order:
        for _ in range(chunks):
            obj = candidate_objectives(t)
            i = int(np.argmin(obj))
            move(t, i, +1)
    # improvement passes: take one chunk off a plan and put it where it helps most
    for _ in range(passes):
        moved = False
        for t in order:
            for i in [j for j in range(len(usable[t])) for _ in range(int(count[t][j]))]:
                move(t, i, -1)
                obj = candidate_objectives(t)
                best = int(np.argmin(obj))
                if obj[best] < obj[i] - 1e-12:
                    moved = True
                else:
                    best = i
                move(t, best, +1)
        if not moved:
            break
    out: dict[str, dict[Key, float]] = {}
    for t in tasks:
        out[t] = {(usable[t][i].config, usable[t][i].placement): int(n) / chunks
                  for i, n in enumerate(count[t]) if n > 0}
    return out


__all__ = ["latency_aware_mix"]
