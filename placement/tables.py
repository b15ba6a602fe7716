"""A ``TaskSpace`` as dense arrays, and the dynamic programme over slots run on them.

``build_tables`` turns a task's blocks, latencies, hand-offs and memory into numpy
arrays indexed by (variant, slot, processor); ``fastest_placements`` finds each
config's fastest placement by a DP over slots, vectorised over configs;
``evaluate_pairs`` prices given (config, placement) pairs; ``plan_accuracies`` asks
the space for many configs' accuracy in one call.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loom.core.errors import ConfigError
from placement.plan import Config, Placement, TaskSpace

#: tolerance on SLO comparisons: a plan exactly at its bound or floor meets it
TOL = 1e-9
#: rows per vectorised step (configs x processor pairs, or config x placement pairs)
CHUNK = 200_000


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


@dataclass
class Tables:
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


def build_tables(space: TaskSpace) -> Tables:
    """``space`` as arrays; ``ConfigError`` for a missing block or a negative or NaN latency."""
    variants, processors, k = list(space.variants), list(space.processors), int(space.k)
    if not variants or not processors or k < 1:
        raise ConfigError(f"task {space.task!r}: a task space needs variants, processors and k >= 1 "
                          f"(got {len(variants)} variants, {len(processors)} processors, k={k})")
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
    ms, mem = _block_arrays(space, ids, processors)
    dispatch = np.array([float(space.dispatch_ms(p)) for p in processors])
    return Tables(space=space, variants=variants, processors=processors, k=k, ids=ids, bid=bid,
                  ms=ms, xfer=_transfer_array(space, ids, processors), dispatch=dispatch, mem=mem)


def _block_arrays(space: TaskSpace, ids: list[list[str]], processors: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(V, K, P) block ms (inf: cannot run) and (V, K) resident bytes."""
    V, k, P = len(ids), len(ids[0]), len(processors)
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
    return ms, mem


def _transfer_array(space: TaskSpace, ids: list[list[str]], processors: list[str]) -> np.ndarray:
    """(V, K, P, P) hand-off ms after each slot; inf where the processors have no link."""
    V, k, P = len(ids), len(ids[0]), len(processors)
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
    return xfer


def all_configs(V: int, K: int) -> np.ndarray:
    """Every config as a (V**K, K) array of variant indices, in itertools.product order."""
    return np.array(list(itertools.product(range(V), repeat=K)), dtype=np.int64).reshape(-1, K)


def all_placements(P: int, K: int, one_processor: bool) -> np.ndarray:
    """Every placement as rows of processor indices (only whole-model ones with ``one_processor``)."""
    if one_processor:
        return np.repeat(np.arange(P, dtype=np.int64)[:, None], K, axis=1)
    return np.array(list(itertools.product(range(P), repeat=K)), dtype=np.int64).reshape(-1, K)


def config_rows(t: Tables, configs: Sequence[Sequence[str]]) -> np.ndarray:
    """Configs (variant names) as rows of variant indices; ``ConfigError`` for a bad one."""
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


def fastest_placements(t: Tables, cfg: np.ndarray, one_processor: bool) -> tuple[np.ndarray, np.ndarray]:
    """For each config row, the latency and placement (processor indices) of its fastest placement.

    The DP over slots: ``cost[c, q]`` is the best latency of slots 0..s with slot s on
    q. Vectorised over configs; ``inf`` marks configs no placement can run.
    """
    n, K = cfg.shape
    P = len(t.processors)
    lat = np.empty(n)
    place = np.empty((n, K), dtype=np.int64)
    slots = np.arange(K)
    for lo in range(0, n, CHUNK // max(1, P * P)):
        c = cfg[lo:lo + CHUNK // max(1, P * P)]
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


def evaluate_pairs(t: Tables, cfg: np.ndarray, pl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def pair_grid(cfg: np.ndarray, pl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every config row paired with every placement row (config-major)."""
    return np.repeat(cfg, len(pl), axis=0), np.tile(pl, (len(cfg), 1))


def repeats_block(t: Tables, cfg: np.ndarray) -> np.ndarray:
    """Configs in which one block id fills two slots (memory then depends on the placement)."""
    if t.k < 2:
        return np.zeros(len(cfg), dtype=bool)
    b = np.sort(t.bid[cfg, np.arange(t.k)[None, :]], axis=1)
    return (b[:, 1:] == b[:, :-1]).any(axis=1)


def plan_memory(t: Tables, cfg: Sequence[int], pl: Sequence[int]) -> int:
    """Resident bytes of a plan: each distinct (block, processor) pair once (as ``make_plan``)."""
    seen = {(t.ids[v][s], p) for s, (v, p) in enumerate(zip(cfg, pl, strict=True))}
    return int(sum(int(t.space.memory_bytes.get(b, 0)) for b, _ in seen))


@dataclass
class Candidate:
    """A plan as indices (config row, placement row) with its latency and memory, before accuracy."""

    cfg: tuple[int, ...]
    pl: tuple[int, ...]
    lat: float
    mem: int


__all__ = [
    "CHUNK", "Candidate", "TOL", "Tables", "all_configs", "all_placements", "build_tables", "config_rows", "evaluate_pairs", "fastest_placements", "pair_grid", "plan_accuracies", "plan_memory", "repeats_block",
]
