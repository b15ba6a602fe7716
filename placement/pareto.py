"""The Pareto plans of one task over (latency min, accuracy max, memory min).

``pareto_plans`` enumerates configs (each with its fastest placement, from the DP over
slots) up to ``CONFIG_LIMIT`` configs, and runs the label DP (``placement.labels``)
beyond; ``fastest_plans`` is the DP alone for fixed configs; ``brute_force_pareto``
lists everything, for the tests. Design and exactness: ``docs/placement.md``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from loom.core.errors import ConfigError
from placement.fronts import pareto2, pareto3, plan_order, thin
from placement.labels import label_candidates
from placement.plan import Plan, TaskSpace
from placement.tables import (
    TOL,
    Candidate,
    Tables,
    all_configs,
    all_placements,
    build_tables,
    config_rows,
    evaluate_pairs,
    fastest_placements,
    plan_accuracies,
    plan_memory,
    repeats_block,
)

#: above this many configs (V**K), ``pareto_plans`` switches from enumerating configs to the label DP
CONFIG_LIMIT = 20_000
#: labels kept per DP state in the label DP (thinned evenly by latency beyond it)
MAX_LABELS = 4_000


def exhaustive_candidates(t: Tables, cfg: np.ndarray, one_processor: bool, bound: float) -> list[Candidate]:
    """Per config, its fastest placement (or its (latency, memory) front where blocks repeat)."""
    lat, place = fastest_placements(t, cfg, one_processor)
    repeat = repeats_block(t, cfg)
    slots = np.arange(t.k)[None, :]
    mem = t.mem[cfg, slots].sum(axis=1)
    out: list[Candidate] = []
    ok = np.flatnonzero(np.isfinite(lat) & (lat <= bound + TOL) & ~repeat)
    for i in ok:
        out.append(Candidate(tuple(int(v) for v in cfg[i]), tuple(int(p) for p in place[i]), float(lat[i]), int(mem[i])))
    rep = np.flatnonzero(repeat & np.isfinite(lat) & (lat <= bound + TOL))
    if len(rep):
        placements = all_placements(len(t.processors), t.k, one_processor)
        for i in rep:
            c = cfg[i]
            if len(placements) > 100_000:  # too many to list: the fastest one only (memory may be beaten)
                out.append(Candidate(tuple(int(v) for v in c), tuple(int(p) for p in place[i]), float(lat[i]),
                                 plan_memory(t, c, place[i])))
                continue
            lats, _ = evaluate_pairs(t, np.repeat(c[None, :], len(placements), axis=0), placements)
            good = np.flatnonzero(np.isfinite(lats) & (lats <= bound + TOL))
            cl = [float(lats[j]) for j in good]
            cm = [plan_memory(t, c, placements[j]) for j in good]
            for j in pareto2(cl, cm):
                out.append(Candidate(tuple(int(v) for v in c), tuple(int(p) for p in placements[good[j]]), cl[j], cm[j]))
    return out


def pareto_plans(
    space: TaskSpace,
    *,
    accuracy_floor: float = 0.0,
    latency_bound_ms: float = math.inf,
    max_plans: int | None = None,
    configs: Sequence[Sequence[str]] | None = None,
    one_processor: bool = False,
    config_limit: int = CONFIG_LIMIT,
    max_labels: int = MAX_LABELS,
) -> list[Plan]:
    """The Pareto set over (latency min, accuracy max, memory min) of a task's plans.

    Only plans with accuracy >= ``accuracy_floor`` and latency <= ``latency_bound_ms``
    (the front of the feasible plans is the feasible part of the whole front). Plans
    with a block on a processor that cannot run it, or a hand-off over a missing link,
    are never produced. ``configs`` restricts the configs (e.g. the uniform ones);
    ``one_processor`` restricts placements to whole models on one processor.
    ``max_plans`` thins a larger front evenly by latency, always keeping the fastest,
    the most accurate and the smallest plan. Sorted by latency (then accuracy
    descending, memory, config, placement). Exact unless the config space exceeds
    ``config_limit`` configs (``docs/placement.md``).
    """
    t = build_tables(space)
    if configs is not None:
        cands = exhaustive_candidates(t, config_rows(t, configs), one_processor, latency_bound_ms)
    elif t.n_configs <= config_limit:
        cands = exhaustive_candidates(t, all_configs(len(t.variants), t.k), one_processor, latency_bound_ms)
    else:
        cands, known = label_candidates(t, one_processor, latency_bound_ms, max_labels)
        # The original variants and one-swaps are known exactly: always in the running.
        cands += exhaustive_candidates(t, known, one_processor, latency_bound_ms)
    if not cands:
        return []
    unique_cfgs = list(dict.fromkeys(c.cfg for c in cands))
    acc_of = dict(zip(unique_cfgs, plan_accuracies(space, [t.config(c) for c in unique_cfgs]), strict=True))
    cands = [c for c in cands if acc_of[c.cfg] >= accuracy_floor - TOL]
    # Duplicates (the label DP and the known configs can meet) collapse in the Pareto sweep.
    cands = list({(c.cfg, c.pl): c for c in cands}.values())
    lat = [c.lat for c in cands]
    acc = [acc_of[c.cfg] for c in cands]
    mem = [c.mem for c in cands]
    front = pareto3(lat, acc, mem)
    if max_plans is not None and len(front) > max_plans:
        front = _cap_front(front, lat, acc, mem, max_plans)
    plans = [space.make_plan(t.config(cands[i].cfg), t.placement(cands[i].pl), accuracy=acc[i]) for i in front]
    return sorted(plans, key=plan_order)


def _cap_front(front: list[int], lat: list[float], acc: list[float], mem: list[int], max_plans: int) -> list[int]:
    """At most ``max_plans`` of ``front``: the extremes (fastest, most accurate, smallest), then an
    even spread by latency."""
    if max_plans < 1:
        raise ConfigError(f"max_plans must be >= 1, got {max_plans}")
    ends = list(dict.fromkeys([min(front, key=lambda i: (lat[i], i)), max(front, key=lambda i: (acc[i], -i)),
                               min(front, key=lambda i: (mem[i], i))]))[:max_plans]
    others = [i for i in front if i not in ends]
    return ends + (thin(others, lat, max_plans - len(ends)) if max_plans > len(ends) else [])


def fastest_plans(space: TaskSpace, configs: Sequence[Sequence[str]], *, one_processor: bool = False) -> list[Plan | None]:
    """For each config, its fastest plan (``None`` where no placement can run it).

    The same DP as ``pareto_plans``, without the front: what a policy needs when it has
    fixed the config (e.g. one original variant) and only the placement is open.
    """
    t = build_tables(space)
    rows = config_rows(t, configs)
    if not len(rows):
        return []
    lat, place = fastest_placements(t, rows, one_processor)
    ok = [i for i in range(len(rows)) if math.isfinite(lat[i])]
    accs = dict(zip(ok, plan_accuracies(space, [t.config(rows[i]) for i in ok]), strict=True))
    return [space.make_plan(t.config(rows[i]), t.placement(place[i]), accuracy=accs[i]) if i in accs else None
            for i in range(len(rows))]


def brute_force_pareto(
    space: TaskSpace,
    *,
    accuracy_floor: float = 0.0,
    latency_bound_ms: float = math.inf,
    configs: Sequence[Sequence[str]] | None = None,
    one_processor: bool = False,
) -> list[Plan]:
    """The same front as ``pareto_plans`` by listing every config x placement (tests only)."""
    all_cfgs = [tuple(c) for c in configs] if configs is not None else list(itertools.product(space.variants, repeat=space.k))
    accs = dict(zip(all_cfgs, plan_accuracies(space, all_cfgs), strict=True))
    if one_processor:
        placements = [(p,) * space.k for p in space.processors]
    else:
        placements = list(itertools.product(space.processors, repeat=space.k))
    plans = []
    for c in all_cfgs:
        if accs[c] < accuracy_floor - TOL:
            continue
        for pl in placements:
            if not all(space.can_run(space.block(v, s), p) for s, (v, p) in enumerate(zip(c, pl, strict=True))):
                continue
            try:
                plan = space.make_plan(c, pl, accuracy=accs[c])
            except ConfigError:  # no link between two processors of the placement
                continue
            if plan.latency_ms <= latency_bound_ms + TOL:
                plans.append(plan)
    plans.sort(key=plan_order)
    front: list[Plan] = []
    for p in plans:  # quadratic on purpose: simple enough to trust
        if any(q.latency_ms <= p.latency_ms and q.accuracy >= p.accuracy and q.memory_bytes <= p.memory_bytes
               for q in front):
            continue
        front.append(p)
    return front


__all__ = ["CONFIG_LIMIT", "MAX_LABELS", "brute_force_pareto", "exhaustive_candidates", "fastest_plans", "pareto_plans"]
