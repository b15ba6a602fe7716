"""The discrete-event simulator: hand-checked queueing, determinism, drift, memory, and the wiring.

Small hand-made plans check the event logic against arithmetic; the synthetic
deployment of ``test_serve`` checks that the simulator runs the same policies,
optimizer and control events as the real runtime, on the same trace.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_serve import setup, write_config  # noqa: F401  (setup is a fixture)

from loom.app.arrivals import TraceItem, make_trace
from loom.app.config import POLICIES
from loom.app.deployment import Deployment
from loom.app.serve import bench
from loom.app.sim_latency import LatencyModel, on_device, roofline_ms
from loom.app.sim_runtime import SimRuntime, Slowdown
from loom.app.simulate import simulate
from loom.core.errors import ConfigError
from loom.processors.device import load_device_profile
from loom.profiling.dataset import load_profile_dataset
from loom.serving.correction import LatencyCorrector
from loom.serving.runtime import TaskBinding
from placement.plan import Plan


def plan(task: str, proc: str, block: str, ms: float, *, accuracy: float = 0.9, memory: int = 100) -> Plan:
    return Plan(task=task, config=("v",), placement=(proc,), block_ids=(block,), latency_ms=ms, block_ms=(ms,),
                transfer_ms=(), accuracy=accuracy, memory_bytes=memory)


def binding(task: str, plans: list[Plan], latency_ms: float, priority: float = 0) -> TaskBinding:
    return TaskBinding(task=task, candidates=plans, block_paths={}, latency_ms=latency_ms, accuracy_floor=0.5,
                       priority=priority)


def items(*pairs: tuple[float, str]) -> list[TraceItem]:
    return [TraceItem(t, task, i, 0) for i, (t, task) in enumerate(pairs)]


def test_fifo_queueing_matches_arithmetic():
    lat = LatencyModel({("b", "p"): 10.0})
    sim = SimRuntime(tasks=[binding("a", [plan("a", "p", "b", 10.0)], 100.0)], processors=["p"], latency=lat,
                     policy_name="sv-lo-np", adaptive=False)
    sim.run(items((0.0, "a"), (0.001, "a"), (0.050, "a")))
    recs = sorted(sim.records, key=lambda r: r.id)
    assert [round(r.end_s * 1e3, 6) for r in recs] == [10.0, 20.0, 60.0]
    assert [round(r.latency_ms, 6) for r in recs] == [10.0, 19.0, 10.0]
    assert all(r.status == "ok" for r in recs)


def test_workers_run_earliest_deadline_first():
    lat = LatencyModel({("b", "p"): 10.0, ("c", "p"): 1.0})
    sim = SimRuntime(
        tasks=[binding("slow", [plan("slow", "p", "b", 10.0)], 100.0),
               binding("urgent", [plan("urgent", "p", "c", 1.0)], 15.0)],
        processors=["p"], latency=lat, policy_name="sv-lo-np", adaptive=False)
    # slow#0 runs 0-10; at 10 both slow#1 (deadline 101) and urgent (deadline 17) wait: urgent first
    sim.run(items((0.0, "slow"), (0.001, "slow"), (0.002, "urgent")))
    by_task = {(r.task, r.id): r for r in sim.records}
    assert round(by_task[("urgent", 2)].end_s * 1e3, 6) == 11.0
    assert round(by_task[("slow", 1)].end_s * 1e3, 6) == 21.0


def test_dispatch_and_hand_offs_occupy_the_receiving_processor():
    p = Plan(task="a", config=("v", "v"), placement=("x", "y"), block_ids=("b0", "b1"), latency_ms=6.5,
             block_ms=(2.0, 3.0), transfer_ms=(1.0,), accuracy=0.9, memory_bytes=0)
    lat = LatencyModel({("b0", "x"): 2.0, ("b1", "y"): 3.0})
    sim = SimRuntime(tasks=[binding("a", [p], 100.0)], processors=["x", "y"], latency=lat, policy_name="sv-lo-np",
                     adaptive=False)
    sim.run(items((0.0, "a")))
    (r,) = sim.records
    # 0.5 dispatch + 2 on x, then 1 hand-off + 3 on y
    assert r.latency_ms == pytest.approx(6.5)
    assert [(proc, round((e - s) * 1e3, 6)) for proc, _b, s, e in r.spans] == [("x", 2.0), ("y", 3.0)]


def test_same_seed_same_run_and_spread_changes_with_the_seed():
    lat = LatencyModel({("b", "p"): 2.0}, {("b", "p"): 0.3})
    trace = items(*[(i * 0.003, "a") for i in range(200)])

    def run(seed: int) -> list[float]:
        sim = SimRuntime(tasks=[binding("a", [plan("a", "p", "b", 2.0)], 10.0)], processors=["p"], latency=lat,
                         policy_name="sv-lo-np", adaptive=False, seed=seed)
        sim.run(trace)
        return [r.latency_ms for r in sorted(sim.records, key=lambda r: r.id)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_a_slowed_processor_loses_its_load_with_correction_and_not_without():
    plans = [plan("a", "p", "bp", 1.0), plan("a", "q", "bq", 1.5)]
    lat = LatencyModel({("bp", "p"): 1.0, ("bq", "q"): 1.5})
    trace = items(*[(i * 0.004, "a") for i in range(1500)])  # 250/s for 6 s
    slow = [Slowdown("p", 2.0, 4.0, 6.0)]

    def share_on_p(enabled: bool) -> float:
        sim = SimRuntime(tasks=[binding("a", plans, 5.0)], processors=["p", "q"], latency=lat,
                         policy_name="sparseloom", adaptive=True, slowdowns=slow,
                         correction=LatencyCorrector(enabled=enabled))
        sim.run(trace)
        window = [r for r in sim.records if 2.5 <= r.arrival_s < 4.0]
        return sum(r.placement == ("p",) for r in window) / len(window)

    # without correction the scheduler keeps predicting 1 ms on p: only the reservations
    # piling up there push work away; with it, p's blocks are priced at what they take
    without, with_ = share_on_p(False), share_on_p(True)
    print(without, with_)
    assert with_ < without - 0.2


def test_memory_budget_is_never_exceeded_and_misses_cost_loads():
    plans = [plan("a", "p", f"b{i}", 1.0, memory=100) for i in range(6)]
    lat = LatencyModel({(f"b{i}", "p"): 1.0 for i in range(6)}, load_ms={(f"b{i}", "p"): 4.0 for i in range(6)},
                       memory_bytes={(f"b{i}", "p"): 2**20 for i in range(6)})
    sim = SimRuntime(tasks=[binding("a", plans, 50.0)], processors=["p"], latency=lat, policy_name="sparseloom",
                     adaptive=True, memory_budget_mb=3)
    assert sim.resident_bytes() <= 3 * 2**20
    sim.run(items(*[(i * 0.002, "a") for i in range(300)]))
    assert sim.peak_resident_bytes <= 3 * 2**20
    assert all(n <= 3 * 2**20 for _t, n in sim.resident_series)
    assert len(sim.records) == 300


def test_simulate_runs_every_policy_on_the_real_runs_trace(setup, synth_family, synth_partition):  # noqa: F811
    root, dev_path, _est = setup
    dep = Deployment.from_config(write_config(root, dev_path, synth_family, synth_partition))
    lat = LatencyModel.from_dataset(load_profile_dataset(root / "data"))
    trace = make_trace(dep.config, {t: dep.sample_count(t) for t in dep.config.task_names})
    for name in POLICIES:
        res = simulate(dep, name, lat)
        assert res.simulated and res.requests == len(trace) == len(res.records)
        assert [r.arrival_s for r in res.records] == pytest.approx([it.t_s for it in trace])
        assert res.summary["overall"]["n"] > 0
        again = simulate(dep, name, lat)
        assert [r.latency_ms for r in again.records] == [r.latency_ms for r in res.records]
        # the mid-run SLO change (at 0.6 s, to 40 ms) reached the simulated runtime
        assert {r.latency_bound_ms for r in res.records} == {50.0, 40.0}


def test_bench_simulate_says_it_is_simulated(setup, synth_family, synth_partition, tmp_path):  # noqa: F811
    root, dev_path, _est = setup
    report = bench(write_config(root, dev_path, synth_family, synth_partition), out_dir=tmp_path, simulate=True,
                   policies=["sparseloom", "sv-lo-np"])
    assert report["simulated"] is True and "SIMULATED" in report["source"]
    assert [r["policy"] for r in report["runs"]] == ["sparseloom", "sv-lo-np"]
    assert (tmp_path / "report.json").is_file()


def test_on_device_moves_a_deployment_onto_a_datasheet(setup, synth_family, synth_partition):  # noqa: F811
    root, dev_path, _est = setup
    dep = Deployment.from_config(write_config(root, dev_path, synth_family, synth_partition))
    orin = load_device_profile("jetson-agx-orin")
    moved, lat = on_device(dep, orin)
    assert moved.device.name == "jetson-agx-orin"
    space = moved.spaces["synthetic"]
    assert set(space.processors) == set(orin.processor_names)
    assert all(math.isfinite(v) and v > 0 for v in space.block_ms.values())
    res = simulate(moved, "sparseloom", lat)
    assert res.summary["overall"]["n"] > 0 and "roofline" in res.latency_source
    # the synthetic device has no datasheet figures: nothing to simulate from
    with pytest.raises(ConfigError, match="characteristics"):
        on_device(dep, load_device_profile(dev_path))


def test_roofline_is_slower_for_more_work_and_refuses_missing_precisions():
    gpu = load_device_profile("jetson-agx-orin").processor("gpu")
    small = {"macs_total": 1e6, "prec_fp32": 1.0, "weight_bytes": 1e4, "act_total_bytes": 1e4}
    big = {**small, "macs_total": 1e9}
    assert roofline_ms(big, gpu) > roofline_ms(small, gpu) > 0
    # a DLA has no fp32 peak, but runs float blocks at fp16 (TensorRT's fp16 flag)
    dla = load_device_profile("jetson-agx-orin").processor("dla0")
    assert roofline_ms(small, dla) is not None


def test_host_overhead_is_measured_only_where_the_processor_was_idle():
    from loom.app.sim_overhead import HostOverhead
    from loom.serving.metrics import RequestRecord

    def rec(i: int, arrival: float, spans: list) -> RequestRecord:
        return RequestRecord(id=i, task="a", policy="x", arrival_s=arrival, start_s=spans[0][2], end_s=spans[-1][3],
                             latency_ms=(spans[-1][3] - arrival) * 1e3, latency_bound_ms=100.0, accuracy_floor=0.0,
                             spans=spans)

    lat = LatencyModel({("b", "p"): 1.0, ("c", "q"): 2.0})
    records = [
        # idle p: waited 0.5 ms to start; hand-off to idle q took 0.2 ms; blocks at 1x and 1.5x
        rec(0, 0.0, [("p", "b", 0.0005, 0.0015), ("q", "c", 0.0017, 0.0047)]),
        # arrived while request 0's block ran on p: its wait is queueing, not overhead
        rec(1, 0.001, [("p", "b", 0.0016, 0.0026)]),
    ]
    o = HostOverhead.from_records(records, lat)
    assert list(np.round(o.start_delay_ms, 6)) == [0.5]
    assert list(np.round(o.hand_off_ms, 6)) == [0.2]  # (the simulator uses measured hand-offs from 30 on)
    assert sorted(np.round(o.block_ratio, 6)) == [1.0, 1.0, 1.5]
    # the simulator then draws them in place of the modelled dispatch: 0.5 + 1 ms here
    sim = SimRuntime(tasks=[binding("a", [plan("a", "p", "b", 1.0)], 100.0)], processors=["p"], latency=lat,
                     policy_name="sv-lo-np", adaptive=False,
                     overhead=HostOverhead(np.array([0.5]), np.array([0.2]), np.array([1.0])))
    sim.run(items((0.0, "a")))
    assert sim.records[0].latency_ms == pytest.approx(1.5)
