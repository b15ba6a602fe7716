"""The plan-mixing linear programme, solved by column generation (HiGHS through scipy).

Columns are plans, rows are processors (utilization) and tasks (shares sum to 1). Only
the useful columns enter the LP; pricing scans all of them with the duals, so the
result is optimal over every plan however many there are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loom.core.errors import ConfigError


def load_linprog() -> Any:
    """scipy's ``linprog``, imported on first use (scipy comes with xgboost; ~0.5 s cold)."""
    from scipy.optimize import linprog

    return linprog


def column_generation(loads: list[np.ndarray], costs: list[np.ndarray], cap: float | None,
                      start: list[list[int]]) -> tuple[list[dict[int, float]], list[list[int]], float]:
    """Solve the mixing LP over all columns, keeping only the useful ones in the LP.

    ``loads[t]`` (n_t, P): utilization each of task t's plans adds at the task's full
    rate; ``costs[t]`` (n_t,): objective per unit share. With ``cap`` None: minimize U
    subject to every processor's utilization <= U (costs ignored); with a cap: every
    processor <= cap, minimize the costs. Each round solves the LP on the active columns
    and prices every column with its duals (reduced cost = c - a.y_ub - y_eq[t]); the
    most negative few per task join. Ends when none is negative: then optimal over all.
    Returns each task's shares (column -> share, summing to 1), the active columns and
    the optimum.
    """
    linprog = load_linprog()
    active = [sorted(set(s)) for s in start]
    for _round in range(500):
        cols = [(ti, j) for ti in range(len(loads)) for j in active[ti]]
        res = _solve_restricted(linprog, loads, costs, cap, cols)
        if not _price(res, loads, costs, cap is None, active):
            break
    shares: list[dict[int, float]] = [{} for _ in range(len(loads))]
    for col, (ti, j) in enumerate(cols):
        if res.x[col] > 1e-9:
            shares[ti][j] = float(res.x[col])
    for ti in range(len(loads)):
        total = sum(shares[ti].values())
        shares[ti] = {j: s / total for j, s in shares[ti].items()}
    return shares, active, float(res.fun)


def _solve_restricted(linprog: Any, loads: list[np.ndarray], costs: list[np.ndarray], cap: float | None,
                      cols: list[tuple[int, int]]) -> Any:
    """The LP on columns ``cols`` (task, plan) only; stage 1 (``cap`` None) adds the variable U."""
    T = len(loads)
    P = loads[0].shape[1] if T else 0
    stage1 = cap is None
    n = len(cols)
    A_ub = np.zeros((P, n + stage1))
    c = np.zeros(n + stage1)
    A_eq = np.zeros((T, n + stage1))
    for col, (ti, j) in enumerate(cols):
        A_ub[:, col] = loads[ti][j]
        A_eq[ti, col] = 1.0
        if not stage1:
            c[col] = costs[ti][j]
    if stage1:
        A_ub[:, n] = -1.0
        c[n] = 1.0
    b_ub = np.zeros(P) if stage1 else np.full(P, cap)
    res = linprog(c, A_ub=A_ub if P else None, b_ub=b_ub if P else None, A_eq=A_eq, b_eq=np.ones(T),
                  bounds=(0, None), method="highs")
    if res.status != 0:
        raise ConfigError(f"the plan-mixing LP failed: {res.message}")
    return res


def _price(res: Any, loads: list[np.ndarray], costs: list[np.ndarray], stage1: bool,
           active: list[list[int]]) -> bool:
    """Add to ``active`` the (up to 8 per task) columns of most negative reduced cost; False: none."""
    P = loads[0].shape[1] if loads else 0
    y_ub = res.ineqlin.marginals if P else np.zeros(0)
    y_eq = res.eqlin.marginals
    added = False
    scale = max(1.0, abs(float(res.fun)))
    for ti in range(len(loads)):
        red = (0.0 if stage1 else costs[ti]) - loads[ti] @ y_ub - y_eq[ti]
        red = np.broadcast_to(red, (len(loads[ti]),)).copy()
        red[active[ti]] = np.inf
        order = np.argsort(red, kind="stable")[:8]
        new = [int(j) for j in order if red[j] < -1e-9 * scale]
        if new:
            active[ti] = sorted(set(active[ti]) | set(new))
            added = True
    return added


def initial_columns(load: np.ndarray, lat: np.ndarray) -> list[int]:
    """Seed columns: the fastest plan, the least total busy one, and per processor the lightest on it."""
    n = len(lat)
    idx = np.arange(n)
    total = load.sum(axis=1)
    seeds = {int(np.lexsort((idx, total, lat))[0]), int(np.lexsort((idx, lat, total))[0]),
             int(np.lexsort((idx, total, load.max(axis=1)))[0]) if load.shape[1] else 0}
    for p in range(load.shape[1]):
        seeds.add(int(np.lexsort((idx, total, load[:, p]))[0]))
    return sorted(seeds)


__all__ = ["column_generation", "initial_columns", "load_linprog"]
