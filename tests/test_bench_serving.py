"""bench_serving: the capacity search, the extra cells' configs, the summaries over repeats, and a
--quick run on the embedded zoo (its JSON's shape only: the figures depend on the machine)."""

from __future__ import annotations

import json

import pytest
from test_bench_zoo import SERVE, script

from loom.app.arrivals import mean_rate_rps
from loom.app.capacity import search_capacity
from loom.app.config import load_slo_config
from loom.app.scenario import with_bursts, with_slo_tightened


def up_to(capacity: float):
    """A probe that passes at rates up to ``capacity`` and fails above it."""
    return lambda rate: 0.0 if rate <= capacity else 0.5


@pytest.mark.parametrize("capacity", [30.0, 100.0, 250.0, 1000.0])
def test_capacity_search_brackets_then_bisects(capacity):
    best, steps = search_capacity(up_to(capacity), start_rps=100.0, growth=1.5, bisections=3)
    rates = [s["rate_rps"] for s in steps]
    assert best <= capacity and rates[0] == 100.0
    passed = [r for r in rates if r <= capacity]
    failed = [r for r in rates if r > capacity]
    assert best == max(passed) and min(failed) - best <= 0.5 * best / 8 + 1e-9  # 3 bisections of a x1.5 bracket
    assert len(steps) <= 12


def test_capacity_search_limits():
    best, steps = search_capacity(up_to(10.0), start_rps=100.0, max_probes=3)
    assert best == 0.0 and len(steps) == 3
    # the best static plan's search: x1.25 up, no bisection, a failing first probe ends it
    best, steps = search_capacity(up_to(120.0), start_rps=50.0, growth=1.25, bisections=0, down=False)
    assert best == 50 * 1.25**3 and len(steps) == 5
    assert search_capacity(up_to(10.0), start_rps=50.0, down=False)[0] == 0.0


def test_bursty_and_slo_change_configs():
    cfg = load_slo_config(SERVE)
    bursty = with_bursts(cfg, factor=4.0, burst_s=0.5, calm_s=2.0)
    for before, after in zip(cfg.tasks, bursty.tasks, strict=True):
        assert after.arrival.process == "bursty" and after.arrival.periods == "fixed"
        assert after.arrival.burst_rate_rps == pytest.approx(4 * after.arrival.rate_rps)
        assert mean_rate_rps(after.arrival) == pytest.approx(mean_rate_rps(before.arrival))
    tightened = with_slo_tightened(cfg, at_s=4.0, scale=0.6)
    for t in tightened.tasks:
        assert t.slo_at(3.9)[0] == cfg.task(t.name).latency_ms
        assert t.slo_at(4.0)[0] == pytest.approx(0.6 * cfg.task(t.name).latency_ms)
        assert t.slo_at(4.0)[1] == t.accuracy_floor and len(t.slo_changes) == 1


def test_summaries_and_ratios_are_on_medians():
    report = script("serving_report")
    runs = [{"cell": "1.0/loose", "policy": p, "repeat": r, "slo_violation_rate": v, "goodput_rps": g,
             "throughput_rps": g, "p99_ms": None}
            for p, vs, gs in (("sparseloom", [0.1, 0.3, 0.2], [90, 70, 80]), ("av-p", [0.4, 0.4, 0.6], [60, 40, 50]))
            for r, (v, g) in enumerate(zip(vs, gs, strict=True))]
    cells = report.summarize_cells(runs)
    sl = cells["1.0/loose"]["sparseloom"]
    assert sl["slo_violation_rate"] == {"median": 0.2, "min": 0.1, "max": 0.3} and sl["repeats"] == 3
    assert sl["p99_ms"] == {"median": None, "min": None, "max": None}
    ratios = report.ratios_of(cells, {"1.0/loose": 100.0}, {"1.0/loose": 160.0})["1.0/loose"]
    assert ratios["violation_reduction_vs"]["av-p"] == pytest.approx(0.5)
    assert ratios["goodput_ratio_vs"]["av-p"] == pytest.approx(1.6)
    assert ratios["goodput_share_of_bound"] == pytest.approx(0.8)
    assert ratios["goodput_share_of_measured_bound"] == {"sparseloom": 0.5, "av-p": 50 / 160}


def test_quick_flag_sets_defaults_that_flags_override():
    mod = script("bench_serving")
    args = mod.parse_args(["--quick"])
    assert (args.repeats, args.loads, args.duration, args.no_drift, args.capacity_probes) == (1, [1.0], 1.0, True, 3)
    assert mod.parse_args(["--quick", "--repeats", "2"]).repeats == 2
    args = mod.parse_args([])
    assert (args.repeats, args.loads, args.no_drift) == (3, [0.5, 1.0, 1.5, 3.0], False)
    assert [c.name for c in mod.cells_of(args)][-2:] == ["bursty", "slo-change"]
    assert len(mod.cells_of(mod.parse_args(["--no-extra-cells"]))) == 8


@pytest.mark.slow
def test_quick_run_on_the_embedded_zoo(tmp_path):
    out = tmp_path / "serving.json"
    policies = ["sparseloom", "ort-plain"]  # a policy of the runtime and a peer
    assert script("bench_serving").main(["--quick", "--zoo", "embedded", "--config", SERVE, "--out", str(out),
                                         "--policies", *policies]) == 0
    result = json.loads(out.read_text())
    cells = ["1.0/loose", "1.0/tight", "bursty", "slo-change"]
    assert result["repeats"] == 1 and list(result["cells"]) == cells
    assert {(r["cell"], r["policy"], r["repeat"]) for r in result["runs"]} == {(c, p, 0) for c in cells for p in policies}
    for cell in result["cells"].values():
        assert set(cell) == set(policies)
        for s in cell.values():
            for metric in ("slo_violation_rate", "goodput_rps"):
                assert set(s[metric]) == {"median", "min", "max"}
                assert s[metric]["min"] <= s[metric]["median"] <= s[metric]["max"]
    assert set(result["capacity_rps"]) == set(policies) and all(v >= 0 for v in result["capacity_rps"].values())
    assert all(len(steps) <= 3 for steps in result["settings"]["policy_capacity_search"].values())
    assert set(result["measured_bound_rps"]) == set(cells) and set(result["ratios"]) == set(cells)
    assert set(result["overhead_us_by_policy"]) == {"sparseloom", "sv-lo-np"}
    assert result["overhead_us"]["decision"] > 0 and result["overhead_us"]["completion"] > 0
    assert "drift" not in result and (tmp_path / "serving_violations.png").is_file()
