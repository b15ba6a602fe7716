"""Sharing-aware ordering: simulator bookkeeping, DP == brute force, greedy vs baselines."""

from __future__ import annotations

import random

import pytest

from loom.core.errors import ConfigError
from placement.ordering import (
    Instance,
    Job,
    brute_force,
    compare_policies,
    is_backbone_sharing,
    order_backbone_dp,
    order_edf,
    order_fifo,
    order_greedy,
    simulate,
    synthetic_backbone_instance,
)


def backbone_instance(seed: int, n: int | None = None) -> Instance:
    """Random prefix-forest instance: backbones (some branching) + task heads."""
    rng = random.Random(seed)
    sizes: dict[str, int] = {}
    paths: list[tuple[str, ...]] = []
    for b in range(rng.randint(1, 3)):
        trunk = tuple(f"b{b}.{k}" for k in range(rng.randint(1, 3)))
        branches = [trunk]
        if rng.random() < 0.4:  # a shared sub-backbone: the tree case
            branches.append(trunk + (f"b{b}.x",))
        for i, br in enumerate(branches):
            for h in range(rng.randint(1, 3)):
                paths.append(br + (f"b{b}.{i}.h{h}",))
    for p in paths:
        for x in p:
            sizes.setdefault(x, rng.randint(1, 10) if ".h" not in x else rng.randint(1, 3))
    return _finish(rng, sizes, paths, n)


def general_instance(seed: int, n: int | None = None) -> Instance:
    """Random block sets in random orders: no prefix structure."""
    rng = random.Random(seed)
    pool = [f"k{i}" for i in range(rng.randint(3, 8))]
    sizes = {x: rng.randint(1, 8) for x in pool}
    paths = [tuple(rng.sample(pool, rng.randint(1, min(4, len(pool))))) for _ in range(6)]
    return _finish(rng, sizes, paths, n)


def _finish(rng: random.Random, sizes: dict[str, int], paths: list[tuple[str, ...]],
            n: int | None) -> Instance:
    n = n if n is not None else rng.randint(2, 7)
    load = {x: 2.0 * s for x, s in sizes.items()}  # ms, proportional to bytes
    biggest = max(sum(sizes[x] for x in set(p)) for p in paths)
    capacity = rng.randint(biggest, max(biggest, int(1.3 * biggest) + 2))
    now = 1.0
    jobs = []
    for i in range(n):
        p = rng.choice(paths)
        arrival = now - rng.random() * 0.01 if rng.random() < 0.8 else now + rng.random() * 0.05
        jobs.append(Job(f"j{i}", arrival, arrival + rng.uniform(0.005, 0.12), p,
                        rng.uniform(1.0, 8.0)))
    resident: tuple[str, ...] = ()
    p0 = rng.choice(paths)
    if rng.random() < 0.5:
        resident = tuple(dict.fromkeys(p0))
    return Instance(tuple(jobs), sizes, load, capacity, resident, now)


# ---------------------------------------------------------------- simulate


def test_simulate_times_loads_and_lru_eviction() -> None:
    sizes = {"a": 4, "b": 4, "c": 4}
    load = {"a": 10.0, "b": 10.0, "c": 10.0}
    jobs = [Job("1", 0.0, 0.015, ("a",), 5.0), Job("2", 0.0, 0.030, ("b",), 5.0),
            Job("3", 0.0, 0.040, ("c",), 5.0), Job("4", 0.0, 1.0, ("b",), 5.0)]
    out = simulate(["1", "2", "3", "4"], jobs, sizes, load, capacity=8, resident=(), now=0.0)
    assert out.finish_s == pytest.approx({"1": 0.015, "2": 0.030, "3": 0.045, "4": 0.050})
    assert out.hit == {"1": True, "2": True, "3": False, "4": True}
    assert out.hits == 3 and out.hit_rate == 0.75
    # loading c evicts a (least recently used), so b is still there for job 4
    assert out.evictions == (("3", "a"),)
    assert out.total_load_ms == pytest.approx(30.0)
    assert out.resident == ("c", "b")
    assert out.peak_bytes == 8


def test_simulate_waits_for_arrival_and_reuses_initial_resident() -> None:
    sizes = {"a": 1}
    jobs = [Job("x", 2.0, 2.1, ("a",), 10.0)]
    out = simulate(["x"], jobs, sizes, {"a": 50.0}, capacity=1, resident=("a",), now=1.0)
    assert out.start_s["x"] == 2.0 and out.finish_s["x"] == pytest.approx(2.01)
    assert out.total_load_ms == 0.0 and out.loads == ()


def test_simulate_never_evicts_running_jobs_blocks_or_exceeds_capacity() -> None:
    for seed in range(60):
        inst = general_instance(seed, n=7) if seed % 2 else backbone_instance(seed, n=7)
        order = order_fifo(inst.jobs)
        out = inst.simulate(order)
        by_id = {j.id: j for j in inst.jobs}
        for jid, block in out.evictions:
            assert block not in by_id[jid].blocks
        assert out.peak_bytes <= inst.capacity
        assert sum(inst.sizes[b] for b in out.resident) <= inst.capacity
        # every job's blocks were loaded or already there: replay the cache by hand
        cache = set(inst.resident)
        loads = list(out.loads)
        evictions = list(out.evictions)
        for jid in order:
            cache -= {b for j, b in evictions if j == jid}
            cache |= {b for j, b in loads if j == jid}
            assert set(by_id[jid].blocks) <= cache
            assert sum(inst.sizes[b] for b in cache) <= inst.capacity


def test_simulate_rejects_bad_input_with_config_error() -> None:
    sizes = {"a": 5, "b": 6}
    load = {"a": 1.0, "b": 1.0}
    big = [Job("big", 0.0, 1.0, ("a", "b"), 1.0)]
    with pytest.raises(ConfigError, match="can never run"):
        simulate(["big"], big, sizes, load, capacity=10)
    with pytest.raises(ConfigError, match="can never run"):
        order_greedy(big, sizes, load, 10)
    ok = [Job("1", 0.0, 1.0, ("a",), 1.0)]
    with pytest.raises(ConfigError, match="permutation"):
        simulate(["1", "1"], ok, sizes, load, capacity=10)
    with pytest.raises(ConfigError, match="no size"):
        simulate(["z"], [Job("z", 0.0, 1.0, ("q",), 1.0)], sizes, load, capacity=10)
    with pytest.raises(ConfigError, match="resident"):
        simulate(["1"], ok, sizes, load, capacity=10, resident=("a", "b"))
    with pytest.raises(ValueError):  # ConfigError is also a ValueError
        simulate(["1"], ok, sizes, load, capacity=0)


# ---------------------------------------------------------------- structure + DP


def test_backbone_structure_detection() -> None:
    jobs = [Job("1", 0, 1, ("bb.0", "bb.1", "h1"), 1), Job("2", 0, 1, ("bb.0", "bb.1", "h2"), 1),
            Job("3", 0, 1, ("bb.0", "x", "h3"), 1), Job("4", 0, 1, ("cc.0", "h4"), 1)]
    assert is_backbone_sharing(jobs)
    # the same block reached by two different prefixes: not a prefix forest
    assert not is_backbone_sharing(jobs + [Job("5", 0, 1, ("cc.0", "bb.1"), 1)])
    bad = jobs + [Job("5", 0, 1, ("h1",), 1)]
    with pytest.raises(ConfigError, match="prefix forest"):
        order_backbone_dp(bad, dict.fromkeys(["bb.0", "bb.1", "h1", "h2", "x", "h3", "cc.0", "h4"], 1),
                          dict.fromkeys(["bb.0", "bb.1", "h1", "h2", "x", "h3", "cc.0", "h4"], 1.0), 10)


@pytest.mark.parametrize("seed", range(50))
def test_dp_equals_brute_force_on_backbone_instances(seed: int) -> None:
    inst = backbone_instance(seed)
    assert is_backbone_sharing(inst.jobs)
    dp = inst.simulate(order_backbone_dp(*inst.args()))
    bf = inst.simulate(brute_force(*inst.args()))
    assert dp.hits == bf.hits
    assert dp.total_load_ms == pytest.approx(bf.total_load_ms)
    # and the optimum is at least as good as every heuristic
    for order in (order_fifo(inst.jobs), order_edf(inst.jobs), order_greedy(*inst.args())):
        h = inst.simulate(order)
        assert (h.hits, -round(h.total_load_ms, 6)) <= (dp.hits, -round(dp.total_load_ms, 6))


def test_dp_is_exact_without_the_structure_too() -> None:
    # the DP never assumes the structure for correctness; only its size depends on it
    for seed in range(15):
        inst = general_instance(seed, n=6)
        dp = inst.simulate(order_backbone_dp(*inst.args(), require_backbone=False))
        bf = inst.simulate(brute_force(*inst.args()))
        assert (dp.hits, dp.total_load_ms) == (bf.hits, pytest.approx(bf.total_load_ms))


def test_dp_limits_and_empty_queue() -> None:
    inst = synthetic_backbone_instance(0, n_jobs=6)
    with pytest.raises(ConfigError, match="max_jobs"):
        order_backbone_dp(*inst.args(), max_jobs=5)
    with pytest.raises(ConfigError, match="max_jobs"):
        brute_force(*inst.args(), max_jobs=5)
    assert order_backbone_dp((), {}, {}, 1) == []
    assert order_greedy((), {}, {}, 1) == []


# ---------------------------------------------------------------- greedy


def test_greedy_is_a_permutation_and_never_below_edf() -> None:
    # the guard makes this a guarantee, not a tendency
    for seed in range(80):
        inst = general_instance(seed, n=8) if seed % 2 else backbone_instance(seed, n=8)
        order = order_greedy(*inst.args())
        assert sorted(order) == sorted(j.id for j in inst.jobs)
        assert inst.simulate(order).hits >= inst.simulate(order_edf(inst.jobs)).hits


def test_greedy_beats_fifo_on_average_and_is_near_optimal() -> None:
    greedy = fifo = opt = 0
    load_g = load_f = 0.0
    n = 0
    for seed in range(60):
        inst = general_instance(seed, n=6) if seed % 2 else backbone_instance(seed, n=6)
        g = inst.simulate(order_greedy(*inst.args()))
        f = inst.simulate(order_fifo(inst.jobs))
        o = inst.simulate(brute_force(*inst.args()))
        greedy, fifo, opt = greedy + g.hits, fifo + f.hits, opt + o.hits
        load_g, load_f = load_g + g.total_load_ms, load_f + f.total_load_ms
        n += len(inst.jobs)
    assert greedy >= fifo
    assert load_g <= load_f
    assert (opt - greedy) / n <= 0.05  # within 5 points of hit rate of the optimum


# ---------------------------------------------------------------- comparison


def test_compare_policies_on_tight_memory_two_backbone_workload() -> None:
    instances = [synthetic_backbone_instance(seed) for seed in range(12)]
    for inst in instances:  # capacity = one backbone + two heads
        assert inst.capacity == (3 * 40 + 2 * 10) << 20
    scores = compare_policies(instances)
    assert set(scores) == {"fifo", "edf", "greedy", "dp"}
    assert scores["greedy"].hit_rate > scores["fifo"].hit_rate
    assert scores["dp"].hit_rate > scores["fifo"].hit_rate
    assert scores["dp"].hit_rate >= max(s.hit_rate for s in scores.values())
    assert scores["greedy"].total_load_ms < scores["fifo"].total_load_ms
    assert all(s.jobs == 8 * len(instances) for s in scores.values())


def test_compare_policies_skips_dp_where_not_applicable() -> None:
    scores = compare_policies([general_instance(s, n=5) for s in range(6)
                               if not is_backbone_sharing(general_instance(s, n=5).jobs)])
    assert "dp" not in scores and {"fifo", "edf", "greedy"} <= set(scores)
