"""scripts/bench_memory.py: its pure helpers on small hand-made inputs (no serving runs)."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_memory.py"


@pytest.fixture(scope="module")
def bm():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(block, proc, mem, load=1.0, lat=0.5, status="ok"):
    return {"block_id": block, "processor": proc, "status": status, "memory_bytes": mem, "load_ms": load,
            "latency_ms_median": lat}


def test_measured_table_takes_medians_of_ok_rows(bm):
    rows = [_row("a", "p", 100), _row("a", "p", 300), _row("a", "p", 200), _row("a", "p", 9999, status="error"),
            _row("b", "p", None, load=None), _row("b", "q", 50)]
    t = bm.measured_table(rows)
    assert t[("a", "p")] == {"memory_bytes": 200, "load_ms": 1.0, "latency_ms": 0.5}
    assert t[("b", "p")] == {"latency_ms": 0.5}  # empty columns left out
    assert t[("b", "q")]["memory_bytes"] == 50
    assert ("c", "p") not in t


def test_candidate_keys_and_all_resident(bm):
    plans = {"t1": [SimpleNamespace(block_ids=("a", "b"), placement=("p", "q")),
                    SimpleNamespace(block_ids=("a", "c"), placement=("p", "p"))],
             "t2": [SimpleNamespace(block_ids=("a",), placement=("q",))]}
    keys = bm.candidate_keys(plans)
    assert keys == {("a", "p"), ("b", "q"), ("c", "p"), ("a", "q")}
    measured = {("a", "p"): {"memory_bytes": 1000}, ("b", "q"): {"memory_bytes": 0}, ("a", "q"): {"memory_bytes": 2000}}
    files = {"a": 10, "b": 20, "c": 30}
    info = bm.all_resident(keys, measured, files.__getitem__)
    # a@p and a@q measured; b@q measured 0 and c@p unmeasured: their files' sizes
    assert info["bytes"] == 1000 + 2000 + 20 + 30
    assert info["pairs"] == 4 and info["measured_pairs"] == 2
    assert sorted(info["file_size_pairs"]) == [["b", "q"], ["c", "p"]]
    assert info["mb_by_processor"]["p"] == pytest.approx(1030 / 2**20)
    assert info["mb"] == pytest.approx(info["bytes"] / 2**20)


def test_memory_saved_at_equal_violation(bm):
    rates = {0.1: 0.50, 0.25: 0.20, 0.4: 0.11, 0.7: 0.10, 1.0: 0.09}
    e = bm.memory_saved_at_equal_violation(rates, 0.09, tolerance=0.027)
    assert e["frac"] == 0.4 and e["first_frac"] == 0.4
    assert e["saved"] == pytest.approx(0.6)
    # a lucky low share below a failing one: "frac" stays where every larger share is within
    bumpy = {0.1: 0.09, 0.25: 0.30, 0.4: 0.10, 1.0: 0.09}
    e = bm.memory_saved_at_equal_violation(bumpy, 0.09, tolerance=0.027)
    assert e["first_frac"] == 0.1 and e["frac"] == 0.4
    # exactly at the tolerance counts as within
    assert bm.memory_saved_at_equal_violation({0.5: 0.127}, 0.1, tolerance=0.027)["frac"] == 0.5


def test_memory_saved_none_when_nothing_qualifies(bm):
    e = bm.memory_saved_at_equal_violation({0.1: 0.5, 1.0: 0.4}, 0.1)
    assert e["frac"] is None and e["saved"] is None and e["first_frac"] is None
    assert bm.memory_saved_at_equal_violation({0.1: 0.1}, None)["frac"] is None
    assert bm.memory_saved_at_equal_violation({0.1: None}, 0.1)["frac"] is None


def test_uniform_pairs_cover_the_present_variants(bm):
    pairs = bm.uniform_pairs(["dense", "int8", "unstructured-50", "fp16"], 3)
    have = ["dense", "int8", "fp16"]  # structured-50 is missing, unstructured-50 not wanted
    assert len(pairs) == len(have) * (len(have) - 1)
    assert set(pairs) == {((a,) * 3, (b,) * 3) for a, b in itertools.permutations(have, 2)}


def test_stitched_pairs_differ_in_one_or_two_slots(bm):
    variants = ["dense", "int8", "fp16", "structured-50"]
    pairs = bm.stitched_pairs(variants, 3, 6, seed=1)
    assert pairs == bm.stitched_pairs(variants, 3, 6, seed=1)  # seeded
    assert len(pairs) == len(set(pairs)) == 6
    for a, b in pairs:
        assert len(a) == len(b) == 3 and set(a) | set(b) <= set(variants)
        assert 1 <= sum(x != y for x, y in zip(a, b, strict=True)) <= 2
    assert bm.stitched_pairs(["dense"], 3, 4, seed=0) == []
    one = bm.stitched_pairs(variants, 3, 5, seed=2, max_diff=1)
    assert all(sum(x != y for x, y in zip(a, b, strict=True)) == 1 for a, b in one)


def test_shares_between_tasks(bm):
    assert bm.shares_between_tasks({"t1": ["a", "b"], "t2": ["c"]}) == {}
    assert bm.shares_between_tasks({"t1": ["a", "b"], "t2": ["b", "c"], "t3": ["b"]}) == {"b": ["t1", "t2", "t3"]}


def test_summarize_switches(bm):
    rows = [
        {"speedup": 2.0, "differential_s": 1.0, "monolithic_s": 2.0, "differential_load_s": 0.5,
         "monolithic_load_s": 2.0, "bytes_differential": 10, "bytes_monolithic": 40},
        {"speedup": 8.0, "differential_s": 0.5, "monolithic_s": 4.0, "differential_load_s": 0.5,
         "monolithic_load_s": 1.0, "bytes_differential": 10, "bytes_monolithic": 60},
        {"speedup": None, "differential_s": 0.0, "monolithic_s": 0.0, "differential_load_s": 0.0,
         "monolithic_load_s": 0.0, "bytes_differential": 0, "bytes_monolithic": 0},
    ]
    s = bm.summarize_switches(rows)
    assert s["pairs"] == 3
    assert s["speedup"]["mean"] == pytest.approx(5.0)
    assert s["speedup"]["geomean"] == pytest.approx(4.0)
    assert s["load_only_speedup"]["mean"] == pytest.approx(3.0)
    assert s["bytes_share"] == pytest.approx(0.2)
    assert s["seconds_ratio"] == pytest.approx(6.0 / 1.5)
    empty = bm.summarize_switches([])
    assert empty["speedup"]["mean"] is None and empty["bytes_share"] is None


def _toy_zoo():
    tasks = {t: {v: [f"{t}.{v}.{s}" for s in range(3)] for v in ("dense", "int8", "fp16")} for t in ("x", "y")}
    blocks = [b for vs in tasks.values() for ids in vs.values() for b in ids]
    sizes = {b: 1000 * (1 + i % 3) for i, b in enumerate(blocks)}
    load = {b: 5.0 + i % 4 for i, b in enumerate(blocks)}
    exec_ms = {b: 0.5 for b in blocks}
    return tasks, sizes, load, exec_ms


def test_zoo_ordering_instance_is_tight_and_valid(bm):
    from placement.ordering import compare_policies

    tasks, sizes, load, exec_ms = _toy_zoo()
    inst = bm.zoo_ordering_instance(3, tasks, sizes, load, exec_ms, n_jobs=8)
    again = bm.zoo_ordering_instance(3, tasks, sizes, load, exec_ms, n_jobs=8)
    assert inst == again  # seeded
    assert len(inst.jobs) == 8
    job_bytes = [sum(sizes[b] for b in set(j.blocks)) for j in inst.jobs]
    assert max(job_bytes) <= inst.capacity < sum(sizes[b] for b in inst.sizes)  # tight: not everything fits
    for j in inst.jobs:
        assert j.deadline_s > inst.now and j.arrival_s <= inst.now
        assert j.exec_ms == pytest.approx(0.5 * len(set(j.blocks)))
        owner = j.blocks[0].split(".")[0]
        assert all(b.startswith(owner + ".") for b in j.blocks)  # one task's config
    scores = compare_policies([bm.zoo_ordering_instance(s, tasks, sizes, load, exec_ms) for s in range(4)])
    assert {"fifo", "edf", "greedy"} <= set(scores)
    assert scores["greedy"].hits >= scores["edf"].hits  # the greedy's guarantee


def test_aims_and_lookup(bm):
    rows = [
        {"policy": "sparseloom", "budget_frac": None, "slo_violation_rate": 0.10},
        {"policy": "av-p", "budget_frac": None, "slo_violation_rate": 0.20},
        {"policy": "sparseloom", "budget_frac": 0.4, "slo_violation_rate": 0.12},
        {"policy": "sparseloom", "budget_frac": 0.15, "slo_violation_rate": 0.25},
    ]
    assert bm.lookup(rows, "sparseloom", 0.4)["slo_violation_rate"] == 0.12
    assert bm.lookup(rows, "av-p", 0.4) is None
    a = bm.aims(rows, {"mean_speedup_vs_monolithic": 9.0})
    first = a["sparseloom_40pct_within_2.7_points_of_all_preloaded"]
    assert first["met"] is True and first["points"] == pytest.approx(2.0)
    assert a["sparseloom_15pct_better_than_av_p_all_preloaded"]["met"] is False
    assert a["switching_8x_faster_on_average"]["met"] is True
    none = bm.aims([], None)
    assert all(v["met"] is None for v in none.values())


def test_cross_task_switches_measure_both_ways_warm_and_cold(bm, synth_partition):
    """Two 'tasks' holding the very same blocks (as the edge zoo's fashion tasks hold the
    backbone): every uniform variant both share, both ways, warm and cold, real loads."""
    import sys

    from backends import get_backend

    sys.path.insert(0, str(SCRIPT.parent))  # bench_sharing and switching sit beside the script
    dep = SimpleNamespace(partitions={"a": synth_partition, "b": synth_partition})
    cross = {bid: ["a", "b"] for bid in synth_partition.blocks}
    out = bm.cross_task_switches(dep, get_backend("onnxruntime"), cross, repeats=1)
    shared = [v for v in bm.UNIFORM_VARIANTS if v in synth_partition.variants]
    assert len(out["pairs"]) == 2 * 2 * len(shared)  # both ways, warm and cold
    assert {tuple(r["from"][:1] + r["to"][:1]) for r in out["pairs"]} == {("a", "b"), ("b", "a")}
    # the second task lacks no block: the differential switch loads nothing and no ratio is made up
    assert all(r["differential_s"] < r["monolithic_s"] or r["monolithic_s"] == 0 for r in out["pairs"])
    assert all(r["speedup"] is None for r in out["pairs"] if not r["differential_s"])
    assert out["warm"] is None or out["warm"] > 0
