"""The optimizer: Pareto sets against brute force, the joint assignment, the fluid bound."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from estimators.plans import Link, LinkModel
from loom.core.errors import ConfigError
from placement.assignment import assign, fluid_goodput_bound
from placement.pareto import brute_force_pareto, fastest_plans, pareto_plans
from placement.plan import Plan, TaskSpace
from placement.synthetic import random_space, time_planning
from placement.tables import plan_accuracies

PROCS = ["cpu", "npu"]


def small_space(seed: int, *, additive: bool = False, repeat_block: bool = False,
                missing_link: bool = False) -> TaskSpace:
    """2-3 variants, 2-3 slots, 2-3 processors, hand-offs, one unsupported pair, one shared block."""
    rng = np.random.default_rng(seed)
    V, K = int(rng.integers(2, 4)), int(rng.integers(2, 4))
    procs = PROCS + (["gpu"] if missing_link else [])
    variants = [f"v{i}" for i in range(V)]
    blocks = {(v, s): f"{v}/{s}" for v in variants for s in range(K)}
    blocks[("v1", 0)] = "v0/0"  # v0 and v1 share their first block (deduplicated by content)
    if repeat_block:
        blocks[("v0", 1)] = "v0/0"  # one block fills two slots of v0: memory depends on the placement
    ids = sorted(set(blocks.values()))
    block_ms = {(b, p): float(rng.uniform(1, 10)) for b in ids for p in procs}
    # one block the npu cannot run (an op it refuses)
    del block_ms[(blocks[(variants[-1], K - 1)], "npu")]
    out_bytes = {b: float(rng.uniform(1e5, 5e6)) for b in ids}
    memory = {b: int(rng.integers(1, 20)) * 1000 for b in ids}
    links = {("cpu", "npu"): Link(latency_ms=float(rng.uniform(0.1, 1.0)), bandwidth_gbps=float(rng.uniform(1, 5)))}
    if missing_link:
        links[("cpu", "gpu")] = Link(latency_ms=0.2, bandwidth_gbps=10.0)  # no npu <-> gpu link at all
    link_model = LinkModel(links=links, dispatch_ms={"cpu": 0.05, "npu": float(rng.uniform(0.1, 2.0))})
    drop = {(v, s): float(rng.uniform(0, 0.05)) for v in variants for s in range(K)}
    configs = list(itertools.product(variants, repeat=K))
    if additive:
        accuracy = {c: 0.9 - sum(drop[(v, s)] for s, v in enumerate(c)) for c in configs}
    else:
        accuracy = {c: float(rng.uniform(0.7, 0.95)) for c in configs}
    return TaskSpace(task=f"t{seed}", variants=variants, k=K, processors=procs, blocks=blocks, block_ms=block_ms,
                     out_bytes=out_bytes, memory_bytes=memory, accuracy=accuracy, link_model=link_model)


def points(plans: list[Plan]) -> list[tuple[float, float, int]]:
    return sorted((p.latency_ms, p.accuracy, p.memory_bytes) for p in plans)


def assert_same_front(got: list[Plan], want: list[Plan]) -> None:
    a, b = points(got), points(want)
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b, strict=True):
        assert x[0] == pytest.approx(y[0], rel=1e-9, abs=1e-9)
        assert x[1] == pytest.approx(y[1], abs=1e-12)
        assert x[2] == y[2]


def assert_valid(space: TaskSpace, plans: list[Plan]) -> None:
    for p in plans:
        assert all(space.can_run(b, proc) for b, proc in zip(p.block_ids, p.placement, strict=True))
        again = space.make_plan(p.config, p.placement)
        assert again.latency_ms == pytest.approx(p.latency_ms)
        assert again.memory_bytes == p.memory_bytes
    assert [p.latency_ms for p in plans] == sorted(p.latency_ms for p in plans)


# -- pareto_plans -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(30))
def test_pareto_equals_brute_force(seed: int) -> None:
    space = small_space(seed)
    got = pareto_plans(space)
    assert_same_front(got, brute_force_pareto(space))
    assert_valid(space, got)
    floor, bound = 0.8, float(np.median([p.latency_ms for p in got]))
    assert_same_front(pareto_plans(space, accuracy_floor=floor, latency_bound_ms=bound),
                      brute_force_pareto(space, accuracy_floor=floor, latency_bound_ms=bound))


@pytest.mark.parametrize("seed", range(10))
def test_pareto_restrictions_equal_brute_force(seed: int) -> None:
    space = small_space(seed)
    uniform = [(v,) * space.k for v in space.variants]
    for one in (False, True):
        assert_same_front(pareto_plans(space, configs=uniform, one_processor=one),
                          brute_force_pareto(space, configs=uniform, one_processor=one))
        got = pareto_plans(space, one_processor=one)
        assert_same_front(got, brute_force_pareto(space, one_processor=one))
        if one:
            assert all(p.on_one_processor for p in got)


@pytest.mark.parametrize("seed", range(8))
def test_repeated_block_memory_depends_on_placement(seed: int) -> None:
    space = small_space(seed, repeat_block=True)
    assert_same_front(pareto_plans(space), brute_force_pareto(space))


@pytest.mark.parametrize("seed", range(8))
def test_missing_link_is_never_crossed(seed: int) -> None:
    space = small_space(seed, missing_link=True)
    got = pareto_plans(space)
    assert_same_front(got, brute_force_pareto(space))
    for p in got:
        assert not any({a, b} == {"npu", "gpu"} for a, b in itertools.pairwise(p.placement))


@pytest.mark.parametrize("seed", range(20))
def test_fastest_front_plan_is_globally_fastest(seed: int) -> None:
    space = small_space(seed)
    everything = [space.make_plan(c, pl) for c in itertools.product(space.variants, repeat=space.k)
                  for pl in itertools.product(space.processors, repeat=space.k)
                  if all(space.can_run(space.block(v, s), p) for s, (v, p) in enumerate(zip(c, pl, strict=True)))]
    assert pareto_plans(space)[0].latency_ms == pytest.approx(min(p.latency_ms for p in everything))
    # the label DP (forced by a tiny config limit) finds it too, whatever the accuracy function
    assert pareto_plans(space, config_limit=1)[0].latency_ms == pytest.approx(min(p.latency_ms for p in everything))


@pytest.mark.parametrize("seed", range(20))
def test_label_dp_exact_when_accuracy_is_additive(seed: int) -> None:
    space = small_space(seed, additive=True)
    got = pareto_plans(space, config_limit=1)
    assert_same_front(got, brute_force_pareto(space))
    assert_valid(space, got)


@pytest.mark.parametrize("seed", range(6))
def test_label_dp_gives_valid_nondominated_plans(seed: int) -> None:
    space = small_space(seed)
    got = pareto_plans(space, config_limit=1, accuracy_floor=0.75)
    assert_valid(space, got)
    assert all(p.accuracy >= 0.75 for p in got)
    for a, b in itertools.permutations(got, 2):
        assert not (a.latency_ms <= b.latency_ms and a.accuracy >= b.accuracy and a.memory_bytes <= b.memory_bytes)


def test_large_space_uses_label_dp_and_keeps_additive_front() -> None:
    # 8**5 configs: above CONFIG_LIMIT, so the label DP runs; exact here since accuracy is additive
    space = random_space("big", n_variants=8, k=5, processors=("a", "b"), seed=3, additive_accuracy=True)
    got = pareto_plans(space, accuracy_floor=0.85)
    assert got and all(p.accuracy >= 0.85 - 1e-12 for p in got)
    assert_valid(space, got)
    ref = pareto_plans(space, accuracy_floor=0.85, config_limit=10**6)  # enumerates all configs
    assert_same_front(got, ref)


def test_unsupported_pairs_never_used() -> None:
    space = random_space("u", n_variants=6, k=3, seed=5, unsupported=0.4)
    assert_valid(space, pareto_plans(space))


def test_max_plans_keeps_extremes() -> None:
    space = random_space("m", n_variants=8, k=3, seed=2)
    full = pareto_plans(space)
    assert len(full) > 6
    thin = pareto_plans(space, max_plans=6)
    assert len(thin) == 6
    assert thin[0].latency_ms == full[0].latency_ms
    assert max(p.accuracy for p in thin) == max(p.accuracy for p in full)
    assert min(p.memory_bytes for p in thin) == min(p.memory_bytes for p in full)
    with pytest.raises(ConfigError):
        pareto_plans(space, max_plans=0)


def test_accuracy_of_uniform_configs_prefers_measured() -> None:
    space = small_space(1)
    space.variant_accuracy = {"v0": 0.5}
    k = space.k
    got = plan_accuracies(space, [("v0",) * k, ("v1",) * k])
    assert got == [0.5, pytest.approx(space.accuracy[("v1",) * k])]
    space.accuracy = {}
    with pytest.raises(ConfigError, match="no accuracy"):
        plan_accuracies(space, [("v1",) * k])


def test_bad_configs_raise_config_error() -> None:
    space = small_space(0)
    with pytest.raises(ConfigError, match="unknown variant"):
        pareto_plans(space, configs=[("nope",) * space.k])
    with pytest.raises(ConfigError, match="slots"):
        fastest_plans(space, [("v0",)])


def test_fastest_plans_none_where_unrunnable() -> None:
    space = small_space(4)
    only_npu = TaskSpace(**{**space.__dict__, "processors": ["npu"]})
    last = space.variants[-1]
    got = fastest_plans(only_npu, [(last,) * space.k, ("v0",) * space.k])
    assert got[0] is None and got[1] is not None


# -- assign --------------------------------------------------------------------------------------------
def one_slot_space(task: str, ms: dict[str, float], *, variants: dict[str, tuple[dict[str, float], float]] | None = None) -> TaskSpace:
    """One slot, one (or a few) variants; ``variants[name] = (ms per processor, accuracy)``."""
    variants = variants or {"dense": (ms, 0.9)}
    blocks = {(v, 0): f"{task}/{v}" for v in variants}
    block_ms = {(f"{task}/{v}", p): t for v, (m, _) in variants.items() for p, t in m.items()}
    procs = sorted({p for m, _ in variants.values() for p in m})
    return TaskSpace(task=task, variants=list(variants), k=1, processors=procs, blocks=blocks, block_ms=block_ms,
                     out_bytes={}, memory_bytes={}, accuracy={(v,): a for v, (_, a) in variants.items()})


def test_assign_balances_an_overloaded_processor() -> None:
    spaces = {t: one_slot_space(t, {"gpu": 10.0, "cpu": 20.0}) for t in ("a", "b")}
    slos = {"a": (100.0, 0.5), "b": (100.0, 0.5)}
    rates = {"a": 60.0, "b": 60.0}
    # all on the gpu (each task's fastest) would be 2 * 60 * 10 / 1000 = 1.2
    result = assign(spaces, slos, rates)
    assert result.max_utilization == pytest.approx(0.8, abs=1e-6)
    assert result.utilization["gpu"] == pytest.approx(0.8, abs=1e-6)
    assert result.utilization["cpu"] == pytest.approx(0.8, abs=1e-6)
    for task in spaces:
        assert sum(result.shares(task)) == pytest.approx(1.0)
    gpu_share = sum(s for t in spaces for p, s in result.mixes[t] if p.placement == ("gpu",))
    assert gpu_share == pytest.approx(4 / 3, abs=1e-6)
    assert result.unmet == ()
    assert assign(spaces, slos, rates) == result  # deterministic


def test_assign_respects_bounds_and_floors() -> None:
    spaces = {t: one_slot_space(t, {}, variants={"dense": ({"gpu": 10.0, "cpu": 20.0}, 0.9),
                                               "int8": ({"gpu": 2.0, "cpu": 4.0}, 0.7)}) for t in ("a", "b")}
    rates = {"a": 60.0, "b": 60.0}
    # bound 15 ms: only dense on the gpu qualifies: overloaded (1.2) but within SLO per plan
    result = assign(spaces, {"a": (15.0, 0.8), "b": (15.0, 0.8)}, rates)
    for t in spaces:
        assert [(p.config, p.placement) for p in result.plans(t)] == [(("dense",), ("gpu",))]
    assert result.max_utilization == pytest.approx(1.2)
    # floor 0.6: int8 qualifies and is lighter everywhere
    result = assign(spaces, {"a": (15.0, 0.6), "b": (15.0, 0.6)}, rates)
    assert all(p.config == ("int8",) for t in spaces for p in result.plans(t))
    assert result.max_utilization < 0.3
    # nothing meets floor 0.95: fallback is the most accurate plan, and the task is reported
    result = assign(spaces, {"a": (15.0, 0.95), "b": (15.0, 0.6)}, rates)
    assert result.unmet == ("a",)
    assert [p.config for p in result.plans("a")] == [("dense",)]


def test_assign_light_load_prefers_fast_plans() -> None:
    spaces = {t: one_slot_space(t, {"gpu": 10.0, "cpu": 20.0}) for t in ("a", "b")}
    result = assign(spaces, {"a": (100.0, 0.5), "b": (100.0, 0.5)}, {"a": 1.0, "b": 0.0})
    # stage 1 alone could put a on the cpu; stage 2 keeps the max utilization and picks speed
    assert result.plans("a")[0].placement == ("gpu",)
    assert result.plans("b")[0].placement == ("gpu",)


def test_assign_with_given_candidates() -> None:
    space = small_space(3)
    cands = pareto_plans(space)
    result = assign({"t": space}, {"t": (math.inf, 0.0)}, {"t": 10.0}, candidates={"t": cands})
    assert all(p in cands for p in result.plans("t"))


def test_assign_errors() -> None:
    spaces = {"a": one_slot_space("a", {"gpu": 1.0})}
    with pytest.raises(ConfigError, match="no SLO"):
        assign(spaces, {}, {"a": 1.0})
    with pytest.raises(ConfigError, match="no arrival rate"):
        assign(spaces, {"a": (1.0, 0.0)}, {})
    with pytest.raises(ConfigError, match="rate"):
        assign(spaces, {"a": (1.0, 0.0)}, {"a": -1.0})


def _all_feasible(space: TaskSpace, bound: float, floor: float) -> list[Plan]:
    accs = dict(zip(itertools.product(space.variants, repeat=space.k),
                    plan_accuracies(space, list(itertools.product(space.variants, repeat=space.k))), strict=True))
    out = []
    for c in accs:
        for pl in itertools.product(space.processors, repeat=space.k):
            if accs[c] >= floor and all(space.can_run(space.block(v, s), p) for s, (v, p) in enumerate(zip(c, pl, strict=True))):
                plan = space.make_plan(c, pl, accuracy=accs[c])
                if plan.latency_ms <= bound:
                    out.append(plan)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_assign_matches_the_full_lp(seed: int) -> None:
    from scipy.optimize import linprog

    spaces = {f"t{i}": small_space(seed * 3 + i) for i in range(3)}
    for name, sp in spaces.items():
        sp.task = name
    slos = {name: (float(np.percentile([p.latency_ms for p in pareto_plans(sp)], 70)), 0.75)
            for name, sp in spaces.items()}
    rates = {"t0": 30.0, "t1": 50.0, "t2": 20.0}
    result = assign(spaces, slos, rates)
    for t, mix in result.mixes.items():
        assert all(p.latency_ms <= slos[t][0] + 1e-9 and p.accuracy >= slos[t][1] for p, _ in mix)
    # the LP over every feasible plan, written out in full
    cols = [(t, p) for t in sorted(spaces) for p in _all_feasible(spaces[t], *slos[t])]
    procs = ["cpu", "npu"]
    A_ub = np.array([[rates[t] * p.processor_ms().get(q, 0.0) / 1000 for t, p in cols] + [-1.0] for q in procs])
    A_eq = np.array([[1.0 if t == task else 0.0 for t, _ in cols] + [0.0] for task in sorted(spaces)])
    c = np.zeros(len(cols) + 1)
    c[-1] = 1
    ref = linprog(c, A_ub=A_ub, b_ub=np.zeros(2), A_eq=A_eq, b_eq=np.ones(3), bounds=(0, None), method="highs")
    assert result.max_utilization == pytest.approx(ref.fun, rel=1e-6, abs=1e-9)


# -- fluid bound ---------------------------------------------------------------------------------------
def test_fluid_bound_hand_computed() -> None:
    a = one_slot_space("a", {"gpu": 10.0, "cpu": 20.0})
    # gpu serves 100/s, cpu 50/s
    assert fluid_goodput_bound({"a": a}, {"a": (100.0, 0.5)}, rate_mix={"a": 1.0}) == pytest.approx(150.0)
    # a 15 ms bound rules out the cpu
    assert fluid_goodput_bound({"a": a}, {"a": (15.0, 0.5)}, rate_mix={"a": 1.0}) == pytest.approx(100.0)
    # b runs only on the cpu (20 ms). At a 1:1 mix, a all on the gpu: L/2 * 10 ms <= 1 s -> L <= 200;
    # b on the cpu: L/2 * 20 ms <= 1 s -> L <= 100 (a cannot help the cpu): L = 100
    b = one_slot_space("b", {"cpu": 20.0})
    spaces, slos = {"a": a, "b": b}, {"a": (100.0, 0.5), "b": (100.0, 0.5)}
    assert fluid_goodput_bound(spaces, slos, rate_mix={"a": 1.0, "b": 1.0}) == pytest.approx(100.0)
    # 3:1 mix: a at 3L/4 (share x on the gpu), b at L/4 on the cpu. Both saturated at the optimum:
    # gpu 0.75 L x * 0.01 = 1 -> L x = 400/3; cpu 0.25 L * 0.02 + 0.75 L (1 - x) * 0.02 = 0.02 L - 2 = 1 -> L = 150
    assert fluid_goodput_bound(spaces, slos, rate_mix={"a": 3.0, "b": 1.0}) == pytest.approx(150.0)
    # b cannot meet a 10 ms bound: it is shed; a alone at half the mix: L/2 served by 150/s -> L = 300, goodput 150
    slos["b"] = (10.0, 0.5)
    assert fluid_goodput_bound(spaces, slos, rate_mix={"a": 1.0, "b": 1.0}) == pytest.approx(150.0)
    with pytest.raises(ConfigError):
        fluid_goodput_bound(spaces, slos, rate_mix={"zzz": 1.0})


# -- speed ---------------------------------------------------------------------------------------------
def test_planning_4x10x3x3_is_fast(capsys: pytest.CaptureFixture[str]) -> None:
    time_planning()  # warm up imports (scipy) so the figure is the planning itself
    t0 = time.perf_counter()
    figures = time_planning(n_tasks=4, n_variants=10, k=3, n_processors=3)
    wall = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nplanning 4 tasks x 10 variants x 3 slots x 3 processors: {wall:.3f} s "
              f"(pareto {figures['pareto_s']:.3f} s, assign {figures['assign_s']:.3f} s, {figures['plans']:.0f} plans)")
    assert figures["plans"] > 0
    assert 0 < figures["max_utilization"] < math.inf
    assert wall < 20.0  # generous: a timing check belongs in a benchmark, not here
