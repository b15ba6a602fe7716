"""The optimizer: which plans (config x placement) are worth running, and how to mix them.

Three questions, three functions:

``pareto_plans(space)``
    The Pareto set over (latency min, accuracy max, memory min) of every plan of one
    task, without enumerating configs x placements.

    * Configs are enumerated when there are at most ``config_limit`` (20,000) of them.
      For each, the fastest placement comes from a dynamic programme over slots (state:
      the processor of the current slot; cost: blocks + hand-offs + the first
      processor's dispatch), vectorised over all configs at once. Memory is charged per
      block (``TaskSpace.memory_bytes`` has no per-processor figure) and accuracy is a
      property of the config, so for a config whose slots hold distinct blocks every
      placement has the same memory and accuracy, and only the fastest one can be on the
      front. Where one block id sits in two slots of a config, placing both copies on
      one processor holds it once, so memory does depend on the placement: those
      (rare) configs get every placement enumerated and their (latency, memory) Pareto
      set kept. All accuracies come from one batched ``space.accuracies`` call. This
      path is **exact** (up to float rounding of sums).
    * Beyond ``config_limit`` configs, a label-setting DP over slots builds configs and
      placements together, keeping per state the Pareto set of partial (latency, memory,
      accuracy proxy). The proxy is additive: the drop from the most accurate original
      variant, measured for every config that differs from it in one slot. A label's
      state is the processor of the *next* slot, chosen when the label is extended, so
      the hand-off after a block is charged while its block is known and the latency
      part of the DP is exact; labels that differ only in placement keep the fastest.
      Accuracy calls: the uniform configs, then the one-swaps plus 64 random configs
      that measure the proxy's error (a label prunes another only when its proxy is
      better by half the spread of those errors), then the survivors; three batched
      calls in all. **Exact when accuracy is additive over slots** (the proxy's error is
      then 0) and no config repeats a block id, as long as no state exceeds
      ``max_labels`` labels; otherwise a heuristic (on synthetic non-additive spaces of
      10**5 configs it finds ~99% of the true front). Every uniform, one-swap and
      sampled config stays in the running with its fastest placement, and the fastest
      plan overall is always found (no label with the least latency is ever pruned).

``assign(spaces, slos, rates_rps)``
    One mix of plans per task (plan, share), meeting each task's floor and bound, that
    minimizes the most loaded processor's predicted utilization for the given arrival
    rates, then (second stage, utilization held) the rate-weighted latency. Solved as a
    linear programme by column generation over every plan that meets the SLO (exact:
    the pricing step scans all of them), so the LP stays small however many plans
    there are. Deterministic (HiGHS, fixed column order, fixed tie-breaks).

``fluid_goodput_bound(spaces, slos, rate_mix=...)``
    The same LP read the other way: the largest total arrival rate at the given mix
    that the processors can serve with plans that each meet their SLO (queueing
    ignored).

The optimizer reads only ``TaskSpace`` numbers; it imports ``estimators`` (through
``placement.plan``) and ``loom.core.errors``, nothing of the runtime.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from estimators.latency import Link, LinkModel
from loom.core.errors import ConfigError
from placement.plan import Config, Placement, Plan, TaskSpace

__all__ = [
    "Assignment", "CONFIG_LIMIT", "ENUMERATION_LIMIT", "assign", "brute_force_pareto", "fastest_plans",
    "fluid_goodput_bound", "pareto_plans", "plan_accuracies", "random_space", "time_planning",
]

#: above this many configs (V**K), ``pareto_plans`` switches from enumerating configs to the label DP
CONFIG_LIMIT = 20_000
#: (config, placement) pairs per task that ``assign``/``fluid_goodput_bound`` enumerate before narrowing
ENUMERATION_LIMIT = 4_000_000
#: labels kept per DP state in the label DP (thinned evenly by latency beyond it)
MAX_LABELS = 4_000
#: random configs whose true accuracy calibrates the label DP's accuracy proxy
PROXY_SAMPLE = 64
#: tolerance on SLO comparisons: a plan exactly at its bound or floor meets it
_TOL = 1e-9
_CHUNK = 200_000


# -- accuracy ------------------------------------------------------------------------------------------
def plan_accuracies(space: TaskSpace, configs: Sequence[Sequence[str]]) -> list[float]:
    """Accuracy of each config, in one batched call to ``space.accuracies``.

    A uniform config *is* an original variant: where ``space.variant_accuracy`` knows
    it (measured), that figure is used, so that every policy reports the same accuracy
    for the same original variant; the rest are asked for together.
    """
    configs = [tuple(c) for c in configs]
    out: list[float | None] = [None] * len(configs)
    ask: list[int] = []
    for i, c in enumerate(configs):
        if c and len(set(c)) == 1 and c[0] in space.variant_accuracy:
            out[i] = float(space.variant_accuracy[c[0]])
        else:
            ask.append(i)
    if ask:
        try:
            got = space.accuracies([configs[i] for i in ask])
        except KeyError as err:
            raise ConfigError(f"task {space.task!r}: no accuracy for config {err.args[0]!r}") from err
        if len(got) != len(ask):
            raise ConfigError(f"task {space.task!r}: accuracy function returned {len(got)} values for {len(ask)} configs")
        for i, a in zip(ask, got, strict=True):
            out[i] = float(a)
    return [float(a) for a in out]  # type: ignore[arg-type]


# -- the space as arrays -------------------------------------------------------------------------------
@dataclass
class _Tables:
    """A ``TaskSpace`` as dense arrays, so that DPs run over thousands of configs at once."""

    space: TaskSpace
    variants: list[str]
    processors: list[str]
    k: int
    #: (V, K) block ids
    ids: list[list[str]]
    #: (V, K) small ints, equal where block ids are equal (to spot repeated blocks in a config)
    bid: np.ndarray
    #: (V, K, P) block ms; inf where the processor cannot run the block
    ms: np.ndarray
    #: (V, K, P, P) hand-off after slot s from p to q; 0 on the diagonal; inf where no link exists
    xfer: np.ndarray
    #: (P,) dispatch cost of the first slot's processor
    dispatch: np.ndarray
    #: (V, K) resident bytes of each block
    mem: np.ndarray

    @property
    def n_configs(self) -> int:
        return len(self.variants) ** self.k

    def config(self, row: Sequence[int]) -> Config:
        return tuple(self.variants[int(v)] for v in row)

    def placement(self, row: Sequence[int]) -> Placement:
        return tuple(self.processors[int(p)] for p in row)


def _tables(space: TaskSpace) -> _Tables:
    variants, processors, k = list(space.variants), list(space.processors), int(space.k)
    if not variants or not processors or k < 1:
        raise ConfigError(f"task {space.task!r}: a task space needs variants, processors and k >= 1 "
                          f"(got {len(variants)} variants, {len(processors)} processors, k={k})")
    V, P = len(variants), len(processors)
    ids: list[list[str]] = []
    for v in variants:
        row = []
        for s in range(k):
            if (v, s) not in space.blocks:
                raise ConfigError(f"task {space.task!r}: no block for variant {v!r} in slot {s}")
            row.append(space.blocks[(v, s)])
        ids.append(row)
    codes: dict[str, int] = {}
    bid = np.array([[codes.setdefault(b, len(codes)) for b in row] for row in ids], dtype=np.int64)
    ms = np.full((V, k, P), np.inf)
    mem = np.zeros((V, k), dtype=np.int64)
    for vi, row in enumerate(ids):
        for s, b in enumerate(row):
            mem[vi, s] = int(space.memory_bytes.get(b, 0))
            for pi, p in enumerate(processors):
                t = space.block_ms.get((b, p))
                if t is None:
                    continue
                if not math.isfinite(t) or t < 0:
                    if math.isinf(t) and t > 0:
                        continue  # an explicit inf reads as "cannot run"
                    raise ConfigError(f"task {space.task!r}: block {b} on {p!r} has latency {t!r}")
                ms[vi, s, pi] = float(t)
    xfer = np.zeros((V, k, P, P))
    cache: dict[tuple[str, int, int], float] = {}
    for vi, row in enumerate(ids):
        for s, b in enumerate(row[:-1]):
            for pi, p in enumerate(processors):
                for qi, q in enumerate(processors):
                    if pi == qi:
                        continue
                    key = (b, pi, qi)
                    if key not in cache:
                        try:
                            cache[key] = float(space.transfer_ms(p, q, b))
                        except ConfigError:
                            # A profile that lists no link between two processors: no hand-off
                            # between them is possible, so no plan may cut there.
                            cache[key] = math.inf
                    xfer[vi, s, pi, qi] = cache[key]
    dispatch = np.array([float(space.dispatch_ms(p)) for p in processors])
    return _Tables(space=space, variants=variants, processors=processors, k=k, ids=ids, bid=bid,
                   ms=ms, xfer=xfer, dispatch=dispatch, mem=mem)


def _all_configs(V: int, K: int) -> np.ndarray:
    """Every config as a (V**K, K) array of variant indices, in itertools.product order."""
    return np.array(list(itertools.product(range(V), repeat=K)), dtype=np.int64).reshape(-1, K)


def _all_placements(P: int, K: int, one_processor: bool) -> np.ndarray:
    if one_processor:
        return np.repeat(np.arange(P, dtype=np.int64)[:, None], K, axis=1)
    return np.array(list(itertools.product(range(P), repeat=K)), dtype=np.int64).reshape(-1, K)


def _config_rows(t: _Tables, configs: Sequence[Sequence[str]]) -> np.ndarray:
    index = {v: i for i, v in enumerate(t.variants)}
    rows = []
    for c in configs:
        if len(c) != t.k:
            raise ConfigError(f"task {t.space.task!r}: config {tuple(c)} has {len(c)} slots, the space has {t.k}")
        try:
            rows.append([index[v] for v in c])
        except KeyError as err:
            raise ConfigError(f"task {t.space.task!r}: unknown variant {err.args[0]!r}; "
                              f"known: {', '.join(t.variants)}") from err
    return np.array(rows, dtype=np.int64).reshape(-1, t.k)


def _fastest_placements(t: _Tables, cfg: np.ndarray, one_processor: bool) -> tuple[np.ndarray, np.ndarray]:
    """For each config row, the latency and placement (processor indices) of its fastest placement.

    The DP over slots: ``cost[c, q]`` is the best latency of slots 0..s with slot s on
    q. Vectorised over configs; ``inf`` marks configs no placement can run.
    """
    n, K = cfg.shape
    P = len(t.processors)
    lat = np.empty(n)
    place = np.empty((n, K), dtype=np.int64)
    slots = np.arange(K)
    for lo in range(0, n, _CHUNK // max(1, P * P)):
        c = cfg[lo:lo + _CHUNK // max(1, P * P)]
        if one_processor:
            tot = t.dispatch[None, :] + t.ms[c, slots[None, :], :].sum(axis=1)  # (m, P)
            best = np.argmin(tot, axis=1)
            lat[lo:lo + len(c)] = tot[np.arange(len(c)), best]
            place[lo:lo + len(c)] = best[:, None]
            continue
        cost = t.dispatch[None, :] + t.ms[c[:, 0], 0, :]  # (m, P)
        back = np.zeros((K, len(c), P), dtype=np.int64)
        for s in range(1, K):
            step = cost[:, :, None] + t.xfer[c[:, s - 1], s - 1]  # (m, P_from, P_to)
            back[s] = np.argmin(step, axis=1)
            cost = np.take_along_axis(step, back[s][:, None, :], axis=1)[:, 0, :] + t.ms[c[:, s], s, :]
        last = np.argmin(cost, axis=1)
        lat[lo:lo + len(c)] = cost[np.arange(len(c)), last]
        pl = np.empty((len(c), K), dtype=np.int64)
        pl[:, K - 1] = last
        for s in range(K - 1, 0, -1):
            pl[:, s - 1] = back[s][np.arange(len(c)), pl[:, s]]
        place[lo:lo + len(c)] = pl
    return lat, place


def _evaluate_pairs(t: _Tables, cfg: np.ndarray, pl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Latency (n,) and per-processor busy ms (n, P) of config row i on placement row i.

    Busy time counts the dispatch cost on the first processor and each hand-off on the
    receiving one, as ``Plan.processor_ms`` does (see there why).
    """
    n, K = cfg.shape
    P = len(t.processors)
    rows = np.arange(n)
    lat = t.dispatch[pl[:, 0]].copy()
    busy = np.zeros((n, P))
    busy[rows, pl[:, 0]] += lat
    for s in range(K):
        b = t.ms[cfg[:, s], s, pl[:, s]]
        lat += b
        busy[rows, pl[:, s]] += b  # inf for unrunnable plans, which their latency drops
        if s < K - 1:
            x = t.xfer[cfg[:, s], s, pl[:, s], pl[:, s + 1]]
            lat += x
            busy[rows, pl[:, s + 1]] += x
    return lat, busy


def _grid(cfg: np.ndarray, pl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every config row paired with every placement row (config-major)."""
    return np.repeat(cfg, len(pl), axis=0), np.tile(pl, (len(cfg), 1))


def _has_repeat(t: _Tables, cfg: np.ndarray) -> np.ndarray:
    """Configs in which one block id fills two slots (memory then depends on the placement)."""
    if t.k < 2:
        return np.zeros(len(cfg), dtype=bool)
    b = np.sort(t.bid[cfg, np.arange(t.k)[None, :]], axis=1)
    return (b[:, 1:] == b[:, :-1]).any(axis=1)


def _memory(t: _Tables, cfg: Sequence[int], pl: Sequence[int]) -> int:
    """Resident bytes of a plan: each distinct (block, processor) pair once (as ``make_plan``)."""
    seen = {(t.ids[v][s], p) for s, (v, p) in enumerate(zip(cfg, pl, strict=True))}
    return int(sum(int(t.space.memory_bytes.get(b, 0)) for b, _ in seen))


# -- Pareto filters ------------------------------------------------------------------------------------
def _pareto3(lat: Sequence[float], acc: Sequence[float], mem: Sequence[float], *, slack: float = 0.0) -> list[int]:
    """Indices of the Pareto set over (lat min, acc max, mem min); one of each group of equal points.

    A sweep in latency order keeping the 2-D staircase of (memory, accuracy) seen so
    far: a point is dominated iff an earlier one has memory <= and accuracy >= its own.
    O(n log n) apart from list inserts. With ``slack`` > 0, only an accuracy better by
    at least ``slack`` dominates (a looser filter, for estimated accuracies).
    """
    order = sorted(range(len(lat)), key=lambda i: (lat[i], -acc[i], mem[i], i))
    st_mem: list[float] = []  # ascending; st_acc ascending with it (a staircase)
    st_acc: list[float] = []
    keep: list[int] = []
    for i in order:
        m, a = mem[i], acc[i]
        j = bisect_right(st_mem, m) - 1
        if j >= 0 and (st_acc[j] >= a + slack if slack > 0 else st_acc[j] >= a):
            continue
        keep.append(i)
        lo = bisect_left(st_mem, m)
        hi = lo
        while hi < len(st_mem) and st_acc[hi] <= a:
            hi += 1
        del st_mem[lo:hi], st_acc[lo:hi]
        st_mem.insert(lo, m)
        st_acc.insert(lo, a)
    return keep


def _pareto2(lat: Sequence[float], mem: Sequence[float]) -> list[int]:
    order = sorted(range(len(lat)), key=lambda i: (lat[i], mem[i], i))
    keep, best = [], math.inf
    for i in order:
        if mem[i] < best:
            keep.append(i)
            best = mem[i]
    return keep


def _thin(idx: list[int], lat: Sequence[float], limit: int) -> list[int]:
    """At most ``limit`` of ``idx``, evenly spaced in latency order, keeping both ends."""
    if len(idx) <= limit:
        return idx
    idx = sorted(idx, key=lambda i: (lat[i], i))
    picks = np.unique(np.round(np.linspace(0, len(idx) - 1, limit)).astype(int))
    return [idx[int(p)] for p in picks]


# -- pareto_plans --------------------------------------------------------------------------------------
@dataclass
class _Cand:
    cfg: tuple[int, ...]
    pl: tuple[int, ...]
    lat: float
    mem: int


def _exhaustive_candidates(t: _Tables, cfg: np.ndarray, one_processor: bool, bound: float) -> list[_Cand]:
    """Per config, its fastest placement (or its (latency, memory) front where blocks repeat)."""
    lat, place = _fastest_placements(t, cfg, one_processor)
    repeat = _has_repeat(t, cfg)
    slots = np.arange(t.k)[None, :]
    mem = t.mem[cfg, slots].sum(axis=1)
    out: list[_Cand] = []
    ok = np.flatnonzero(np.isfinite(lat) & (lat <= bound + _TOL) & ~repeat)
    for i in ok:
        out.append(_Cand(tuple(int(v) for v in cfg[i]), tuple(int(p) for p in place[i]), float(lat[i]), int(mem[i])))
    rep = np.flatnonzero(repeat & np.isfinite(lat) & (lat <= bound + _TOL))
    if len(rep):
        placements = _all_placements(len(t.processors), t.k, one_processor)
        for i in rep:
            c = cfg[i]
            if len(placements) > 100_000:  # too many to list: the fastest one only (memory may be beaten)
                out.append(_Cand(tuple(int(v) for v in c), tuple(int(p) for p in place[i]), float(lat[i]),
                                 _memory(t, c, place[i])))
                continue
            lats, _ = _evaluate_pairs(t, np.repeat(c[None, :], len(placements), axis=0), placements)
            good = np.flatnonzero(np.isfinite(lats) & (lats <= bound + _TOL))
            cl = [float(lats[j]) for j in good]
            cm = [_memory(t, c, placements[j]) for j in good]
            for j in _pareto2(cl, cm):
                out.append(_Cand(tuple(int(v) for v in c), tuple(int(p) for p in placements[good[j]]), cl[j], cm[j]))
    return out


def _slack(err: np.ndarray) -> float:
    """How much better a label's proxy accuracy must be to prune another: half the spread of the
    proxy's errors on the sample (0 when the proxy is exact, as for additive accuracy).

    Measured on 18 synthetic non-additive spaces of 10**5 configs, half the spread finds
    99% of the true front's points in ~0.1 s per task; no slack finds 86%, the full
    spread lets so many labels through that the per-state cap thins away 28%.
    """
    if not len(err):
        return 0.0
    spread = float(err.max() - err.min()) / 2
    return spread if spread > 1e-9 else 0.0


def _label_candidates(t: _Tables, one_processor: bool, bound: float, max_labels: int) -> tuple[list[_Cand], np.ndarray]:
    """The label DP for large config spaces (see the module docstring). Returns candidates and
    the configs whose true accuracy the proxy already needed (uniform, one-swap, sampled)."""
    V, K, P = len(t.variants), t.k, len(t.processors)
    uniform = [[v] * K for v in range(V)]
    uacc = plan_accuracies(t.space, [t.config(c) for c in uniform])
    ref = int(np.argmax(uacc))
    swaps = [[ref] * s + [v] + [ref] * (K - s - 1) for s in range(K) for v in range(V) if v != ref]
    # A sample of random configs measures how far the additive proxy is off (same batched call).
    rng = np.random.default_rng(0)
    sample = rng.integers(0, V, size=(PROXY_SAMPLE, K)).tolist()
    got = plan_accuracies(t.space, [t.config(c) for c in swaps + sample])
    sacc, tacc = got[:len(swaps)], np.array(got[len(swaps):])
    drop = np.zeros((V, K))
    it = iter(sacc)
    for s in range(K):
        for v in range(V):
            if v != ref:
                drop[v, s] = uacc[ref] - next(it)
    err = tacc - (uacc[ref] - drop[np.array(sample, dtype=np.int64), np.arange(K)[None, :]].sum(axis=1))
    # A label prunes another only if its proxy is better by a margin the proxy's errors
    # cannot easily overturn (see ``_slack``).
    slack = _slack(err)

    # Labels before slot 0: one per processor of slot 0, carrying its dispatch cost.
    lat = t.dispatch.copy()
    mem = np.zeros(P)
    dr = np.zeros(P)
    nxt = np.arange(P)
    cfgs = np.zeros((P, 0), dtype=np.int64)
    pls = nxt[:, None].copy()
    for s in range(K):
        n = len(lat)
        msp = t.ms[:, s, :][:, nxt].T  # (n, V): block of each variant on the label's slot-s processor
        if s < K - 1:
            x = t.xfer[:, s][:, nxt, :].transpose(1, 0, 2)  # (n, V, P_next)
            if one_processor:
                x = np.where(np.arange(P)[None, None, :] == nxt[:, None, None], x, np.inf)
            R = P
        else:
            x = np.zeros((n, V, 1))
            R = 1
        new_lat = lat[:, None, None] + msp[:, :, None] + x
        new_mem = np.broadcast_to((mem[:, None] + t.mem[:, s][None, :])[:, :, None], (n, V, R))
        new_dr = np.broadcast_to((dr[:, None] + drop[:, s][None, :])[:, :, None], (n, V, R))
        li, vi, ri = np.nonzero(np.isfinite(new_lat) & (new_lat <= bound + _TOL))
        f_lat, f_mem, f_dr = new_lat[li, vi, ri], new_mem[li, vi, ri], new_dr[li, vi, ri]
        keys = ri if s < K - 1 else np.zeros_like(ri)
        # Labels with the same state and the same config so far differ only in placement (same
        # accuracy, same memory): only the fastest can matter. Exact, and it keeps the slack
        # below from letting them all through.
        by_lat = np.argsort(f_lat, kind="stable")
        groups = np.column_stack([keys, cfgs[li], vi])[by_lat]
        _, first = np.unique(groups, axis=0, return_index=True)
        distinct = np.zeros(len(f_lat), dtype=bool)
        distinct[by_lat[first]] = True
        kept: list[int] = []
        for key in np.unique(keys):
            sel = np.flatnonzero((keys == key) & distinct)
            front = _pareto3(f_lat[sel].tolist(), (-f_dr[sel]).tolist(), f_mem[sel].tolist(), slack=slack)
            kept.extend(int(sel[j]) for j in _thin(front, f_lat[sel].tolist(), max_labels))
        kept_a = np.array(sorted(kept), dtype=np.int64)
        li, vi, ri = li[kept_a], vi[kept_a], ri[kept_a]
        lat, mem, dr = f_lat[kept_a], f_mem[kept_a], f_dr[kept_a]
        cfgs = np.concatenate([cfgs[li], vi[:, None]], axis=1)
        if s < K - 1:
            nxt = ri
            pls = np.concatenate([pls[li], ri[:, None]], axis=1)
        else:
            pls = pls[li]
    out = [_Cand(tuple(int(v) for v in c), tuple(int(p) for p in pl), float(la), _memory(t, c, pl))
           for c, pl, la in zip(cfgs, pls, lat, strict=True)]
    return out, np.array(uniform + swaps + sample, dtype=np.int64)


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
    ``config_limit`` configs (see the module docstring).
    """
    t = _tables(space)
    known = np.zeros((0, t.k), dtype=np.int64)
    if configs is not None:
        cands = _exhaustive_candidates(t, _config_rows(t, configs), one_processor, latency_bound_ms)
    elif t.n_configs <= config_limit:
        cands = _exhaustive_candidates(t, _all_configs(len(t.variants), t.k), one_processor, latency_bound_ms)
    else:
        cands, known = _label_candidates(t, one_processor, latency_bound_ms, max_labels)
        # The original variants and one-swaps are known exactly: always in the running.
        cands += _exhaustive_candidates(t, known, one_processor, latency_bound_ms)
    if not cands:
        return []
    unique_cfgs = list(dict.fromkeys(c.cfg for c in cands))
    acc_of = dict(zip(unique_cfgs, plan_accuracies(space, [t.config(c) for c in unique_cfgs]), strict=True))
    cands = [c for c in cands if acc_of[c.cfg] >= accuracy_floor - _TOL]
    # Duplicates (the label DP and the known configs can meet) collapse in the Pareto sweep.
    cands = list({(c.cfg, c.pl): c for c in cands}.values())
    lat = [c.lat for c in cands]
    acc = [acc_of[c.cfg] for c in cands]
    mem = [c.mem for c in cands]
    front = _pareto3(lat, acc, mem)
    if max_plans is not None and len(front) > max_plans:
        if max_plans < 1:
            raise ConfigError(f"max_plans must be >= 1, got {max_plans}")
        # The extremes first (fastest, most accurate, smallest), then an even spread by latency.
        ends = list(dict.fromkeys([min(front, key=lambda i: (lat[i], i)), max(front, key=lambda i: (acc[i], -i)),
                                   min(front, key=lambda i: (mem[i], i))]))[:max_plans]
        others = [i for i in front if i not in ends]
        front = ends + (_thin(others, lat, max_plans - len(ends)) if max_plans > len(ends) else [])
    plans = [space.make_plan(t.config(cands[i].cfg), t.placement(cands[i].pl), accuracy=acc[i]) for i in front]
    return sorted(plans, key=_plan_order)


def fastest_plans(space: TaskSpace, configs: Sequence[Sequence[str]], *, one_processor: bool = False) -> list[Plan | None]:
    """For each config, its fastest plan (``None`` where no placement can run it).

    The same DP as ``pareto_plans``, without the front: what a policy needs when it has
    fixed the config (e.g. one original variant) and only the placement is open.
    """
    t = _tables(space)
    rows = _config_rows(t, configs)
    if not len(rows):
        return []
    lat, place = _fastest_placements(t, rows, one_processor)
    ok = [i for i in range(len(rows)) if math.isfinite(lat[i])]
    accs = dict(zip(ok, plan_accuracies(space, [t.config(rows[i]) for i in ok]), strict=True))
    return [space.make_plan(t.config(rows[i]), t.placement(place[i]), accuracy=accs[i]) if i in accs else None
            for i in range(len(rows))]


def _plan_order(p: Plan) -> tuple[Any, ...]:
    return (p.latency_ms, -p.accuracy, p.memory_bytes, p.config, p.placement)


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
        if accs[c] < accuracy_floor - _TOL:
            continue
        for pl in placements:
            if not all(space.can_run(space.block(v, s), p) for s, (v, p) in enumerate(zip(c, pl, strict=True))):
                continue
            try:
                plan = space.make_plan(c, pl, accuracy=accs[c])
            except ConfigError:  # no link between two processors of the placement
                continue
            if plan.latency_ms <= latency_bound_ms + _TOL:
                plans.append(plan)
    plans.sort(key=_plan_order)
    front: list[Plan] = []
    for p in plans:  # quadratic on purpose: simple enough to trust
        if any(q.latency_ms <= p.latency_ms and q.accuracy >= p.accuracy and q.memory_bytes <= p.memory_bytes
               for q in front):
            continue
        front.append(p)
    return front


# -- joint assignment ----------------------------------------------------------------------------------
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


@dataclass
class _Points:
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


def _slo_pair(task: str, slo: Any) -> tuple[float, float]:
    """``(latency_ms, accuracy_floor)``, from a pair or an object with those attributes."""
    if hasattr(slo, "latency_ms") and hasattr(slo, "accuracy_floor"):
        return float(slo.latency_ms), float(slo.accuracy_floor)
    try:
        lat, floor = slo
        return float(lat), float(floor)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"task {task!r}: an SLO is (latency_ms, accuracy_floor), got {slo!r}") from err


def _space_points(space: TaskSpace, latency_ms: float, floor: float, gidx: np.ndarray) -> _Points:
    """Every plan of ``space`` meeting the SLO (enumerated in chunks), or a fallback plan.

    Exact (all plans) when the space has at most ``CONFIG_LIMIT`` configs and the
    floor-meeting configs times placements are at most ``ENUMERATION_LIMIT``; otherwise
    narrowed to the configs of the Pareto front (and, if still too many, to each one's
    fastest and whole-model placements), with a ``RuntimeWarning``.
    """
    t = _tables(space)
    V, K, P = len(t.variants), t.k, len(t.processors)
    exact = True
    if t.n_configs <= CONFIG_LIMIT:
        cfg = _all_configs(V, K)
    else:
        exact = False
        # The configs on the SLO's front; where it is empty, those the fallback chooses from.
        front = (pareto_plans(space, accuracy_floor=floor, latency_bound_ms=latency_ms)
                 or pareto_plans(space, accuracy_floor=floor) or pareto_plans(space))
        cfg = _config_rows(t, list(dict.fromkeys(p.config for p in front)))
    acc = np.array(plan_accuracies(space, [t.config(c) for c in cfg])) if len(cfg) else np.zeros(0)
    floor_ok = acc >= floor - _TOL
    ok = floor_ok.copy()
    placements = _all_placements(P, K, False)
    per_config = False  # True: each config gets its own fastest placement besides ``placements``
    if ok.sum() * len(placements) > ENUMERATION_LIMIT:
        exact = False
        keep = {tuple(p.config) for p in pareto_plans(space, accuracy_floor=floor, latency_bound_ms=latency_ms)}
        ok &= np.array([t.config(c) in keep for c in cfg], dtype=bool)
        if ok.sum() * len(placements) > ENUMERATION_LIMIT:
            placements, per_config = _all_placements(P, K, True), True
    if not exact:
        warnings.warn(f"task {space.task!r}: too many plans to list; the LP considers a subset "
                      "(the result is not guaranteed optimal)", RuntimeWarning, stacklevel=3)
    lats, accs, busys, cfgs, pls = [], [], [], [], []
    sel = np.flatnonzero(ok)
    step = max(1, _CHUNK // len(placements))
    for lo in range(0, len(sel), step):
        ci = sel[lo:lo + step]
        c_rows, p_rows = _grid(cfg[ci], placements)
        a_rows = np.repeat(acc[ci], len(placements))
        if per_config:
            _, fp = _fastest_placements(t, cfg[ci], False)
            c_rows, p_rows = np.concatenate([c_rows, cfg[ci]]), np.concatenate([p_rows, fp])
            a_rows = np.concatenate([a_rows, acc[ci]])
        lat, busy = _evaluate_pairs(t, c_rows, p_rows)
        good = np.flatnonzero(np.isfinite(lat) & (lat <= latency_ms + _TOL))
        lats.append(lat[good])
        accs.append(a_rows[good])
        busys.append(busy[good])
        cfgs.append(c_rows[good])
        pls.append(p_rows[good])
    meets = bool(sum(len(x) for x in lats))
    if not meets:
        # Nothing meets the SLO: the fastest plan that meets the floor, else the most accurate one.
        fl, fp = _fastest_placements(t, cfg, False)
        runs = np.isfinite(fl)
        if not runs.any():
            raise ConfigError(f"task {space.task!r}: no plan can run (every config has a block no processor runs)")
        pool = floor_ok & runs if (floor_ok & runs).any() else runs & (acc >= acc[runs].max() - _TOL)
        pick = np.flatnonzero(pool)
        i = int(pick[np.lexsort((-acc[pick], fl[pick]))[0]])
        c_rows, p_rows = cfg[i][None, :], fp[i][None, :]
        lat, busy = _evaluate_pairs(t, c_rows, p_rows)
        lats, accs, busys, cfgs, pls = [lat], [acc[i:i + 1]], [busy], [c_rows], [p_rows]
    lat_a, acc_a = np.concatenate(lats), np.concatenate(accs)
    cfg_a, pl_a = np.concatenate(cfgs), np.concatenate(pls)
    busy_g = np.zeros((len(lat_a), int(gidx.max()) + 1))
    busy_g[:, gidx] = np.concatenate(busys)

    def make(i: int) -> Plan:
        return space.make_plan(t.config(cfg_a[i]), t.placement(pl_a[i]), accuracy=float(acc_a[i]))

    return _Points(space.task, lat_a, acc_a, busy_g, make, meets, exact)


def _plan_points(task: str, plans: Sequence[Plan], latency_ms: float, floor: float, procs: list[str]) -> _Points:
    if not plans:
        raise ConfigError(f"task {task!r}: an empty candidate list")
    pidx = {p: i for i, p in enumerate(procs)}
    meets = [p for p in plans if p.accuracy >= floor - _TOL and p.latency_ms <= latency_ms + _TOL]
    ok = bool(meets)
    if not ok:
        floor_ok = [p for p in plans if p.accuracy >= floor - _TOL]
        pool = floor_ok or [p for p in plans if p.accuracy >= max(q.accuracy for q in plans) - _TOL]
        meets = [min(pool, key=_plan_order)]
    busy = np.zeros((len(meets), len(procs)))
    for i, p in enumerate(meets):
        for proc, ms in p.processor_ms().items():
            busy[i, pidx[proc]] += ms
    return _Points(task, np.array([p.latency_ms for p in meets]), np.array([p.accuracy for p in meets]), busy,
                   lambda i, meets=meets: meets[i], ok, True)


def _linprog() -> Any:
    from scipy.optimize import linprog  # scipy comes with xgboost; imported where it is needed

    return linprog


def _column_generation(loads: list[np.ndarray], costs: list[np.ndarray], cap: float | None,
                       start: list[list[int]]) -> tuple[list[dict[int, float]], list[list[int]], float]:
    """Solve the mixing LP over all columns, keeping only the useful ones in the LP.

    ``loads[t]`` (n_t, P): utilization each of task t's plans adds at the task's full
    rate; ``costs[t]`` (n_t,): objective per unit share. With ``cap`` None: minimize U
    subject to every processor's utilization <= U (costs ignored); with a cap: every
    processor <= cap, minimize the costs. Each round solves the LP on the active columns
    and prices every column with its duals (reduced cost = c - a.y_ub - y_eq[t]); the
    most negative few per task join. Ends when none is negative: then optimal over all.
    """
    linprog = _linprog()
    T = len(loads)
    P = loads[0].shape[1] if T else 0
    active = [sorted(set(s)) for s in start]
    stage1 = cap is None
    for _round in range(500):
        cols = [(ti, j) for ti in range(T) for j in active[ti]]
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
        y_ub = res.ineqlin.marginals if P else np.zeros(0)
        y_eq = res.eqlin.marginals
        added = False
        scale = max(1.0, abs(float(res.fun)))
        for ti in range(T):
            red = (0.0 if stage1 else costs[ti]) - loads[ti] @ y_ub - y_eq[ti]
            red = np.broadcast_to(red, (len(loads[ti]),)).copy()
            red[active[ti]] = np.inf
            order = np.argsort(red, kind="stable")[:8]
            new = [int(j) for j in order if red[j] < -1e-9 * scale]
            if new:
                active[ti] = sorted(set(active[ti]) | set(new))
                added = True
        if not added:
            break
    shares: list[dict[int, float]] = [{} for _ in range(T)]
    for col, (ti, j) in enumerate(cols):
        if res.x[col] > 1e-9:
            shares[ti][j] = float(res.x[col])
    for ti in range(T):
        total = sum(shares[ti].values())
        shares[ti] = {j: s / total for j, s in shares[ti].items()}
    return shares, active, float(res.fun)


def _initial_columns(load: np.ndarray, lat: np.ndarray) -> list[int]:
    """Seed columns: the fastest plan, the least total busy one, and per processor the lightest on it."""
    n = len(lat)
    idx = np.arange(n)
    total = load.sum(axis=1)
    seeds = {int(np.lexsort((idx, total, lat))[0]), int(np.lexsort((idx, lat, total))[0]),
             int(np.lexsort((idx, total, load.max(axis=1)))[0]) if load.shape[1] else 0}
    for p in range(load.shape[1]):
        seeds.add(int(np.lexsort((idx, total, load[:, p]))[0]))
    return sorted(seeds)


def _gather(spaces: Mapping[str, TaskSpace], slos: Mapping[str, Any],
            candidates: Mapping[str, Sequence[Plan]] | None, tasks: list[str]) -> tuple[list[_Points], list[str]]:
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
        lat, floor = _slo_pair(task, slos[task])
        if candidates is not None and task in candidates:
            points.append(_plan_points(task, candidates[task], lat, floor, procs))
        else:
            gidx = np.array([pidx[p] for p in spaces[task].processors], dtype=np.int64)
            pts = _space_points(spaces[task], lat, floor, gidx)
            if pts.busy.shape[1] < len(procs):
                pts.busy = np.pad(pts.busy, ((0, 0), (0, len(procs) - pts.busy.shape[1])))
            points.append(pts)
    return points, procs


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
    points, procs = _gather(spaces, slos, candidates, tasks)
    rates = [float(rates_rps[t]) for t in tasks]
    loads = [r * pt.busy / 1000.0 for r, pt in zip(rates, points, strict=True)]
    start = [_initial_columns(ld if r > 0 else pt.busy, pt.lat) for ld, r, pt in zip(loads, rates, points, strict=True)]
    _, active, u_star = _column_generation(loads, [np.zeros(len(pt.lat)) for pt in points], None, start)
    total_rate = sum(rates)
    weights = [(r / total_rate if total_rate > 0 else 1.0 / len(tasks)) + 1e-6 for r in rates]
    costs = []
    for w, pt in zip(weights, points, strict=True):
        base = max(float(pt.lat.min()), 1e-9)
        costs.append(w * (pt.lat / base - 1e-4 * pt.acc))
    cap = u_star * (1 + 1e-7) + 1e-12
    shares, _, _ = _column_generation(loads, costs, cap, active)
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
    points, _ = _gather({t: spaces[t] for t in tasks}, slos, candidates, tasks)
    served = [(t, pt) for t, pt in zip(tasks, points, strict=True) if pt.meets]
    if not served:
        return 0.0
    loads = [mix[t] / total * pt.busy / 1000.0 for t, pt in served]
    start = [_initial_columns(ld, pt.lat) for ld, (_, pt) in zip(loads, served, strict=True)]
    _, _, u_star = _column_generation(loads, [np.zeros(len(pt.lat)) for _, pt in served], None, start)
    fraction = sum(mix[t] for t, _ in served) / total
    return math.inf if u_star <= 0 else fraction / u_star


# -- synthetic spaces and timing -----------------------------------------------------------------------
def random_space(
    task: str = "task",
    *,
    n_variants: int = 10,
    k: int = 3,
    processors: Sequence[str] = ("cpu", "gpu", "npu"),
    seed: int = 0,
    unsupported: float = 0.05,
    additive_accuracy: bool = False,
) -> TaskSpace:
    """A synthetic ``TaskSpace`` with random block latencies, hand-offs and accuracies.

    For tests and timing. Each processor has a random speed; each block a random cost;
    a fraction ``unsupported`` of (block, processor) pairs cannot run (never on the
    first processor, so every config can run somewhere). Accuracy is additive over
    slots (``additive_accuracy``) or that plus a deterministic pairwise interaction term.
    """
    rng = np.random.default_rng(seed)
    variants = ["dense"] + [f"v{i}" for i in range(1, n_variants)]
    procs = list(processors)
    speed = {p: float(rng.uniform(0.3, 3.0)) for p in procs}
    blocks, block_ms, out_bytes, memory = {}, {}, {}, {}
    for vi, v in enumerate(variants):
        for s in range(k):
            b = f"{task}/{v}/{s}"
            blocks[(v, s)] = b
            cost = float(rng.uniform(1.0, 10.0)) * (1.0 - 0.6 * vi / max(1, n_variants))
            for pi, p in enumerate(procs):
                if pi > 0 and rng.random() < unsupported:
                    continue
                block_ms[(b, p)] = cost * speed[p] * float(rng.uniform(0.7, 1.3))
            out_bytes[b] = float(rng.choice([64e3, 256e3, 1e6]))
            memory[b] = int(rng.integers(1, 50)) * 1_000_000
    drop = {(v, s): (0.0 if vi == 0 else float(rng.uniform(0.0, 0.05))) for vi, v in enumerate(variants) for s in range(k)}
    inter = rng.uniform(-0.01, 0.01, size=(n_variants, n_variants))
    vindex = {v: i for i, v in enumerate(variants)}

    def accuracy(configs: Sequence[Config]) -> list[float]:
        out = []
        for c in configs:
            a = 0.9 - sum(drop[(v, s)] for s, v in enumerate(c))
            if not additive_accuracy:  # a seam between two different variants costs a little more
                a -= sum(abs(inter[vindex[c[s]], vindex[c[s + 1]]]) for s in range(len(c) - 1) if c[s] != c[s + 1])
            out.append(a)
        return out

    links = {(a, b): Link(latency_ms=float(rng.uniform(0.05, 0.5)), bandwidth_gbps=float(rng.uniform(1.0, 20.0)))
             for a, b in itertools.combinations(procs, 2)}
    link_model = LinkModel(links=links, symmetric=True,
                           dispatch_ms={p: float(rng.uniform(0.0, 0.3)) for p in procs})
    return TaskSpace(task=task, variants=variants, k=k, processors=procs, blocks=blocks, block_ms=block_ms,
                     out_bytes=out_bytes, memory_bytes=memory, accuracy=accuracy, link_model=link_model,
                     variant_accuracy={v: accuracy([(v,) * k])[0] for v in variants})


def time_planning(n_tasks: int = 4, n_variants: int = 10, k: int = 3, n_processors: int = 3,
                  seed: int = 0) -> dict[str, float]:
    """Seconds to plan ``n_tasks`` synthetic tasks: Pareto sets, then the joint assignment.

    ``total_s`` excludes the first import of scipy.optimize (``scipy_import_s``), which a
    long-running process pays once.

    ``python -m placement.optimizer`` prints it for the 4 x 10 x 3 x 3 case.
    """
    procs = [f"p{i}" for i in range(n_processors)]
    spaces = {f"t{i}": random_space(f"t{i}", n_variants=n_variants, k=k, processors=procs, seed=seed + i)
              for i in range(n_tasks)}
    t_import = time.perf_counter()
    _linprog()  # a one-off import (scipy.optimize: ~0.5 s cold), reported apart from planning
    t0 = time.perf_counter()
    fronts = {name: pareto_plans(sp, accuracy_floor=0.8) for name, sp in spaces.items()}
    t1 = time.perf_counter()
    slos = {name: (max(p.latency_ms for p in fronts[name]) if fronts[name] else 100.0, 0.8) for name in spaces}
    result = assign(spaces, slos, {name: 20.0 for name in spaces})
    t2 = time.perf_counter()
    return {"scipy_import_s": t0 - t_import, "pareto_s": t1 - t0, "assign_s": t2 - t1, "total_s": t2 - t0,
            "plans": float(sum(len(f) for f in fronts.values())), "max_utilization": result.max_utilization}


if __name__ == "__main__":  # pragma: no cover - a timing aid, not part of the API
    for key, value in time_planning().items():
        print(f"{key}: {value:.4g}")
