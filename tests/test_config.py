"""SLO config (schema, paths, errors, SLO changes) and the arrival processes and trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from loom.app.arrivals import TraceItem, arrival_times, make_trace, mean_rate_rps
from loom.app.config import (
    POLICIES,
    BurstyArrival,
    PeriodicArrival,
    PoissonArrival,
    SloConfig,
    TraceArrival,
    load_slo_config,
    parse_slo_config,
)
from loom.core.errors import ConfigError, LoomError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "configs" / "serve.yaml"


def task(name: str = "image-cls", **changes) -> dict:
    data = {
        "name": name,
        "family": "zoo/image-cls",
        "latency_ms": 4.0,
        "accuracy_floor": 0.97,
        "arrival": {"process": "poisson", "rate_rps": 40},
    }
    data.update(changes)
    return data


def config(**changes) -> dict:
    data = {"tasks": [task(), task("seq-cls", family="zoo/seq-cls")]}
    data.update(changes)
    return data


def problems(data: dict, tmp_path: Path | None = None) -> str:
    """The message of the ConfigError that loading ``data`` (from a file) raises."""
    if tmp_path is None:
        with pytest.raises(ConfigError) as info:
            parse_slo_config(data, source="test.yaml")
        return str(info.value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_slo_config(path)
    assert str(path) in str(info.value)
    return str(info.value)


# -- the example and the defaults -----------------------------------------------------------------
def test_example_config_loads():
    cfg = load_slo_config(EXAMPLE)
    assert cfg.task_names == ["image-cls", "signal-cls", "seq-cls"]
    assert cfg.device == "host" and cfg.policy == "sparseloom"
    assert cfg.run.duration_s == 20
    assert cfg.source == str(EXAMPLE)
    for t in cfg.tasks:
        assert t.family.is_absolute() and (t.family / "family.yaml").is_file()
        assert isinstance(t.arrival, PoissonArrival)
    assert any(t.slo_changes for t in cfg.tasks)
    assert cfg.partitions == ROOT / "out" / "partitions"


def test_defaults():
    cfg = parse_slo_config({"tasks": [task()]}, source="inline")
    assert cfg.device == "host" and cfg.policy == "sparseloom" and cfg.k == 3
    assert cfg.memory_budget_mb is None and cfg.estimators is None and cfg.on_unservable == "violate"
    assert cfg.correction.enabled and cfg.correction.decay == 0.9
    assert cfg.run.seed == 0 and cfg.run.warmup_s == 1.0
    assert cfg.tasks[0].priority == 0 and cfg.tasks[0].slo_changes == []
    assert cfg.partitions.is_absolute()
    assert isinstance(cfg, SloConfig)


def test_policy_case_insensitive_and_all_known():
    for pol in POLICIES:
        assert parse_slo_config(config(policy=pol.upper()), source="x").policy == pol


def test_relative_paths_resolve_against_yaml_folder_first(tmp_path):
    fam = tmp_path / "fams" / "mine"
    fam.mkdir(parents=True)
    (fam / "family.yaml").write_text("task: mine\n")
    (tmp_path / "arrivals.txt").write_text("# times\n0.5\n0.1  # a comment\n\n2.0\n")
    data = {"tasks": [task(family="fams/mine", arrival={"process": "trace", "file": "arrivals.txt"})]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_slo_config(path)
    assert cfg.tasks[0].family == fam.resolve()
    spec = cfg.tasks[0].arrival
    assert isinstance(spec, TraceArrival) and spec.file == (tmp_path / "arrivals.txt").resolve()
    # the repository root is the fallback
    data["tasks"].append(task("b", family="zoo/seq-cls"))
    path.write_text(yaml.safe_dump(data))
    assert load_slo_config(path).tasks[1].family == ROOT / "zoo" / "seq-cls"


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"k": "three"}, "k: Input should be a valid integer"),
        ({"k": 0}, "k: Input should be greater than or equal to 1"),
        ({"memory_budget_mb": -5}, "memory_budget_mb: Input should be greater than 0"),
        ({"on_unservable": "drop"}, "on_unservable: must be one of 'violate' or 'reject'"),
        ({"correction": {"decay": 1.0}}, "correction.decay: Input should be less than 1"),
        ({"run": {"duration_s": 10, "warmup_s": 10}}, "run: warmup_s (10.0) must be shorter"),
        ({"run": {"seed": -1}}, "run.seed: Input should be greater than or equal to 0"),
        ({"schema_version": 2}, "schema_version: must be one of 1"),
        ({"tasks": []}, "tasks: List should have at least 1 item"),
        ({"tasks": "image-cls"}, "tasks: Input should be a valid list"),
        ({"devise": "host"}, "devise: unknown field"),
        ({"device": "jetson-nano"}, "device: no device profile named 'jetson-nano'"),
        ({"device": "profiles/nope.yaml"}, "device: no device profile 'profiles/nope.yaml'"),
        ({"estimators": "no/such/folder"}, "estimators: no estimators folder 'no/such/folder'"),
    ],
)
def test_top_level_errors_name_the_field(change, expected):
    assert expected in problems(config(**change))


def test_unknown_policy_lists_allowed():
    msg = problems(config(policy="greedy"))
    assert "policy: unknown policy 'greedy'" in msg
    for pol in POLICIES:
        assert pol in msg


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"latency_ms": "fast"}, "tasks[1].latency_ms: Input should be a valid number"),
        ({"latency_ms": 0}, "tasks[1].latency_ms: Input should be greater than 0"),
        ({"accuracy_floor": 1.2}, "tasks[1].accuracy_floor: Input should be less than or equal to 1"),
        ({"priority": -1}, "tasks[1].priority: Input should be greater than or equal to 0"),
        ({"name": "bad name!"}, "tasks[1].name: String should match pattern"),
        ({"family": "zoo/no-such-task"}, "tasks[1].family: no family folder 'zoo/no-such-task'"),
        ({"family": "profiles"}, "tasks[1].family: " + str(ROOT / "profiles") + ": no family.yaml"),
        ({"arrival": {"process": "poisson", "rate_rps": -3}}, "tasks[1].arrival.rate_rps: Input should be greater than 0"),
        ({"arrival": {"process": "poisson"}}, "tasks[1].arrival.rate_rps: Field required"),
        ({"arrival": {"process": "poisson", "rate_rps": 3, "burst_s": 1}}, "tasks[1].arrival.burst_s: unknown field"),
        ({"arrival": {"process": "gaussian"}}, "tasks[1].arrival.process: unknown process 'gaussian'"),
        ({"arrival": {"rate_rps": 3}}, "tasks[1].arrival.process: missing"),
        ({"arrival": {"process": "periodic", "period_ms": 5, "jitter_ms": -1}}, "tasks[1].arrival.jitter_ms: Input should be greater than or equal to 0"),
        ({"arrival": {"process": "bursty", "rate_rps": 1, "burst_rate_rps": 5, "burst_s": 0, "calm_s": 1}}, "tasks[1].arrival.burst_s: Input should be greater than 0"),
        ({"arrival": {"process": "trace", "file": "nope.txt"}}, "tasks[1].arrival.file: no trace file 'nope.txt'"),
        ({"slo_changes": [{"at_s": -1, "latency_ms": 2}]}, "tasks[1].slo_changes[0].at_s: Input should be greater than or equal to 0"),
        ({"slo_changes": [{"at_s": 1}]}, "tasks[1].slo_changes[0]: a change sets latency_ms, accuracy_floor or both"),
        ({"latency": 3}, "tasks[1].latency: unknown field"),
    ],
)
def test_task_errors_name_the_field(changes, expected):
    data = config()
    data["tasks"][1].update(changes)
    assert expected in problems(data)


def test_malformed_trace_file_is_a_field_error(tmp_path):
    (tmp_path / "t.txt").write_text("0.1\nsoon\n")
    data = {"tasks": [task(arrival={"process": "trace", "file": "t.txt"})]}
    msg = problems(data, tmp_path)
    assert "tasks[0].arrival.file:" in msg and "line 2" in msg and "'soon'" in msg


def test_every_problem_at_once(tmp_path):
    data = config(policy="nope", k=-1, extra_key=1)
    data["tasks"][0]["arrival"] = {"process": "poisson", "rate_rps": 0}
    data["tasks"][1]["family"] = "zoo/missing"
    data["tasks"].append(task())  # a second 'image-cls'
    msg = problems(data, tmp_path)
    for expected in [
        "policy: unknown policy",
        "k: Input should be greater than or equal to 1",
        "extra_key: unknown field",
        "tasks[0].arrival.rate_rps: Input should be greater than 0",
        "tasks[1].family: no family folder 'zoo/missing'",
        "tasks[2].name: 'image-cls' is used by tasks[0]",
    ]:
        assert expected in msg, msg
    assert "6 problem(s)" in msg


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_slo_config(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_slo_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("tasks: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_slo_config(tmp_path / "broken.yaml")
    assert issubclass(ConfigError, LoomError) and issubclass(ConfigError, ValueError)


# -- SLO changes --------------------------------------------------------------------------------
def test_slo_at_applies_changes_in_time_order():
    changes = [
        {"at_s": 20, "accuracy_floor": 0.9},
        {"at_s": 5, "latency_ms": 3.0},  # out of order in the file: sorted on load
        {"at_s": 10, "latency_ms": 2.0, "accuracy_floor": 0.95},
    ]
    cfg = parse_slo_config(config(tasks=[task(slo_changes=changes)]), source="x")
    assert [c.at_s for c in cfg.tasks[0].slo_changes] == [5, 10, 20]
    assert cfg.slo_at("image-cls", 0.0) == (4.0, 0.97)
    assert cfg.slo_at("image-cls", 4.999) == (4.0, 0.97)
    assert cfg.slo_at("image-cls", 5.0) == (3.0, 0.97)  # a change holds from its at_s on
    assert cfg.slo_at("image-cls", 12.0) == (2.0, 0.95)
    assert cfg.slo_at("image-cls", 100.0) == (2.0, 0.9)  # the latency of the earlier change stays
    with pytest.raises(ConfigError, match="no task 'nope'"):
        cfg.slo_at("nope", 1.0)


# -- arrivals ---------------------------------------------------------------------------------
POISSON = PoissonArrival(process="poisson", rate_rps=200)
BURSTY = BurstyArrival(process="bursty", rate_rps=50, burst_rate_rps=650, burst_s=0.5, calm_s=2.0)
PERIODIC = PeriodicArrival(process="periodic", period_ms=10, jitter_ms=2)


@pytest.mark.parametrize("spec", [POISSON, BURSTY, PERIODIC], ids=["poisson", "bursty", "periodic"])
def test_arrivals_deterministic_sorted_in_range(spec):
    a = arrival_times(spec, 50.0, seed=7)
    assert np.array_equal(a, arrival_times(spec, 50.0, seed=7))
    assert not np.array_equal(a, arrival_times(spec, 50.0, seed=8))
    assert a.dtype == np.float64 and np.all(np.diff(a) >= 0)
    assert a.min() >= 0.0 and a.max() < 50.0


@pytest.mark.parametrize(
    ("spec", "rate"),
    [(POISSON, 200.0), (BURSTY, (50 * 2.0 + 650 * 0.5) / 2.5), (PERIODIC, 100.0)],
    ids=["poisson", "bursty", "periodic"],
)
def test_arrival_rates(spec, rate):
    assert mean_rate_rps(spec) == pytest.approx(rate)
    duration = 2000.0
    n = np.mean([arrival_times(spec, duration, seed=s).size for s in range(3)])
    # Poisson: sd of the count is ~0.2%; bursty periods add ~2%: 8% is very loose.
    assert n / duration == pytest.approx(rate, rel=0.08)


def test_bursty_fixed_periods_follow_the_schedule():
    spec = BurstyArrival(process="bursty", rate_rps=10, burst_rate_rps=1000, burst_s=1.0, calm_s=1.0, periods="fixed")
    a = arrival_times(spec, 100.0, seed=0)
    in_burst = (np.floor(a) % 2) == 1  # calm [0,1), burst [1,2), ...
    assert in_burst.mean() > 0.95


def test_bursty_more_variable_than_poisson():
    duration, window = 1000.0, 0.25
    edges = np.arange(0.0, duration + window, window)

    def dispersion(spec) -> float:
        counts, _ = np.histogram(arrival_times(spec, duration, seed=3), bins=edges)
        return float(counts.var() / counts.mean())  # 1 for Poisson

    same_mean = PoissonArrival(process="poisson", rate_rps=BURSTY.mean_rate_rps)
    assert dispersion(same_mean) == pytest.approx(1.0, abs=0.2)
    assert dispersion(BURSTY) > 5 * dispersion(same_mean)


def test_periodic_spacing():
    exact = arrival_times(PeriodicArrival(process="periodic", period_ms=20), 10.0, seed=1)
    assert np.allclose(np.diff(exact), 0.02)
    assert 0.0 <= exact[0] < 0.02 and exact.size in (499, 500)
    jittered = arrival_times(PERIODIC, 10.0, seed=1)
    gaps = np.diff(jittered)
    assert gaps.min() >= 0.010 - 0.004 - 1e-12 and gaps.max() <= 0.010 + 0.004 + 1e-12


def test_trace_process_reads_times(tmp_path):
    (tmp_path / "t.txt").write_text("3.5\n0.25\n# comment\n1.0\n12.0\n")
    cfg = parse_slo_config(
        {"tasks": [task(arrival={"process": "trace", "file": "t.txt"})]}, source="x", base_dir=tmp_path
    )
    spec = cfg.tasks[0].arrival
    times = arrival_times(spec, 10.0, seed=0)
    assert times.tolist() == [0.25, 1.0, 3.5]  # sorted, 12.0 is past the run
    assert mean_rate_rps(spec, 10.0) == pytest.approx(0.3)


def test_make_trace(tmp_path):
    data = config(
        tasks=[
            task("a", arrival={"process": "poisson", "rate_rps": 100}),
            task("b", family="zoo/seq-cls", arrival={"process": "periodic", "period_ms": 50}),
        ],
        run={"duration_s": 20, "seed": 5},
    )
    cfg = parse_slo_config(data, source="x")
    trace = make_trace(cfg, {"a": 30})
    assert trace == make_trace(cfg, {"a": 30})
    assert all(isinstance(i, TraceItem) for i in trace)
    assert [i.t_s for i in trace] == sorted(i.t_s for i in trace)
    a = [i for i in trace if i.task == "a"]
    b = [i for i in trace if i.task == "b"]
    assert [i.index for i in a] == list(range(len(a))) and [i.index for i in b] == list(range(len(b)))
    assert 1600 < len(a) < 2400 and len(b) == 400
    assert {i.sample for i in a} == set(range(30))  # ~2000 draws cover 30 samples
    assert {i.sample for i in b} == {0}  # no n_samples: sample 0
    # Streams are per task: another seed changes them, a task added at the end does not.
    data["tasks"].append(task("c", family="zoo/signal-cls"))
    longer = make_trace(parse_slo_config(data, source="x"), {"a": 30})
    assert [i for i in longer if i.task != "c"] == trace
    data["run"]["seed"] = 6
    assert make_trace(parse_slo_config(data, source="x"), {"a": 30}) != trace
    # twice the load: 40 s of the same arrivals in 20 s
    double = make_trace(cfg, {"a": 30}, rate_scale=2.0)
    assert [i.t_s * 2 for i in double[: len(trace) // 3]] == pytest.approx(
        [i.t_s for i in make_trace(cfg, {"a": 30}, duration_s=40)][: len(trace) // 3])
    assert max(i.t_s for i in double) < 20 and len([i for i in double if i.task == "b"]) == 800
    with pytest.raises(ConfigError, match="rate_scale"):
        make_trace(cfg, rate_scale=0)
    with pytest.raises(ConfigError, match="unknown task"):
        make_trace(cfg, {"zzz": 3})
