"""Sharing-aware ordering of queued work on one processor: consecutive jobs reuse resident blocks.

After PartialLoading (Qu et al., 2025). A ``Job`` is a chain of blocks plus compute;
an LRU cache of ``capacity`` bytes holds blocks. Objective: most deadlines hit, then
least load ms. ``order_fifo``/``order_edf`` are the baselines, ``order_backbone_dp`` is
exact (a DP over jobs done and cache state), ``order_greedy`` never hits fewer
deadlines than EDF, ``brute_force`` is for the tests. The model: ``docs/placement.md``.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from loom.core.errors import ConfigError

# Finish times are sums of floats; a deadline met "exactly" must not flip on rounding.
_EPS_S = 1e-9

Cache = tuple[str, ...]  # resident blocks, least recently used first


@dataclass(frozen=True)
class Job:
    """One queued request: run ``blocks`` (in order) then ``exec_ms`` of compute."""

    id: str
    arrival_s: float
    deadline_s: float
    blocks: tuple[str, ...]
    exec_ms: float


@dataclass(frozen=True)
class Outcome:
    """What an order leads to. Times are absolute seconds, like the jobs'."""

    order: tuple[str, ...]
    start_s: dict[str, float]
    finish_s: dict[str, float]
    hit: dict[str, bool]
    total_load_ms: float
    loads: tuple[tuple[str, str], ...]  # (job id, block) in load order
    evictions: tuple[tuple[str, str], ...]  # (job id that needed room, evicted block)
    peak_bytes: int
    resident: Cache  # final cache, LRU first

    @property
    def hits(self) -> int:
        return sum(self.hit.values())

    @property
    def hit_rate(self) -> float:
        return self.hits / len(self.hit) if self.hit else 1.0

    def objective(self) -> tuple[int, float]:
        """Larger is better: (deadlines hit, -total load ms)."""
        return self.hits, -self.total_load_ms


@dataclass(frozen=True)
class Instance:
    """Everything an ordering needs; ``compare_policies`` takes a list of these."""

    jobs: tuple[Job, ...]
    sizes: Mapping[str, int]
    load_ms: Mapping[str, float]
    capacity: int
    resident: Cache = ()
    now: float = 0.0

    def simulate(self, order: Sequence[str]) -> Outcome:
        return simulate(order, self.jobs, self.sizes, self.load_ms, self.capacity,
                        self.resident, self.now)

    def args(self) -> tuple:
        return self.jobs, self.sizes, self.load_ms, self.capacity, self.resident, self.now


@dataclass(frozen=True)
class PolicyScore:
    """One policy over a set of instances."""

    hit_rate: float
    hits: int
    jobs: int
    total_load_ms: float
    per_instance_hits: tuple[int, ...] = field(default=())


# ---------------------------------------------------------------- validation + core step


def _unique(blocks: Iterable[str]) -> tuple[str, ...]:
    # a block listed twice in a job is still one resident copy
    return tuple(dict.fromkeys(blocks))


def _check(jobs: Sequence[Job], sizes: Mapping[str, int], load_ms: Mapping[str, float],
           capacity: int, resident: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Validate an instance; return each job's distinct blocks. Raises ConfigError."""
    if capacity <= 0:
        raise ConfigError(f"capacity: must be > 0 bytes, got {capacity}")
    ids = [j.id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"jobs: duplicate job ids in {ids}")
    need: dict[str, tuple[str, ...]] = {}
    for j in jobs:
        if j.exec_ms < 0 or not math.isfinite(j.exec_ms):
            raise ConfigError(f"job {j.id!r}: exec_ms must be finite and >= 0, got {j.exec_ms}")
        blocks = _unique(j.blocks)
        for b in blocks:
            if b not in sizes or b not in load_ms:
                raise ConfigError(f"job {j.id!r}: block {b!r} has no size or load_ms")
            if sizes[b] < 0 or load_ms[b] < 0:
                raise ConfigError(f"block {b!r}: size and load_ms must be >= 0")
        total = sum(sizes[b] for b in blocks)
        if total > capacity:
            raise ConfigError(f"job {j.id!r}: its blocks need {total} bytes, more than "
                              f"capacity {capacity}; it can never run")
        need[j.id] = blocks
    res = list(resident)
    if len(set(res)) != len(res):
        raise ConfigError(f"resident: duplicate blocks in {res}")
    for b in res:
        if b not in sizes:
            raise ConfigError(f"resident: block {b!r} has no size")
    if sum(sizes[b] for b in res) > capacity:
        raise ConfigError(f"resident: initial blocks exceed capacity {capacity}")
    return need


def _step(cache: Cache, blocks: tuple[str, ...], sizes: Mapping[str, int],
          load_ms: Mapping[str, float], capacity: int
          ) -> tuple[Cache, float, tuple[str, ...], tuple[str, ...]]:
    """Run one job's loads on ``cache``: (new cache, load ms, loaded, evicted).

    LRU eviction that skips the job's own blocks; the job's blocks become the most
    recent, in their order. ``_check`` guarantees the job fits, so eviction ends.
    """
    mine = set(blocks)
    resident = set(cache)
    missing = tuple(b for b in blocks if b not in resident)
    used = sum(sizes[b] for b in cache)
    need = sum(sizes[b] for b in missing)
    evicted: list[str] = []
    for b in cache:  # LRU first
        if used + need <= capacity:
            break
        if b in mine:
            continue
        evicted.append(b)
        used -= sizes[b]
    gone = set(evicted)
    new = tuple(b for b in cache if b not in gone and b not in mine) + blocks
    return new, sum(load_ms[b] for b in missing), missing, tuple(evicted)


def simulate(order: Sequence[str], jobs: Sequence[Job], sizes: Mapping[str, int],
             load_ms: Mapping[str, float], capacity: int, resident: Sequence[str] = (),
             now: float = 0.0) -> Outcome:
    """Run ``order`` (a permutation of the job ids) from ``now`` on the LRU model."""
    need = _check(jobs, sizes, load_ms, capacity, resident)
    if sorted(order) != sorted(need):
        raise ConfigError(f"order: must be a permutation of the job ids {sorted(need)}, "
                          f"got {list(order)}")
    by_id = {j.id: j for j in jobs}
    cache: Cache = tuple(resident)
    t = now
    start: dict[str, float] = {}
    finish: dict[str, float] = {}
    hit: dict[str, bool] = {}
    loads: list[tuple[str, str]] = []
    evictions: list[tuple[str, str]] = []
    total = 0.0
    peak = sum(sizes[b] for b in cache)
    for jid in order:
        j = by_id[jid]
        cache, ms, loaded, evicted = _step(cache, need[jid], sizes, load_ms, capacity)
        loads += [(jid, b) for b in loaded]
        evictions += [(jid, b) for b in evicted]
        peak = max(peak, sum(sizes[b] for b in cache))  # evictions precede loads
        start[jid] = max(t, j.arrival_s)
        t = start[jid] + (ms + j.exec_ms) / 1000.0
        finish[jid] = t
        hit[jid] = t <= j.deadline_s + _EPS_S
        total += ms
    return Outcome(tuple(order), start, finish, hit, total, tuple(loads), tuple(evictions),
                   peak, cache)


# ---------------------------------------------------------------- baselines


def order_fifo(jobs: Sequence[Job]) -> list[str]:
    """Arrival order (ties: deadline, id)."""
    return [j.id for j in sorted(jobs, key=lambda j: (j.arrival_s, j.deadline_s, j.id))]


def order_edf(jobs: Sequence[Job]) -> list[str]:
    """Earliest deadline first (ties: arrival, id)."""
    return [j.id for j in sorted(jobs, key=lambda j: (j.deadline_s, j.arrival_s, j.id))]


# ---------------------------------------------------------------- structure


def is_backbone_sharing(jobs: Sequence[Job]) -> bool:
    """True when the jobs' block chains form a prefix forest.

    That is: any block used by several jobs is reached by the same chain of blocks
    before it in all of them (a shared backbone prefix, possibly branching like a
    tree), and blocks after it are either shared the same way or a task's own head.
    """
    prefix_of: dict[str, tuple[str, ...]] = {}
    for j in jobs:
        blocks = tuple(j.blocks)
        if len(set(blocks)) != len(blocks):
            return False
        for i, b in enumerate(blocks):
            if prefix_of.setdefault(b, blocks[:i]) != blocks[:i]:
                return False
    return True


# ---------------------------------------------------------------- exact DP


@dataclass(frozen=True)
class _Label:
    t: float
    hits: int
    load: float
    job: str | None
    parent: _Label | None


def _dominates(a: _Label, b: _Label) -> bool:
    # exact comparisons: a tolerance here could drop a label that alone meets a deadline
    return a.t <= b.t and a.hits >= b.hits and a.load <= b.load


def _best_key(lab: _Label) -> tuple[int, float, float]:
    return lab.hits, -round(lab.load, 9), -lab.t


def order_backbone_dp(jobs: Sequence[Job], sizes: Mapping[str, int],
                      load_ms: Mapping[str, float], capacity: int,
                      resident: Sequence[str] = (), now: float = 0.0, *,
                      max_jobs: int = 12, require_backbone: bool = True) -> list[str]:
    """Exact order: max deadlines hit, then min total load ms (``docs/placement.md``).

    Bitmask DP over jobs, exponential in n: refuses more than ``max_jobs`` jobs, and
    (unless ``require_backbone=False``) instances that are not backbone-sharing, where
    the state space is not kept small by the structure (use ``order_greedy``).
    """
    need = _check(jobs, sizes, load_ms, capacity, resident)
    n = len(jobs)
    if n > max_jobs:
        raise ConfigError(f"order_backbone_dp: {n} jobs, more than max_jobs={max_jobs}")
    if require_backbone and not is_backbone_sharing(jobs):
        raise ConfigError("order_backbone_dp: jobs do not share backbones as a prefix forest;"
                          " use order_greedy (or require_backbone=False)")
    if n == 0:
        return []
    # one canonical index order (EDF) so ties resolve the same way every run
    ordered = sorted(jobs, key=lambda j: (j.deadline_s, j.arrival_s, j.id))
    # layer k: (mask, cache) -> Pareto front of labels
    layer: dict[tuple[int, Cache], list[_Label]] = {
        (0, tuple(resident)): [_Label(now, 0, 0.0, None, None)]}
    step_memo: dict[tuple[Cache, str], tuple[Cache, float]] = {}
    for _ in range(n):
        nxt: dict[tuple[int, Cache], list[_Label]] = {}
        for (mask, cache), front in layer.items():
            for i, j in enumerate(ordered):
                if mask >> i & 1:
                    continue
                key = (cache, j.id)
                if key not in step_memo:
                    new_cache, ms, _, _ = _step(cache, need[j.id], sizes, load_ms, capacity)
                    step_memo[key] = (new_cache, ms)
                new_cache, ms = step_memo[key]
                bucket = nxt.setdefault((mask | 1 << i, new_cache), [])
                for lab in front:
                    t = max(lab.t, j.arrival_s) + (ms + j.exec_ms) / 1000.0
                    cand = _Label(t, lab.hits + (t <= j.deadline_s + _EPS_S),
                                  lab.load + ms, j.id, lab)
                    if any(_dominates(o, cand) for o in bucket):
                        continue
                    bucket[:] = [o for o in bucket if not _dominates(cand, o)]
                    bucket.append(cand)
        layer = nxt
    best = max((lab for front in layer.values() for lab in front), key=_best_key)
    out: list[str] = []
    node: _Label | None = best
    while node is not None and node.job is not None:
        out.append(node.job)
        node = node.parent
    return out[::-1]


# ---------------------------------------------------------------- greedy


def _sim_from(order: Sequence[str], by_id: Mapping[str, Job], need: Mapping[str, tuple[str, ...]],
              cache: Cache, t: float, sizes: Mapping[str, int], load_ms: Mapping[str, float],
              capacity: int) -> tuple[int, Cache, float, float]:
    """Hits, final cache, clock and load ms of running ``order`` from a state (no checks)."""
    hits = 0
    load = 0.0
    for jid in order:
        j = by_id[jid]
        cache, ms, _, _ = _step(cache, need[jid], sizes, load_ms, capacity)
        t = max(t, j.arrival_s) + (ms + j.exec_ms) / 1000.0
        hits += t <= j.deadline_s + _EPS_S
        load += ms
    return hits, cache, t, load


def order_greedy(jobs: Sequence[Job], sizes: Mapping[str, int], load_ms: Mapping[str, float],
                 capacity: int, resident: Sequence[str] = (), now: float = 0.0) -> list[str]:
    """Reuse-first order guarded by EDF (``docs/placement.md``); never fewer hits than EDF."""
    need = _check(jobs, sizes, load_ms, capacity, resident)
    by_id = {j.id: j for j in jobs}
    remaining = order_edf(jobs)  # kept in EDF order
    cache: Cache = tuple(resident)
    t = now
    out: list[str] = []
    while remaining:
        # what running each job next would cost / finish at, from the current state
        info: dict[str, tuple[float, int, float]] = {}
        res = set(cache)
        for jid in remaining:
            j = by_id[jid]
            ms = sum(load_ms[b] for b in need[jid] if b not in res)
            reuse = sum(sizes[b] for b in need[jid] if b in res)
            info[jid] = (ms, reuse, max(t, j.arrival_s) + (ms + j.exec_ms) / 1000.0)
        alive = [jid for jid in remaining if info[jid][2] <= by_id[jid].deadline_s + _EPS_S]
        pool = alive or remaining
        # baseline: everything left in EDF order from here
        base, _, _, _ = _sim_from(remaining, by_id, need, cache, t, sizes, load_ms, capacity)
        ranked = sorted(pool, key=lambda x: (info[x][0], -info[x][1], by_id[x].deadline_s, x))
        pick = remaining[0]  # EDF head: always satisfies the guard
        for jid in ranked:
            if jid == remaining[0]:
                break
            rest = [x for x in remaining if x != jid]
            h, _, _, _ = _sim_from([jid, *rest], by_id, need, cache, t, sizes, load_ms,
                                   capacity)
            if h >= base:
                pick = jid
                break
        j = by_id[pick]
        cache, ms, _, _ = _step(cache, need[pick], sizes, load_ms, capacity)
        t = max(t, j.arrival_s) + (ms + j.exec_ms) / 1000.0
        out.append(pick)
        remaining.remove(pick)
    return out


# ---------------------------------------------------------------- brute force


def brute_force(jobs: Sequence[Job], sizes: Mapping[str, int], load_ms: Mapping[str, float],
                capacity: int, resident: Sequence[str] = (), now: float = 0.0, *,
                max_jobs: int = 8) -> list[str]:
    """Best permutation by (hits, -load ms), first in EDF-index order among ties."""
    need = _check(jobs, sizes, load_ms, capacity, resident)
    if len(jobs) > max_jobs:
        raise ConfigError(f"brute_force: {len(jobs)} jobs, more than max_jobs={max_jobs}")
    by_id = {j.id: j for j in jobs}
    best: tuple[int, float] | None = None
    best_order: list[str] = []
    for perm in itertools.permutations(order_edf(jobs)):
        h, _, _, load = _sim_from(perm, by_id, need, tuple(resident), now, sizes, load_ms,
                                  capacity)
        key = (h, -round(load, 9))
        if best is None or key > best:
            best, best_order = key, list(perm)
    return best_order


# ---------------------------------------------------------------- comparison


Policy = Callable[[Instance], list[str]]

POLICIES: dict[str, Policy] = {
    "fifo": lambda inst: order_fifo(inst.jobs),
    "edf": lambda inst: order_edf(inst.jobs),
    "greedy": lambda inst: order_greedy(*inst.args()),
}


def compare_policies(instances: Sequence[Instance], *, dp_max_jobs: int = 12
                     ) -> dict[str, PolicyScore]:
    """Deadline-hit rate (and load) of fifo, edf, greedy and, where applicable, dp.

    ``dp`` is reported only when every instance is backbone-sharing with at most
    ``dp_max_jobs`` jobs, so all rows cover the same jobs.
    """
    policies: dict[str, Policy] = dict(POLICIES)
    if all(len(i.jobs) <= dp_max_jobs and is_backbone_sharing(i.jobs) for i in instances):
        policies["dp"] = lambda inst: order_backbone_dp(*inst.args(), max_jobs=dp_max_jobs)
    out: dict[str, PolicyScore] = {}
    for name, policy in policies.items():
        outcomes = [inst.simulate(policy(inst)) for inst in instances]
        hits = sum(o.hits for o in outcomes)
        n = sum(len(o.hit) for o in outcomes)
        out[name] = PolicyScore(hits / n if n else 1.0, hits, n,
                                sum(o.total_load_ms for o in outcomes),
                                tuple(o.hits for o in outcomes))
    return out


def synthetic_backbone_instance(seed: int, *, n_jobs: int = 8, backbones: int = 2,
                                heads_per_backbone: int = 3, backbone_blocks: int = 3,
                                block_mb: int = 40, head_mb: int = 10,
                                mb_per_ms: float = 4.0, exec_ms: float = 5.0,
                                slack_ms: tuple[float, float] = (40.0, 200.0)) -> Instance:
    """Tight-memory workload: capacity = one backbone + two heads, interleaved arrivals.

    Jobs arrive alternating between backbones (so FIFO reloads a backbone almost every
    job), all queued by ``now``; deadlines are ``now`` + uniform ``slack_ms``.
    """
    rng = random.Random(seed)
    mb = 1 << 20
    sizes: dict[str, int] = {}
    chains: list[tuple[str, ...]] = []
    heads: list[list[str]] = []
    for b in range(backbones):
        chain = tuple(f"bb{b}.{k}" for k in range(backbone_blocks))
        chains.append(chain)
        sizes.update({x: block_mb * mb for x in chain})
        heads.append([f"bb{b}.head{h}" for h in range(heads_per_backbone)])
        sizes.update({x: head_mb * mb for x in heads[-1]})
    load = {x: s / mb / mb_per_ms for x, s in sizes.items()}
    now = 1.0
    jobs = []
    for i in range(n_jobs):
        b = i % backbones if rng.random() < 0.8 else rng.randrange(backbones)
        h = rng.choice(heads[b])
        arrival = now - (n_jobs - i) * 1e-3
        jobs.append(Job(f"j{i}", arrival, now + rng.uniform(*slack_ms) / 1000.0,
                        chains[b] + (h,), exec_ms))
    capacity = (backbone_blocks * block_mb + 2 * head_mb) * mb
    resident = chains[0] + (heads[0][0],) if rng.random() < 0.5 else ()
    return Instance(tuple(jobs), sizes, load, capacity, resident, now)
