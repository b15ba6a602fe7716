"""``loom.profiling.fitting``: estimators fitted from a real profile dataset and measured configs; `loom fit`/`loom predict`."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from test_profile import FAST, device_yaml

from loom.core.errors import ConfigError
from loom.processors.device import load_device_profile
from loom.profiling.dataset import load_profile_dataset
from loom.profiling.fitting import (
    Estimates,
    EstimatesError,
    accuracy_budget,
    fit_estimates,
    latency_rows,
    sample_accuracy,
)
from loom.profiling.profile import profile_device


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    return load_device_profile(device_yaml(tmp_path_factory.mktemp("device")))


@pytest.fixture(scope="module")
def dataset(synth_partition, device, tmp_path_factory):
    return profile_device([synth_partition], device, tmp_path_factory.mktemp("est-profile") / "data", **FAST)


@pytest.fixture(scope="module")
def estimates(synth_partition, dataset, device):
    return fit_estimates([synth_partition], dataset, device, samples=6, strategy="stratified")


def test_budget_is_five_percent_capped_at_fifty():
    assert accuracy_budget(512) == 25
    assert accuracy_budget(1000) == 50
    assert accuracy_budget(100_000) == 50
    assert accuracy_budget(8) == 1


def test_latency_rows_come_from_measured_blocks(dataset, device, synth_partition):
    rows = latency_rows(dataset, device)
    ok = [r for r in dataset.blocks if r["status"] == "ok"]
    assert len(rows.rows) == len(ok) > 0
    assert set(rows.block_id) <= set(synth_partition.blocks)
    assert np.all(rows.latency_ms > 0)
    assert {"macs_total", "proc_backend_onnxruntime"} <= set(rows.rows[0])


@pytest.mark.parametrize("strategy", ["random", "stratified", "active"])
def test_samples_measure_stitched_configs_only(synth_partition, strategy):
    family = synth_partition.family()
    sample = sample_accuracy(synth_partition, family, 4, strategy=strategy, seed=1)
    assert len(sample.measured) == 4
    assert all(len(set(c)) > 1 for c in sample.measured)  # uniform configs are known, never measured
    assert all(0.0 <= a <= 1.0 for a in sample.measured.values())
    assert set(sample.known) == {tuple([v] * synth_partition.k) for v in synth_partition.variants}


def test_unknown_strategy_is_a_config_error(synth_partition):
    with pytest.raises(ConfigError, match="strategy: 'greedy'"):
        sample_accuracy(synth_partition, synth_partition.family(), 3, strategy="greedy")


def test_predict_a_plan(estimates, synth_partition, device):
    names = sorted(synth_partition.variants)
    cpu, npu = device.processor_names
    stitched = (names[0], names[-1], names[0])
    one = estimates.predict("synthetic", stitched, [cpu])  # one name: every slot there
    assert one["placement"] == [cpu] * 3 and one["latency_ms"] > 0 and sum(one["transfer_ms"]) == 0
    assert 0.0 <= one["accuracy"] <= 1.0
    # the simulated NPU refuses Gemm, so only the first two slots may go there
    split = estimates.predict("synthetic", stitched, [npu, cpu, cpu])
    assert split["transfer_ms"][0] > 0 and split["transfer_ms"][1] == 0
    assert split["latency_ms"] == pytest.approx(sum(split["block_ms"]) + sum(split["transfer_ms"]) + split["dispatch_ms"])
    uniform = estimates.predict("synthetic", [names[1]] * 3, [cpu])
    assert uniform["accuracy_measured"]
    assert uniform["accuracy"] == pytest.approx(synth_partition.family().variant(names[1]).accuracy)


def test_bad_questions_get_named_errors(estimates, device):
    with pytest.raises(EstimatesError, match="no estimates for task 'nope'"):
        estimates.predict("nope", ["dense"] * 3, ["cpu"])
    with pytest.raises(ConfigError, match="unknown: \\['bogus'\\]"):
        estimates.predict("synthetic", ["dense", "bogus", "dense"], ["cpu"])
    with pytest.raises(ConfigError, match="one processor per slot"):
        estimates.predict("synthetic", ["dense"] * 3, ["cpu", "cpu"])
    with pytest.raises(ConfigError, match="unknown processors \\['gpu'\\]"):
        estimates.predict("synthetic", ["dense"] * 3, ["gpu"])


def test_save_and_load_round_trip(estimates, tmp_path, synth_partition):
    estimates.save(tmp_path / "est")
    assert (tmp_path / "est" / "latency.json").is_file() and (tmp_path / "est" / "latency.meta.json").is_file()
    assert (tmp_path / "est" / "tasks" / "synthetic" / "accuracy.json").is_file()
    assert not list((tmp_path / "est").rglob("*.pkl"))
    back = Estimates.load(tmp_path / "est")
    names = sorted(synth_partition.variants)
    for config in [(names[0], names[1], names[0]), (names[-1],) * 3]:
        a = estimates.predict("synthetic", config, ["npu", "cpu", "cpu"])
        b = back.predict("synthetic", config, ["npu", "cpu", "cpu"])
        assert a["latency_ms"] == pytest.approx(b["latency_ms"], rel=1e-6)
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6)


def test_missing_or_malformed_estimates_folder(tmp_path, estimates):
    with pytest.raises(EstimatesError, match="run `loom fit` first"):
        Estimates.load(tmp_path / "nothing")
    estimates.save(tmp_path / "est")
    meta = json.loads((tmp_path / "est" / "estimates.json").read_text())
    del meta["tasks"]
    (tmp_path / "est" / "estimates.json").write_text(json.dumps(meta))
    with pytest.raises(EstimatesError, match="malformed estimates folder"):
        Estimates.load(tmp_path / "est")


def test_a_dataset_of_another_zoo_is_refused_with_the_fix(dataset, device, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(dataset.root, root)
    path = root / "blocks.csv"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    rows[0]["block_id"] = "0" * 20
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ConfigError, match="--no-resume"):
        latency_rows(load_profile_dataset(root), device)


def test_cli_fit_then_predict(synth_family, synth_partition, dataset, device, tmp_path, capsys):
    from loom.cli import main

    dev = device_yaml(tmp_path)
    out = tmp_path / "est"
    parts = synth_partition.root.parent
    argv = ["fit", "--device", str(dev), "--family", str(synth_family.root), "--data", str(dataset.root),
            "--partitions", str(parts), "--samples", "4", "--strategy", "random", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "4 measured stitched configs" in text and str(out) in text
    names = sorted(synth_partition.variants)
    config = ",".join([names[0], names[1], names[0]])
    assert main(["predict", "--estimates", str(out), "--task", "synthetic", "--config", config,
                 "--placement", "npu,cpu,cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["config"] == config.split(",") and got["latency_ms"] > 0 and 0 <= got["accuracy"] <= 1
    assert main(["predict", "--estimates", str(out), "--task", "synthetic", "--config", config,
                 "--placement", "cpu"]) == 0
    assert "ms (blocks" in capsys.readouterr().out
    assert main(["predict", "--estimates", str(tmp_path / "none"), "--task", "synthetic", "--config", config,
                 "--placement", "cpu"]) == 2
    assert "loom fit" in capsys.readouterr().err


def test_a_processor_without_rows_is_left_out_and_spaces_keep_to_the_device(estimates, dataset, device,
                                                                            synth_partition):
    import copy

    from loom.app.deployment import task_space

    only = copy.copy(dataset)
    first = device.processors[0].name
    only.blocks = [r for r in dataset.blocks if r["processor"] == first]
    est = fit_estimates([synth_partition], only, device, samples=2, strategy="random")
    assert list(est.processors) == [first]
    assert est.notes["latency"]["processors_left_out"] == [p.name for p in device.processors[1:]]
    # a deployment's device may list fewer processors than the estimates know
    space = task_space(estimates, synth_partition.task, [first])
    assert space.processors == [first] and {p for _, p in space.block_ms} == {first}
