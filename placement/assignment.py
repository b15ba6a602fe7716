"""One mix of plans per task for given arrival rates (``assign``), and the fluid goodput bound.

``assign`` minimizes the busiest processor's predicted utilization over plans that meet
each task's SLO, then the rate-weighted latency; ``fluid_goodput_bound`` reads the same
LP the other way: the largest total rate at a task mix the processors can serve
(queueing ignored). Both are exact over every SLO-meeting plan (``docs/placement.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loom.core.errors import ConfigError
from placement.lp import column_generation, initial_columns
from placement.plan import Plan, TaskSpace
from placement.points import gather_points


@dataclass(frozen=True)
class Assignment:
    """Per task, a weighted mix of plans; and the processor utilization it predicts."""

    #: task -> ((plan, share), ...), shares sum to 1, largest share first
    mixes: dict[str, tuple[tuple[Plan, float], ...]]
    #: processor -> predicted busy fraction (sum over tasks of rate * share * busy ms / 1000)
    utilization: dict[str, float]
    #: tasks for which no plan meets both the floor and the bound: their mix is a fallback
    #: (the fastest plan meeting the floor, else the most accurate plan), and they will violate
    unmet: tuple[str, ...] = ()
    #: per task, whether every plan meeting its SLO was considered (False when the space was narrowed)
    exact: dict[str, bool] = field(default_factory=dict)

    @property
    def max_utilization(self) -> float:
        return max(self.utilization.values(), default=0.0)

    def plans(self, task: str) -> list[Plan]:
        return [p for p, _ in self.mixes[task]]

    def shares(self, task: str) -> list[float]:
        return [s for _, s in self.mixes[task]]


def assign(
    spaces: Mapping[str, TaskSpace],
    slos: Mapping[str, Any],
    rates_rps: Mapping[str, float],
    *,
    candidates: Mapping[str, Sequence[Plan]] | None = None,
) -> Assignment:
    """A mix of plans per task meeting its SLO, balancing processor load for the arrival rates.

    ``slos[task]`` is ``(latency_ms, accuracy_floor)`` (or anything with those two
    attributes). Stage 1 minimizes the highest processor utilization
    ``sum_t rate_t * share * busy_ms[p] / 1000``; stage 2 keeps that and minimizes the
    rate-weighted latency relative to each task's fastest usable plan (then, barely,
    prefers accuracy). Plans come from ``candidates[task]`` where given (those meeting
    the SLO), else every plan of the task's space that meets the SLO. A task with no
    plan meeting its SLO gets a fallback (the fastest plan meeting the floor, else the
    most accurate plan) and is listed in ``Assignment.unmet``.
    """
    tasks = sorted(spaces)
    for task in tasks:
        if task not in rates_rps:
            raise ConfigError(f"task {task!r} has no arrival rate; rates given for: {', '.join(sorted(rates_rps)) or 'none'}")
        if not (float(rates_rps[task]) >= 0 and math.isfinite(float(rates_rps[task]))):
            raise ConfigError(f"task {task!r}: arrival rate must be a finite number >= 0, got {rates_rps[task]!r}")
    if not tasks:
        return Assignment(mixes={}, utilization={})
    points, procs = gather_points(spaces, slos, candidates, tasks)
    rates = [float(rates_rps[t]) for t in tasks]
    loads = [r * pt.busy / 1000.0 for r, pt in zip(rates, points, strict=True)]
    start = [initial_columns(ld if r > 0 else pt.busy, pt.lat) for ld, r, pt in zip(loads, rates, points, strict=True)]
    _, active, u_star = column_generation(loads, [np.zeros(len(pt.lat)) for pt in points], None, start)
    total_rate = sum(rates)
    weights = [(r / total_rate if total_rate > 0 else 1.0 / len(tasks)) + 1e-6 for r in rates]
    costs = []
    for w, pt in zip(weights, points, strict=True):
        base = max(float(pt.lat.min()), 1e-9)
        costs.append(w * (pt.lat / base - 1e-4 * pt.acc))
    cap = u_star * (1 + 1e-7) + 1e-12
    shares, _, _ = column_generation(loads, costs, cap, active)
    mixes: dict[str, tuple[tuple[Plan, float], ...]] = {}
    util = np.zeros(len(procs))
    for task, pt, ld, sh in zip(tasks, points, loads, shares, strict=True):
        items = sorted(sh.items(), key=lambda kv: (-kv[1], pt.lat[kv[0]], kv[0]))
        mixes[task] = tuple((pt.make(j), s) for j, s in items)
        for j, s in items:
            util += s * ld[j]
    return Assignment(mixes=mixes, utilization={p: float(u) for p, u in zip(procs, util, strict=True)},
                      unmet=tuple(pt.task for pt in points if not pt.meets),
                      exact={pt.task: pt.exact for pt in points})


def fluid_goodput_bound(
    spaces: Mapping[str, TaskSpace],
    slos: Mapping[str, Any],
    *,
    rate_mix: Mapping[str, float],
    candidates: Mapping[str, Sequence[Plan]] | None = None,
) -> float:
    """Upper bound on goodput (requests/s within SLO) at the task mix ``rate_mix`` (proportions).

    The fluid relaxation: requests arrive at total rate L split by ``rate_mix``; each
    task's requests are spread over plans that each meet its floor and bound; every
    processor's busy fraction must stay <= 1. The largest L is 1 / U*, where U* is the
    least achievable highest utilization at unit total rate (the ``assign`` LP). A task
    no plan of which meets its SLO contributes no goodput and no load (a system would
    shed it), so the bound is ``L * (share of the mix that can be served)``. Queueing,
    dispatch overlap and memory are ignored, hence an upper bound. ``candidates``
    restricts the plans per task (e.g. a policy's), giving that policy's bound.
    Returns ``inf`` when the served plans put no load on any processor.
    """
    mix = {t: float(r) for t, r in rate_mix.items()}
    for t, r in mix.items():
        if t not in spaces:
            raise ConfigError(f"rate_mix names task {t!r}, which has no space; tasks: {', '.join(sorted(spaces))}")
        if not (r >= 0 and math.isfinite(r)):
            raise ConfigError(f"task {t!r}: a mix proportion must be a finite number >= 0, got {r!r}")
    total = sum(mix.values())
    if total <= 0:
        raise ConfigError("rate_mix must give some task a positive proportion")
    tasks = sorted(t for t, r in mix.items() if r > 0)
    points, _ = gather_points({t: spaces[t] for t in tasks}, slos, candidates, tasks)
    served = [(t, pt) for t, pt in zip(tasks, points, strict=True) if pt.meets]
    if not served:
        return 0.0
    loads = [mix[t] / total * pt.busy / 1000.0 for t, pt in served]
    start = [initial_columns(ld, pt.lat) for ld, (_, pt) in zip(loads, served, strict=True)]
    _, _, u_star = column_generation(loads, [np.zeros(len(pt.lat)) for _, pt in served], None, start)
    fraction = sum(mix[t] for t, _ in served) / total
    return math.inf if u_star <= 0 else fraction / u_star


__all__ = [
    "Assignment", "assign", "fluid_goodput_bound",
]
