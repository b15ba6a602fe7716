"""placement.policies: each baseline's candidates obey its rule; the registry."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest

from estimators.plans import Link, LinkModel
from loom.core.errors import ConfigError
from placement.pareto import brute_force_pareto
from placement.plan import Plan, TaskSpace
from placement.policies import POLICY_NAMES, get_policy
from placement.policies.base import Policy

ACC = {
    ("dense", "dense"): 0.90, ("pruned", "pruned"): 0.86, ("int8", "int8"): 0.80,
    ("dense", "pruned"): 0.88, ("pruned", "dense"): 0.87, ("dense", "int8"): 0.84,
    ("int8", "dense"): 0.83, ("pruned", "int8"): 0.82, ("int8", "pruned"): 0.81,
}


def hand_space() -> TaskSpace:
    """Three variants, two slots, cpu + gpu; hand-off cpu<->gpu 0.5 ms + 1 MB at 1 GB/s = 1.5 ms.

    whole-model latencies (cpu / gpu): dense 15 / 16, pruned 12 / 14, int8 6 / - (the gpu
    refuses int8's first block). Partitioned: dense gpu->cpu 4 + 1.5 + 5 = 10.5 (its best),
    pruned cpu,cpu 12, int8 cpu,cpu 6.
    """
    ms = {
        ("dense", 0): {"cpu": 10.0, "gpu": 4.0}, ("dense", 1): {"cpu": 5.0, "gpu": 12.0},
        ("pruned", 0): {"cpu": 6.0, "gpu": 5.0}, ("pruned", 1): {"cpu": 6.0, "gpu": 9.0},
        ("int8", 0): {"cpu": 3.0}, ("int8", 1): {"cpu": 3.0, "gpu": 3.0},
    }
    blocks = {key: f"{key[0]}/{key[1]}" for key in ms}
    block_ms = {(blocks[key], p): t for key, per in ms.items() for p, t in per.items()}
    memory = {b: {"dense": 40, "pruned": 20, "int8": 10}[b.split("/")[0]] * 1_000_000 for b in blocks.values()}
    link_model = LinkModel(links={("cpu", "gpu"): Link(latency_ms=0.5, bandwidth_gbps=1.0)})
    return TaskSpace(task="img", variants=["dense", "pruned", "int8"], k=2, processors=["cpu", "gpu"],
                     blocks=blocks, block_ms=block_ms, out_bytes={b: 1e6 for b in blocks.values()},
                     memory_bytes=memory, accuracy=ACC, link_model=link_model,
                     variant_accuracy={"dense": 0.90, "pruned": 0.86, "int8": 0.80})


def summary(plans: list[Plan]) -> list[tuple[tuple[str, ...], tuple[str, ...], float]]:
    return [(p.config, p.placement, round(p.latency_ms, 6)) for p in plans]


def same_points(a: list[Plan], b: list[Plan]) -> bool:
    def key(plans: list[Plan]) -> list[tuple[float, float, int]]:
        return sorted((round(p.latency_ms, 9), p.accuracy, p.memory_bytes) for p in plans)

    return key(a) == key(b)


def test_registry_lists_every_policy_and_flags() -> None:
    assert POLICY_NAMES == ("sv-ao-np", "sv-ao-p", "sv-lo-np", "sv-lo-p", "av-np", "av-p", "sparseloom")
    flags = {n: (p.adaptive, p.stitched, p.partitioned) for n in POLICY_NAMES for p in [get_policy(n)]}
    assert flags == {
        "sv-ao-np": (False, False, False), "sv-ao-p": (False, False, True),
        "sv-lo-np": (False, False, False), "sv-lo-p": (False, False, True),
        "av-np": (True, False, False), "av-p": (True, False, True), "sparseloom": (True, True, True),
    }
    for n in POLICY_NAMES:
        assert isinstance(get_policy(n), Policy) and get_policy(n).name == n
    assert get_policy("sparseloom").preload and not get_policy("av-p").preload
    assert get_policy("SV_AO_NP").name == "sv-ao-np"


def test_unknown_policy_lists_known_names() -> None:
    with pytest.raises(ConfigError) as err:
        get_policy("round-robin")
    for n in POLICY_NAMES:
        assert n in str(err.value)
    assert isinstance(err.value, ValueError)


def test_policy_modules_load_lazily() -> None:
    code = ("import sys, placement.policies as p; assert 'placement.policies.av_p' not in sys.modules; "
            "p.get_policy('av-p'); assert 'placement.policies.av_p' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parent.parent))


def test_sv_ao() -> None:
    space = hand_space()
    np_plans = get_policy("sv-ao-np").candidates(space, latency_ms=100.0, accuracy_floor=0.85)
    # the most accurate variant whole on each processor, fastest first
    assert summary(np_plans) == [(("dense",) * 2, ("cpu", "cpu"), 15.0), (("dense",) * 2, ("gpu", "gpu"), 16.0)]
    p_plans = get_policy("sv-ao-p").candidates(space, latency_ms=100.0, accuracy_floor=0.85)
    assert summary(p_plans) == [(("dense",) * 2, ("gpu", "cpu"), 10.5)]
    assert p_plans[0].accuracy == 0.90
    # the floor does not move an accuracy-optimal policy
    assert summary(get_policy("sv-ao-np").candidates(space, accuracy_floor=0.5)) == summary(np_plans)


def test_sv_lo() -> None:
    space = hand_space()
    # int8 (6 ms) misses 0.85; pruned whole on the cpu (12) beats dense (15)
    got = get_policy("sv-lo-np").candidates(space, latency_ms=100.0, accuracy_floor=0.85)
    assert summary(got) == [(("pruned",) * 2, ("cpu", "cpu"), 12.0), (("pruned",) * 2, ("gpu", "gpu"), 14.0)]
    # partitioned, dense (10.5) beats pruned (12): SV-LO-P judges speed with partitioning allowed
    got = get_policy("sv-lo-p").candidates(space, latency_ms=100.0, accuracy_floor=0.85)
    assert summary(got) == [(("dense",) * 2, ("gpu", "cpu"), 10.5)]
    # a lower floor lets int8 in; the gpu cannot run it whole, so only the cpu is listed
    got = get_policy("sv-lo-np").candidates(space, latency_ms=100.0, accuracy_floor=0.7)
    assert summary(got) == [(("int8",) * 2, ("cpu", "cpu"), 6.0)]


def test_av_np_and_av_p_follow_brute_force() -> None:
    space = hand_space()
    uniform = [(v, v) for v in space.variants]
    got = get_policy("av-np", spread=False).candidates(space, latency_ms=100.0, accuracy_floor=0.85)
    assert summary(got) == [(("pruned",) * 2, ("cpu", "cpu"), 12.0), (("dense",) * 2, ("cpu", "cpu"), 15.0)]
    assert same_points(got, brute_force_pareto(space, accuracy_floor=0.85, latency_bound_ms=100.0,
                                               configs=uniform, one_processor=True))
    got = get_policy("av-p", spread=False).candidates(space, latency_ms=100.0, accuracy_floor=0.85)
    assert all(p.is_uniform and p.accuracy >= 0.85 for p in got)
    assert same_points(got, brute_force_pareto(space, accuracy_floor=0.85, latency_bound_ms=100.0, configs=uniform))
    assert summary(got)[0] == (("dense",) * 2, ("gpu", "cpu"), 10.5)
    # the bound drops what cannot meet it on its own
    got = get_policy("av-p", spread=False).candidates(space, latency_ms=11.0, accuracy_floor=0.85)
    assert summary(got) == [(("dense",) * 2, ("gpu", "cpu"), 10.5)]
    got = get_policy("av-p", spread=False).candidates(space, latency_ms=100.0, accuracy_floor=0.0)
    assert summary(got)[0] == (("int8",) * 2, ("cpu", "cpu"), 6.0)


def test_sparseloom_is_the_stitched_front() -> None:
    space = hand_space()
    for floor, bound in [(0.0, math.inf), (0.85, 100.0), (0.83, 9.0)]:
        got = get_policy("sparseloom", spread=False).candidates(space, latency_ms=bound, accuracy_floor=floor)
        assert got and same_points(got, brute_force_pareto(space, accuracy_floor=floor, latency_bound_ms=bound))
        assert [p.latency_ms for p in got] == sorted(p.latency_ms for p in got)
    got = get_policy("sparseloom").candidates(space, latency_ms=100.0, accuracy_floor=0.83)
    assert any(not p.is_uniform for p in got)  # stitched configs do appear
    assert len(get_policy("sparseloom", max_plans=2, spread=False).candidates(space, accuracy_floor=0.0)) == 2


@pytest.mark.parametrize("name", ["av-np", "av-p", "sparseloom"])
def test_adaptive_policies_also_offer_front_configs_on_other_processors(name: str) -> None:
    space = hand_space()
    front = get_policy(name, spread=False).candidates(space, latency_ms=100.0, accuracy_floor=0.83)
    got = get_policy(name).candidates(space, latency_ms=100.0, accuracy_floor=0.83)
    assert got[: len(front)] == front
    extra = got[len(front):]
    assert extra, "some front config can also run whole on another processor"
    assert {p.config for p in extra} <= {p.config for p in front}
    assert all(p.on_one_processor and p.latency_ms <= 100.0 for p in extra)
    assert len({(p.config, p.placement) for p in got}) == len(got)
    for p in extra:
        assert all(space.can_run(b, p.placement[0]) for b in p.block_ids)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_fallbacks_when_nothing_meets_the_slo(name: str) -> None:
    space = hand_space()
    policy = get_policy(name)
    # no plan reaches 0.95: the most accurate plan the policy allows (dense everywhere here)
    got = policy.candidates(space, latency_ms=100.0, accuracy_floor=0.95)
    assert got and got[0].config == ("dense", "dense")
    if policy.adaptive:
        assert len(got) == 1
        # the floor can be met but no plan is that fast: the fastest plan meeting the floor
        got = policy.candidates(space, latency_ms=1.0, accuracy_floor=0.85)
        allowed = [p for p in brute_force_pareto(space, accuracy_floor=0.85, one_processor=not policy.partitioned,
                                                 configs=None if policy.stitched else [(v, v) for v in space.variants])]
        assert len(got) == 1 and got[0].latency_ms == pytest.approx(min(p.latency_ms for p in allowed))


def test_every_candidate_is_runnable() -> None:
    space = hand_space()
    for name, floor in itertools.product(POLICY_NAMES, (0.0, 0.85)):
        for p in get_policy(name).candidates(space, latency_ms=100.0, accuracy_floor=floor):
            assert all(space.can_run(b, proc) for b, proc in zip(p.block_ids, p.placement, strict=True))
            if not get_policy(name).partitioned:
                assert p.on_one_processor
            if not get_policy(name).stitched:
                assert p.is_uniform
