"""Each task's usable plans as arrays (latency, accuracy, busy ms per processor): the LP's columns.

``gather_points`` reads every task's SLO and lists, per task, the plans of its space
that meet it (``space_points``) or the candidate plans it was given (``plan_points``);
a task none of whose plans meets its SLO gets one fallback plan.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loom.core.errors import ConfigError
from placement.fronts import plan_order
from placement.pareto import CONFIG_LIMIT, pareto_plans
from placement.plan import Plan, TaskSpace
from placement.tables import (
    CHUNK,
    TOL,
    Tables,
    all_configs,
    all_placements,
    build_tables,
    config_rows,
    evaluate_pairs,
    fastest_placements,
    pair_grid,
    plan_accuracies,
)

#: (config, placement) pairs per task that ``assign``/``fluid_goodput_bound`` enumerate before narrowing
ENUMERATION_LIMIT = 4_000_000


@dataclass
class Points:
    """One task's usable plans as arrays: what the LP chooses among."""

    task: str
    lat: np.ndarray
    acc: np.ndarray
    #: (n, P_global) busy ms per processor
    busy: np.ndarray
    #: plan i, built lazily (only the plans the LP uses are built)
    make: Any
    meets: bool
    exact: bool


def slo_pair(task: str, slo: Any) -> tuple[float, float]:
    """``(latency_ms, accuracy_floor)``, from a pair or an object with those attributes."""
    if hasattr(slo, "latency_ms") and hasattr(slo, "accuracy_floor"):
        return float(slo.latency_ms), float(slo.accuracy_floor)
    try:
        lat, floor = slo
        return float(lat), float(floor)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"task {task!r}: an SLO is (latency_ms, accuracy_floor), got {slo!r}") from err


#: a task's plans as parallel arrays: latency, accuracy, busy ms per processor, configs, placements
_Rows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def space_points(space: TaskSpace, latency_ms: float, floor: float, gidx: np.ndarray) -> Points:
    """Every plan of ``space`` meeting the SLO (enumerated in chunks), or a fallback plan.

    Exact (all plans) when the space has at most ``CONFIG_LIMIT`` configs and the
    floor-meeting configs times placements are at most ``ENUMERATION_LIMIT``; otherwise
    narrowed to the configs of the Pareto front (and, if still too many, to each one's
    fastest and whole-model placements), with a ``RuntimeWarning``.
    """
    t = build_tables(space)
    cfg, exact = _slo_configs(space, t, latency_ms, floor)
    acc = np.array(plan_accuracies(space, [t.config(c) for c in cfg])) if len(cfg) else np.zeros(0)
    floor_ok = acc >= floor - TOL
    ok, placements, per_config, exact = _narrow(space, t, cfg, floor_ok.copy(), latency_ms, floor, exact)
    if not exact:
        warnings.warn(f"task {space.task!r}: too many plans to list; the LP considers a subset "
                      "(the result is not guaranteed optimal)", RuntimeWarning, stacklevel=3)
    rows = _meeting_pairs(t, cfg, acc, np.flatnonzero(ok), placements, per_config, latency_ms)
    meets = rows is not None
    lat_a, acc_a, busy, cfg_a, pl_a = rows if rows is not None else _fallback_pair(t, cfg, acc, floor_ok)
    busy_g = np.zeros((len(lat_a), int(gidx.max()) + 1))
    busy_g[:, gidx] = busy

    def make(i: int) -> Plan:
        return space.make_plan(t.config(cfg_a[i]), t.placement(pl_a[i]), accuracy=float(acc_a[i]))

    return Points(space.task, lat_a, acc_a, busy_g, make, meets, exact)


def _slo_configs(space: TaskSpace, t: Tables, latency_ms: float, floor: float) -> tuple[np.ndarray, bool]:
    """The configs to enumerate (rows of variant indices), and whether that is all of them."""
    if t.n_configs <= CONFIG_LIMIT:
        return all_configs(len(t.variants), t.k), True
    # The configs on the SLO's front; where it is empty, those the fallback chooses from.
    front = (pareto_plans(space, accuracy_floor=floor, latency_bound_ms=latency_ms)
             or pareto_plans(space, accuracy_floor=floor) or pareto_plans(space))
    return config_rows(t, list(dict.fromkeys(p.config for p in front))), False


def _narrow(space: TaskSpace, t: Tables, cfg: np.ndarray, ok: np.ndarray, latency_ms: float, floor: float,
            exact: bool) -> tuple[np.ndarray, np.ndarray, bool, bool]:
    """Which configs (``ok``) to pair with which placements, within ``ENUMERATION_LIMIT`` pairs.

    Returns ``ok``, the placements, whether each config also gets its own fastest
    placement (when only whole-model placements are listed), and ``exact``.
    """
    P, K = len(t.processors), t.k
    placements = all_placements(P, K, False)
    per_config = False
    if ok.sum() * len(placements) > ENUMERATION_LIMIT:
        exact = False
        keep = {tuple(p.config) for p in pareto_plans(space, accuracy_floor=floor, latency_bound_ms=latency_ms)}
        ok &= np.array([t.config(c) in keep for c in cfg], dtype=bool)
        if ok.sum() * len(placements) > ENUMERATION_LIMIT:
            placements, per_config = all_placements(P, K, True), True
    return ok, placements, per_config, exact


def _meeting_pairs(t: Tables, cfg: np.ndarray, acc: np.ndarray, sel: np.ndarray, placements: np.ndarray,
                   per_config: bool, latency_ms: float) -> _Rows | None:
    """Every pair of a config in ``sel`` and a placement that runs within ``latency_ms`` (None: none)."""
    lats, accs, busys, cfgs, pls = [], [], [], [], []
    step = max(1, CHUNK // len(placements))
    for lo in range(0, len(sel), step):
        ci = sel[lo:lo + step]
        c_rows, p_rows = pair_grid(cfg[ci], placements)
        a_rows = np.repeat(acc[ci], len(placements))
        if per_config:
            _, fp = fastest_placements(t, cfg[ci], False)
            c_rows, p_rows = np.concatenate([c_rows, cfg[ci]]), np.concatenate([p_rows, fp])
            a_rows = np.concatenate([a_rows, acc[ci]])
        lat, busy = evaluate_pairs(t, c_rows, p_rows)
        good = np.flatnonzero(np.isfinite(lat) & (lat <= latency_ms + TOL))
        lats.append(lat[good])
        accs.append(a_rows[good])
        busys.append(busy[good])
        cfgs.append(c_rows[good])
        pls.append(p_rows[good])
    if not sum(len(x) for x in lats):
        return None
    return (np.concatenate(lats), np.concatenate(accs), np.concatenate(busys), np.concatenate(cfgs),
            np.concatenate(pls))


def _fallback_pair(t: Tables, cfg: np.ndarray, acc: np.ndarray, floor_ok: np.ndarray) -> _Rows:
    """Nothing meets the SLO: the fastest plan that meets the floor, else the most accurate one."""
    fl, fp = fastest_placements(t, cfg, False)
    runs = np.isfinite(fl)
    if not runs.any():
        raise ConfigError(f"task {t.space.task!r}: no plan can run (every config has a block no processor runs)")
    pool = floor_ok & runs if (floor_ok & runs).any() else runs & (acc >= acc[runs].max() - TOL)
    pick = np.flatnonzero(pool)
    i = int(pick[np.lexsort((-acc[pick], fl[pick]))[0]])
    c_rows, p_rows = cfg[i][None, :], fp[i][None, :]
    lat, busy = evaluate_pairs(t, c_rows, p_rows)
    return lat, acc[i:i + 1], busy, c_rows, p_rows


def plan_points(task: str, plans: Sequence[Plan], latency_ms: float, floor: float, procs: list[str]) -> Points:
    """The candidate ``plans`` meeting the SLO (or one fallback), busy ms over ``procs``."""
    if not plans:
        raise ConfigError(f"task {task!r}: an empty candidate list")
    pidx = {p: i for i, p in enumerate(procs)}
    meets = [p for p in plans if p.accuracy >= floor - TOL and p.latency_ms <= latency_ms + TOL]
    ok = bool(meets)
    if not ok:
        floor_ok = [p for p in plans if p.accuracy >= floor - TOL]
        pool = floor_ok or [p for p in plans if p.accuracy >= max(q.accuracy for q in plans) - TOL]
        meets = [min(pool, key=plan_order)]
    busy = np.zeros((len(meets), len(procs)))
    for i, p in enumerate(meets):
        for proc, ms in p.processor_ms().items():
            busy[i, pidx[proc]] += ms
    return Points(task, np.array([p.latency_ms for p in meets]), np.array([p.accuracy for p in meets]), busy,
                  lambda i, meets=meets: meets[i], ok, True)


def gather_points(spaces: Mapping[str, TaskSpace], slos: Mapping[str, Any],
                  candidates: Mapping[str, Sequence[Plan]] | None,
                  tasks: list[str]) -> tuple[list[Points], list[str]]:
    """Each task's ``Points`` (from its candidates where given, else its space) over one processor list."""
    procs: list[str] = []
    for task in tasks:
        for p in spaces[task].processors:
            if p not in procs:
                procs.append(p)
    for task in tasks:  # candidate plans may name processors the space does not (they came from elsewhere)
        for plan in (candidates or {}).get(task, []):
            for p in plan.placement:
                if p not in procs:
                    procs.append(p)
    pidx = {p: i for i, p in enumerate(procs)}
    points = []
    for task in tasks:
        if task not in slos:
            raise ConfigError(f"task {task!r} has no SLO; SLOs given for: {', '.join(sorted(slos)) or 'none'}")
        lat, floor = slo_pair(task, slos[task])
        if candidates is not None and task in candidates:
            points.append(plan_points(task, candidates[task], lat, floor, procs))
        else:
            gidx = np.array([pidx[p] for p in spaces[task].processors], dtype=np.int64)
            pts = space_points(spaces[task], lat, floor, gidx)
            if pts.busy.shape[1] < len(procs):
                pts.busy = np.pad(pts.busy, ((0, 0), (0, len(procs) - pts.busy.shape[1])))
            points.append(pts)
    return points, procs


__all__ = ["ENUMERATION_LIMIT", "Points", "gather_points", "plan_points", "slo_pair", "space_points"]
