"""The benchmark scripts' ``--zoo``: the edge zoo by default, a one-line stop when what it needs
is missing, and the zoo recorded in the JSON (cheap paths only: no benchmark is run but a
one-round bench_stitch on the smallest embedded task)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
SERVE = str(ROOT / "configs" / "serve.yaml")  # the embedded zoo's tasks
ALL = ["bench_stitch", "bench_estimators", "bench_serving", "bench_memory", "bench_sim"]
#: the scripts that serve an SLO config's tasks (checked against the zoo and the profile dataset)
SERVING = ["bench_serving", "bench_memory", "bench_sim"]


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_zoo_test", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def fake_edge(tmp_path, monkeypatch):
    """A stand-in edge zoo: two family folders (a manifest each, enough for the checks)."""
    zoo = tmp_path / "edge"
    for task in ("fashion-cls", "fashion-group"):
        (zoo / task).mkdir(parents=True)
        (zoo / task / "family.yaml").write_text("")
    monkeypatch.setenv("SPARSELOOM_EDGE_ZOO", str(zoo))
    return zoo


@pytest.mark.parametrize("name", ALL)
def test_unbuilt_edge_zoo_stops_with_the_build_hint(name, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("SPARSELOOM_EDGE_ZOO", str(empty))
    with pytest.raises(SystemExit) as exc:
        script(name).main(["--out", str(tmp_path / "out.json")])  # --zoo edge is the default
    msg = str(exc.value.code)
    assert "the edge zoo is not built" in msg and "make zoo-edge" in msg and "\n" not in msg
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("name", SERVING)
def test_config_tasks_outside_the_zoo_stop(name, fake_edge, tmp_path):
    with pytest.raises(SystemExit) as exc:
        script(name).main(["--config", SERVE, "--out", str(tmp_path / "out.json")])
    msg = str(exc.value.code)
    assert "not in the edge zoo" in msg and "fashion-cls, fashion-group" in msg and "--zoo embedded" in msg


@pytest.mark.parametrize("name", SERVING)
def test_zoo_tasks_without_profile_data_stop(name, fake_edge, tmp_path):
    tasks = "\n".join(f"  - {{name: {t}, family: {fake_edge / t}, latency_ms: 20, accuracy_floor: 0.8, "
                      "arrival: {process: poisson, rate_rps: 10}}" for t in ("fashion-cls", "fashion-group"))
    config = tmp_path / "serve-edge.yaml"
    config.write_text(f"schema_version: 1\ndevice: host\ntasks:\n{tasks}\n")
    with pytest.raises(SystemExit) as exc:
        script(name).main(["--config", str(config), "--zoo", "edge", "--out", str(tmp_path / "out.json")])
    assert str(exc.value.code) == ("error: no profile data for task fashion-cls, fashion-group in profiles/data/host: "
                                   "run `loom profile --device profiles/host.yaml --zoo edge` first")


@pytest.mark.parametrize("name", SERVING)
def test_embedded_config_passes_the_zoo_check(name):
    cfg, zoo = script(name).zoo_config(SERVE, "embedded")
    assert zoo == "embedded" and cfg.task_names == ["image-cls", "signal-cls", "seq-cls"]


def test_bench_stitch_records_the_zoo(tmp_path):
    out = tmp_path / "stitch.json"
    assert script("bench_stitch").main(["--zoo", "embedded", "--out", str(out), "--tasks", "signal-cls", "--k", "2",
                                        "--variants", "dense", "--rounds", "1", "--repeats", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["zoo"] == "embedded" and {r["task"] for r in result["rows"]} == {"signal-cls"}


def test_estimator_truth_is_the_originals_plus_a_stated_sample():
    from types import SimpleNamespace

    names = [f"v{i}" for i in range(10)]
    part = SimpleNamespace(variants={n: None for n in names}, k=3, task="t")
    mod = script("bench_estimators")
    configs = mod.truth_configs(part, 100, seed=0)
    assert len(configs) == 110 and len(set(configs)) == 110
    assert all(tuple([n] * 3) in configs for n in names)
    assert sum(len(set(c)) > 1 for c in configs) == 100
    assert configs == mod.truth_configs(part, 100, seed=0) != mod.truth_configs(part, 100, seed=1)
    assert len(mod.truth_configs(part, 0, seed=0)) == 1000  # 0: every config


@pytest.mark.parametrize("strategy", ["stratified", "random"])
def test_learning_curve_samples_only_configs_of_a_sampled_truth(strategy):
    """On a sampled truth the curve's samples come from it (a stratified sample of the whole
    space asked for accuracies the truth did not hold: a KeyError on the edge zoo)."""
    from types import SimpleNamespace

    names = [f"v{i}" for i in range(10)]
    part = SimpleNamespace(variants={n: None for n in names}, k=3, task="t")
    mod = script("bench_estimators")
    pool = [c for c in mod.truth_configs(part, 100, seed=0) if len(set(c)) > 1]
    for n in (10, 50, 100, 150):
        chosen = mod.curve_sample(strategy, names, 3, pool, n, seed=1)
        assert len(chosen) == min(n, len(pool)) == len(set(chosen)) and set(chosen) <= set(pool)
