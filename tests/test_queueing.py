"""The latency-aware mix: queueing delay, not only load balance, decides where work goes."""

from __future__ import annotations

import pytest

from placement.plan import Plan
from placement.queueing import latency_aware_mix


def plan(task: str, proc: str, ms: float, config: str = "v") -> Plan:
    return Plan(task=task, config=(config,), placement=(proc,), block_ids=(f"{task}.{config}",), latency_ms=ms,
                block_ms=(ms,), transfer_ms=(), accuracy=0.9, memory_bytes=0)


def test_long_jobs_are_kept_away_from_tight_short_ones() -> None:
    # "big" is a little faster on a, but there it would block "small" (tight bound) on a
    cands = {"big": [plan("big", "a", 5.0), plan("big", "b", 6.0)],
             "small": [plan("small", "a", 0.5), plan("small", "b", 1.5)]}
    mix = latency_aware_mix(cands, {"big": 60.0, "small": 400.0}, {"big": 20.0, "small": 2.0})
    assert mix["small"] == {(("v",), ("a",)): pytest.approx(1.0)}
    assert mix["big"].get((("v",), ("b",)), 0.0) > 0.5


def test_light_load_goes_to_the_fastest_plan() -> None:
    cands = {"t": [plan("t", "a", 1.0), plan("t", "b", 3.0)]}
    mix = latency_aware_mix(cands, {"t": 10.0}, {"t": 10.0})
    assert mix == {"t": {(("v",), ("a",)): pytest.approx(1.0)}}


def test_heavy_load_spills_and_never_plans_past_saturation() -> None:
    cands = {"t": [plan("t", "a", 1.0), plan("t", "b", 1.0)]}
    mix = latency_aware_mix(cands, {"t": 1500.0}, {"t": 50.0})  # 1.5 processors of work
    shares = mix["t"]
    assert shares[(("v",), ("a",))] == pytest.approx(0.5, abs=0.1)
    assert sum(shares.values()) == pytest.approx(1.0)


def test_plans_over_the_bound_are_used_only_when_nothing_else_exists() -> None:
    cands = {"t": [plan("t", "a", 5.0), plan("t", "b", 30.0)]}
    assert set(latency_aware_mix(cands, {"t": 10.0}, {"t": 10.0})["t"]) == {(("v",), ("a",))}
    only_slow = {"t": [plan("t", "b", 30.0)]}
    assert set(latency_aware_mix(only_slow, {"t": 10.0}, {"t": 10.0})["t"]) == {(("v",), ("b",))}
    assert latency_aware_mix({}, {}, {}) == {}


def test_an_overload_is_spread_not_piled_onto_the_fastest_plan() -> None:
    # 2.4 processors of work on two: no mix is within the cap; the overload is shared
    cands = {"t": [plan("t", "a", 1.0), plan("t", "b", 1.2)],
             "u": [plan("u", "a", 1.0, "w"), plan("u", "b", 1.2, "w")]}
    mix = latency_aware_mix(cands, {"t": 1200.0, "u": 1000.0}, {"t": 10.0, "u": 10.0})
    load = {"a": 0.0, "b": 0.0}
    for task, rate in (("t", 1200.0), ("u", 1000.0)):
        for (_config, placement), share in mix[task].items():
            load[placement[0]] += rate * share * (1.0 if placement == ("a",) else 1.2) / 1e3
    assert max(load.values()) < 1.35  # the old fastest-plan fallback left 1.45 on a, 0.95 on b
    assert min(load.values()) > 0.9
