"""The label DP: Pareto plans of a task with too many configs to enumerate.

Builds configs and placements together, slot by slot, keeping per state (the next
slot's processor) the Pareto set of partial (latency, memory, accuracy proxy). The
proxy is additive over slots, calibrated on one-swap and random configs; why and how
exact: ``docs/placement.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.fronts import pareto3, thin
from placement.tables import TOL, Candidate, Tables, plan_accuracies, plan_memory

#: random configs whose true accuracy calibrates the label DP's accuracy proxy
PROXY_SAMPLE = 64


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


@dataclass
class _Labels:
    """Partial plans after some slots: one row per label."""

    lat: np.ndarray
    mem: np.ndarray
    #: proxy accuracy drop so far
    dr: np.ndarray
    #: processor of the next slot
    nxt: np.ndarray
    #: (n, slots done) variant indices
    cfgs: np.ndarray
    #: (n, slots placed) processor indices (one ahead of ``cfgs`` until the last slot)
    pls: np.ndarray


def _accuracy_proxy(t: Tables) -> tuple[np.ndarray, float, list[list[int]]]:
    """The additive proxy: per (variant, slot) the accuracy drop from the best original variant.

    Returns the (V, K) drops, the slack pruning allows for the proxy's error, and the
    configs whose true accuracy it asked for (uniform, one-swap, sampled): three
    batched ``plan_accuracies`` calls in all, counting the final one for the survivors.
    """
    V, K = len(t.variants), t.k
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
    return drop, _slack(err), uniform + swaps + sample


def _extend(t: Tables, lb: _Labels, s: int, drop: np.ndarray, one_processor: bool,
            bound: float) -> tuple[np.ndarray, ...]:
    """Every label extended by every variant in slot ``s`` (and, before the last slot, every
    next processor), within ``bound``: (label, variant, next) indices and the new figures."""
    V, K, P = len(t.variants), t.k, len(t.processors)
    n = len(lb.lat)
    msp = t.ms[:, s, :][:, lb.nxt].T  # (n, V): block of each variant on the label's slot-s processor
    if s < K - 1:
        x = t.xfer[:, s][:, lb.nxt, :].transpose(1, 0, 2)  # (n, V, P_next)
        if one_processor:
            x = np.where(np.arange(P)[None, None, :] == lb.nxt[:, None, None], x, np.inf)
        R = P
    else:
        x = np.zeros((n, V, 1))
        R = 1
    new_lat = lb.lat[:, None, None] + msp[:, :, None] + x
    new_mem = np.broadcast_to((lb.mem[:, None] + t.mem[:, s][None, :])[:, :, None], (n, V, R))
    new_dr = np.broadcast_to((lb.dr[:, None] + drop[:, s][None, :])[:, :, None], (n, V, R))
    li, vi, ri = np.nonzero(np.isfinite(new_lat) & (new_lat <= bound + TOL))
    return li, vi, ri, new_lat[li, vi, ri], new_mem[li, vi, ri], new_dr[li, vi, ri]


def _prune(keys: np.ndarray, groups: np.ndarray, f_lat: np.ndarray, f_mem: np.ndarray, f_dr: np.ndarray,
           slack: float, max_labels: int) -> np.ndarray:
    """Indices of the labels kept: per state ``keys``, the (thinned) Pareto set of the fastest
    label of each ``groups`` row (state + config so far)."""
    # Labels with the same state and the same config so far differ only in placement (same
    # accuracy, same memory): only the fastest can matter. Exact, and it keeps the slack
    # below from letting them all through.
    by_lat = np.argsort(f_lat, kind="stable")
    _, first = np.unique(groups[by_lat], axis=0, return_index=True)
    distinct = np.zeros(len(f_lat), dtype=bool)
    distinct[by_lat[first]] = True
    kept: list[int] = []
    for key in np.unique(keys):
        sel = np.flatnonzero((keys == key) & distinct)
        front = pareto3(f_lat[sel].tolist(), (-f_dr[sel]).tolist(), f_mem[sel].tolist(), slack=slack)
        kept.extend(int(sel[j]) for j in thin(front, f_lat[sel].tolist(), max_labels))
    return np.array(sorted(kept), dtype=np.int64)


def label_candidates(t: Tables, one_processor: bool, bound: float,
                     max_labels: int) -> tuple[list[Candidate], np.ndarray]:
    """The label DP for large config spaces (``docs/placement.md``). Returns candidates and
    the configs whose true accuracy the proxy already needed (uniform, one-swap, sampled)."""
    K, P = t.k, len(t.processors)
    drop, slack, known = _accuracy_proxy(t)
    # Labels before slot 0: one per processor of slot 0, carrying its dispatch cost.
    lb = _Labels(lat=t.dispatch.copy(), mem=np.zeros(P), dr=np.zeros(P), nxt=np.arange(P),
                 cfgs=np.zeros((P, 0), dtype=np.int64), pls=np.arange(P)[:, None].copy())
    for s in range(K):
        li, vi, ri, f_lat, f_mem, f_dr = _extend(t, lb, s, drop, one_processor, bound)
        keys = ri if s < K - 1 else np.zeros_like(ri)
        kept = _prune(keys, np.column_stack([keys, lb.cfgs[li], vi]), f_lat, f_mem, f_dr, slack, max_labels)
        li, vi, ri = li[kept], vi[kept], ri[kept]
        last = s == K - 1
        lb = _Labels(lat=f_lat[kept], mem=f_mem[kept], dr=f_dr[kept], nxt=lb.nxt if last else ri,
                     cfgs=np.concatenate([lb.cfgs[li], vi[:, None]], axis=1),
                     pls=lb.pls[li] if last else np.concatenate([lb.pls[li], ri[:, None]], axis=1))
    out = [Candidate(tuple(int(v) for v in c), tuple(int(p) for p in pl), float(la), plan_memory(t, c, pl))
           for c, pl, la in zip(lb.cfgs, lb.pls, lb.lat, strict=True)]
    return out, np.array(known, dtype=np.int64)


__all__ = ["PROXY_SAMPLE", "label_candidates"]
