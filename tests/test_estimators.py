"""Latency and accuracy estimators, cut compatibility, samplers and persistence, on synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from estimators.accuracy import (
    AccuracyEstimator,
    config_feature_names,
    config_features,
    cut_compatibility,
    min_accuracy_baseline,
)
from estimators.features import BLOCK_FEATURES, FeatureSchemaError, latency_row, processor_features
from estimators.latency import LatencyEstimator, nnls
from estimators.persist import (
    EstimatorFileError,
    StaleEstimatorWarning,
    load_estimator,
    metadata_path,
    save_estimator,
)
from estimators.plans import Link, LinkModel, latency_table, plan_latency, predict_plan
from estimators.sampling import active_sample, config_space, random_sample, stratified_sample
from loom.core.errors import ConfigError, NotFittedError

ROOT = Path(__file__).resolve().parent.parent
PROCS = {
    "cpu0": processor_features("cpu", "onnxruntime", {"intra_op_threads": 1}),
    "cpu1": processor_features("cpu", "openvino", {"precision": "f32", "threads": 1}),
}
#: the synthetic truth: fixed cost per call + MACs at a processor's speed, x1.5 for int8 on cpu1
SPEED = {"cpu0": 2e8, "cpu1": 1e8}


def synthetic_block(rng: np.random.Generator, macs: float) -> dict[str, float]:
    f = dict.fromkeys(BLOCK_FEATURES, 0.0)
    int8 = float(rng.random() < 0.5)
    f.update(macs_total=macs, macs_conv=macs, params=macs / 50, nonzero_params=macs / 50,
             act_total_bytes=macs / 20, act_in_bytes=4096.0, act_out_bytes=8192.0,
             prec_int8=int8, prec_fp32=1 - int8, n_nodes=float(rng.integers(3, 30)), op_Conv=3.0)
    return f


def true_ms(block: dict[str, float], proc: str) -> float:
    slow = 1.5 if (proc == "cpu1" and block["prec_int8"]) else 1.0
    return 0.02 + slow * block["macs_total"] / SPEED[proc] * 1e3


def latency_data(n: int, lo: float, hi: float, seed: int) -> tuple[list[dict[str, float]], np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, y = [], []
    for _ in range(n):
        block = synthetic_block(rng, float(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
        proc = "cpu0" if rng.random() < 0.5 else "cpu1"
        rows.append(latency_row(block, PROCS[proc]))
        y.append(true_ms(block, proc) * float(np.exp(rng.normal(0, 0.02))))
    return rows, np.array(y)


@pytest.fixture(scope="module")
def latency_model() -> LatencyEstimator:
    rows, y = latency_data(160, 1e5, 2e7, seed=0)
    return LatencyEstimator(n_estimators=150, learning_rate=0.1).fit(rows, y)


# -- latency -------------------------------------------------------------------------------------
def test_latency_estimator_learns_and_extrapolates(latency_model):
    assert latency_model.feature_names_[: len(BLOCK_FEATURES)] == list(BLOCK_FEATURES)
    assert latency_model.n_features_in_ == len(latency_model.feature_names_)
    rows, y = latency_data(60, 1e5, 2e7, seed=1)
    ape = np.abs(latency_model.predict(rows) - y) / y
    assert np.median(ape) < 0.08
    # blocks 3-5x larger than any seen: the roofline prior carries the trees past their range
    big, y_big = latency_data(20, 6e7, 1e8, seed=2)
    assert np.median(np.abs(latency_model.predict(big) - y_big) / y_big) < 0.25
    trees_only = LatencyEstimator(n_estimators=150, learning_rate=0.1, prior="none")
    trees_only.fit(*latency_data(160, 1e5, 2e7, seed=0))
    assert np.median(np.abs(trees_only.predict(big) - y_big) / y_big) > 0.5


def test_estimator_contract():
    est = LatencyEstimator(max_depth=3)
    with pytest.raises(TypeError):
        LatencyEstimator(100)  # type: ignore[misc]  # keyword-only
    assert est.get_params()["max_depth"] == 3
    assert est.set_params(max_depth=2) is est and est.max_depth == 2
    with pytest.raises(ValueError, match="no parameter"):
        est.set_params(depth=2)
    assert not hasattr(est, "booster_")  # __init__ stores params only
    for model in (LatencyEstimator(), AccuracyEstimator()):
        with pytest.raises(NotFittedError):
            model.predict([{"a": 1.0}])
    assert "max_depth=2" in repr(est)


def test_scikit_learn_tools_accept_the_estimators():
    pytest.importorskip("sklearn")  # a test helper only: the runtime never imports it
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score

    est = AccuracyEstimator(max_depth=2, n_estimators=50)
    copy = clone(est)
    assert copy.get_params() == est.get_params() and copy is not est
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, (45, 3))
    scores = cross_val_score(copy, X, 0.5 + 0.4 * X[:, 0], cv=3, scoring="neg_mean_absolute_error")
    assert len(scores) == 3 and scores.mean() > -0.1


def test_fit_on_array_with_names_and_schema_errors():
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, (80, 3))
    y = 1.0 + 3 * X[:, 0]
    est = LatencyEstimator(n_estimators=100, target="linear", prior="none").fit(X, y, feature_names=["a", "b", "c"])
    assert est.feature_names_ == ["a", "b", "c"]
    p = est.predict(X)
    assert np.abs(p - y).mean() < 0.1
    # same columns, another order, named: reordered, same predictions
    assert np.allclose(est.predict(X[:, [2, 0, 1]], feature_names=["c", "a", "b"]), p)
    rows = [{"a": r[0], "b": r[1], "c": r[2]} for r in X]
    assert np.allclose(est.predict(rows), p)
    with pytest.raises(FeatureSchemaError) as err:
        est.predict([{"a": 0.1, "b": 0.2, "d": 0.3}])
    assert err.value.missing == ["c"] and err.value.extra == ["d"]
    with pytest.raises(FeatureSchemaError, match="2 columns"):
        est.predict(X[:, :2])
    with pytest.raises(ValueError, match="> 0"):
        LatencyEstimator().fit(X, y - 5, feature_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="NaN"):
        est.fit(X, y * np.nan, feature_names=["a", "b", "c"])  # refused before the old fit is touched
    assert np.allclose(est.predict(X), p)
    strict = LatencyEstimator(prior="roofline")
    with pytest.raises(FeatureSchemaError, match="roofline"):
        strict.fit(X, y, feature_names=["a", "b", "c"])
    with pytest.raises(NotFittedError):
        strict.predict(X)


# -- links and plans -------------------------------------------------------------------------------
def test_link_model():
    links = LinkModel(links={("a", "b"): Link(latency_ms=0.05, bandwidth_gbps=10.0)})
    assert links.transfer_ms("a", "a", 1e9) == 0.0
    assert links.transfer_ms("b", "a", 1e6) == pytest.approx(0.05 + 0.1)  # 1 MB at 10 GB/s = 0.1 ms
    with pytest.raises(ConfigError, match="'a' and 'c'"):
        links.transfer_ms("a", "c", 10)
    assert LinkModel.from_dict(links.to_dict()).transfer_ms("a", "b", 5e5) == links.transfer_ms("a", "b", 5e5)
    profile = {"links": [{"between": ["cpu0", "cpu1"], "bandwidth_gbps": 10.0, "latency_us": 50.0}]}
    assert LinkModel.from_profile(profile).transfer_ms("cpu1", "cpu0", 1e6) == pytest.approx(0.15)
    calibration = {  # the shape of loom profile's meta.json "link_calibration"
        "processors": {"cpu0": {"dispatch_us": 20.0}, "cpu1": {"dispatch_us": 50.0}},
        "links": {"cpu0|cpu1": {"between": ["cpu0", "cpu1"], "latency_us": 40.0, "bandwidth_gbps": 4.0}},
    }
    calibrated = LinkModel.from_calibration(calibration)
    assert calibrated.transfer_ms("cpu1", "cpu0", 4e6) == pytest.approx(0.04 + 1.0)
    assert calibrated.dispatch_ms == {"cpu0": 0.02, "cpu1": 0.05}
    table = {("b0", "cpu1"): 1.0, ("b1", "cpu0"): 2.0}
    plan = plan_latency(["b0", "b1"], ["cpu1", "cpu0"], table, {"b0": 4e6}, calibrated)
    assert plan.dispatch_ms == 0.05 and plan.total_ms == pytest.approx(3.0 + 1.04 + 0.05)
    assert LinkModel.from_dict(calibrated.to_dict()).dispatch_ms == calibrated.dispatch_ms
    samples = [("x", "y", b, 0.02 + b / 2e6) for b in (1e3, 1e5, 1e6, 4e6)]  # 2 GB/s, 20 us
    fitted = LinkModel.fit(samples).link("y", "x")
    assert fitted.latency_ms == pytest.approx(0.02, abs=1e-9) and fitted.bandwidth_gbps == pytest.approx(2.0)
    assert np.allclose(nnls(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([2.0, -1.0])), [2.0, 0.0])


def test_predict_plan_is_blocks_plus_transfers(latency_model):
    rng = np.random.default_rng(5)
    blocks = [synthetic_block(rng, m) for m in (2e6, 5e6, 1e6)]
    links = LinkModel(default=Link(latency_ms=0.1, bandwidth_gbps=1.0))
    ms = {p: latency_model.predict([latency_row(b, PROCS[p]) for b in blocks]) for p in PROCS}
    same = predict_plan(latency_model, blocks, ["cpu0"] * 3, PROCS, links)
    assert same.transfer_ms == [0.0, 0.0]
    assert same.total_ms == pytest.approx(ms["cpu0"].sum())
    split = predict_plan(latency_model, blocks, ["cpu0", "cpu1", "cpu1"], PROCS, links)
    hop = 0.1 + 8192 / 1e9 * 1e3  # block 0's output, 8 kB at 1 GB/s
    assert split.transfer_ms == pytest.approx([hop, 0.0])
    assert split.total_ms == pytest.approx(ms["cpu0"][0] + ms["cpu1"][1:].sum() + hop)
    with pytest.raises(ConfigError, match="link model"):
        predict_plan(latency_model, blocks, ["cpu0", "cpu1", "cpu1"], PROCS)
    table = latency_table(latency_model, {"b0": blocks[0], "b1": blocks[1]}, PROCS)
    assert len(table) == 4
    plan = plan_latency(["b0", "b1"], ["cpu1", "cpu1"], table, {"b0": 8192.0, "b1": 8192.0})
    assert plan.total_ms == pytest.approx(table[("b0", "cpu1")] + table[("b1", "cpu1")])


# -- cut compatibility and config features ---------------------------------------------------------
def test_cut_compatibility():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((16, 4, 5, 5)).astype(np.float32)
    mask = np.ones((16, 10), np.int64)
    acts = {
        "dense": {"h": h, "mask": mask},
        "same": {"h": h.copy(), "mask": mask},
        "double": {"h": 2 * h, "mask": mask},
        "neg": {"h": -h, "mask": mask},
        "noise": {"h": h + rng.standard_normal(h.shape).astype(np.float32), "mask": mask},
    }
    before = {v: {t: a.copy() for t, a in d.items()} for v, d in acts.items()}
    compat = cut_compatibility(acts, cuts=[["h", "mask"]])
    assert len(compat) == 5 * 5 * 1
    assert compat[("dense", "same", 0)]["correlation"] == pytest.approx(1.0)
    assert compat[("dense", "same", 0)]["rel_error"] == pytest.approx(0.0, abs=1e-6)
    assert compat[("double", "dense", 0)]["correlation"] == pytest.approx(1.0)
    assert compat[("double", "dense", 0)]["norm_ratio"] == pytest.approx(2.0)
    assert compat[("dense", "double", 0)]["norm_ratio"] == pytest.approx(0.5)
    assert compat[("neg", "dense", 0)]["correlation"] == pytest.approx(-1.0)
    assert 0.5 < compat[("noise", "dense", 0)]["correlation"] < 0.9
    # the constant mask, identical in every variant, does not decide the cut's compatibility
    assert compat[("neg", "dense", 0)]["cosine"] == pytest.approx(-1.0)
    assert all(np.array_equal(acts[v][t], before[v][t]) for v in acts for t in acts[v])  # pure
    per_tensor = cut_compatibility({v: {"h": d["h"]} for v, d in acts.items()})
    assert per_tensor[("noise", "dense", 0)] == compat[("noise", "dense", 0)]
    with pytest.raises(ValueError, match="shapes"):
        cut_compatibility({"a": {"h": h}, "b": {"h": h[:, :2]}})
    with pytest.raises(KeyError, match="b:x"):
        cut_compatibility({"a": {"x": h}, "b": {"h": h}}, cuts=[["x"]])
    # a graph input that no variant's activations carry (the mask) is skipped
    no_mask = cut_compatibility({v: {"h": d["h"]} for v, d in acts.items()}, cuts=[["h", "input_mask"]])
    assert no_mask[("noise", "dense", 0)] == compat[("noise", "dense", 0)]
    with pytest.raises(KeyError, match="a:y"):
        cut_compatibility({"a": {"h": h}, "b": {"h": h}}, cuts=[["y"]])


VARIANTS = {
    "dense": {"kind": "dense", "sparsity": 0.0, "precision": "fp32", "accuracy": 0.95},
    "u80": {"kind": "unstructured", "sparsity": 0.8, "precision": "fp32", "accuracy": 0.90},
    "u95": {"kind": "unstructured", "sparsity": 0.95, "precision": "fp32", "accuracy": 0.70},
    "int8": {"kind": "int8", "sparsity": 0.0, "precision": "int8", "accuracy": 0.94},
}


def synthetic_compat(k: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    names = list(VARIANTS)
    out = {}
    for c in range(k - 1):
        for a in names:
            for b in names:
                corr = 1.0 if a == b else float(rng.uniform(0.5, 1.0))
                out[(a, b, c)] = {"correlation": corr, "cosine": corr, "norm_ratio": 1.0, "rel_error": 1 - corr}
    return out


def synthetic_accuracy(config, compat) -> float:
    """Truth: the weakest piece, minus what each mismatched cut costs."""
    acc = min(VARIANTS[v]["accuracy"] for v in config)
    return acc - 0.3 * sum(1 - compat[(config[c], config[c + 1], c)]["correlation"] for c in range(len(config) - 1))


def test_config_features_schema():
    compat = synthetic_compat(3)
    f = config_features(("dense", "u80", "int8"), VARIANTS, compat)
    assert list(f) == config_feature_names(3)
    assert f["slot1_kind_unstructured"] == 1 and f["slot1_sparsity"] == 0.8 and f["slot2_bits"] == 8
    assert f["acc_min"] == 0.90 and f["n_distinct"] == 3 and f["n_switches"] == 2
    assert f["cut0_correlation"] == compat[("dense", "u80", 0)]["correlation"]
    assert f["cut1_upstream_drift"] == compat[("u80", "dense", 1)]["correlation"]
    assert min_accuracy_baseline(("dense", "u95", "dense"), VARIANTS) == 0.70
    with pytest.raises(KeyError, match="u50"):
        config_features(("dense", "u50", "int8"), VARIANTS, compat)


def test_accuracy_estimator_recovers_a_simple_relationship():
    compat = synthetic_compat(3)
    space = config_space(list(VARIANTS), 3)
    rows = {c: config_features(c, VARIANTS, compat) for c in space}
    truth = {c: synthetic_accuracy(c, compat) for c in space}
    train = stratified_sample(list(VARIANTS), 3, 40, seed=0)
    est = AccuracyEstimator().fit([rows[c] for c in train], [truth[c] for c in train])
    test = [c for c in space if c not in set(train)]
    pred = est.predict([rows[c] for c in test])
    err = np.abs(pred - np.array([truth[c] for c in test]))
    base = np.abs(np.array([min_accuracy_baseline(c, VARIANTS) - truth[c] for c in test]))
    assert err.mean() < 0.02 and err.mean() < base.mean() / 2
    assert pred.min() >= 0.0 and pred.max() <= 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        AccuracyEstimator().fit([rows[c] for c in train], [1.5] * len(train))


# -- persistence --------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, latency_model):
    rows, _ = latency_data(30, 1e5, 5e7, seed=3)
    path = save_estimator(latency_model, tmp_path / "latency.json", fingerprint={"device": "host", "cpus": 2})
    assert path == tmp_path / "latency.json" and metadata_path(path) == tmp_path / "latency.meta.json"
    meta = json.loads(metadata_path(path).read_text())
    booster = json.loads(path.read_text())  # XGBoost's own JSON
    assert "learner" in booster
    assert meta["estimator"] == "LatencyEstimator" and meta["feature_names"] == latency_model.feature_names_
    assert meta["n_train_rows"] == 160 and meta["fingerprint"] == {"device": "host", "cpus": 2}
    assert set(meta["versions"]) == {"xgboost", "numpy", "onnx", "sparseloom"} and meta["created"]
    assert meta["state"]["prior"]["pooled"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_estimator(path, fingerprint={"device": "host", "cpus": 2})
    assert type(loaded) is LatencyEstimator and loaded.get_params() == latency_model.get_params()
    assert np.array_equal(loaded.predict(rows), latency_model.predict(rows))
    with pytest.raises(FeatureSchemaError, match="op_Conv"):
        loaded.predict([{k: v for k, v in r.items() if k != "op_Conv"} for r in rows])
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pickle"))


def test_accuracy_estimator_round_trip(tmp_path):
    compat = synthetic_compat(2)
    space = config_space(list(VARIANTS), 2)
    rows = [config_features(c, VARIANTS, compat) for c in space]
    est = AccuracyEstimator(n_estimators=50).fit(rows, [synthetic_accuracy(c, compat) for c in space])
    loaded = load_estimator(est.save(tmp_path / "acc"))
    assert type(loaded) is AccuracyEstimator
    assert np.array_equal(loaded.predict(rows), est.predict(rows))


def test_load_warns_on_other_fingerprint_or_versions(tmp_path, latency_model):
    path = save_estimator(latency_model, tmp_path / "m.json", fingerprint={"device": "host", "cpus": 2})
    with pytest.warns(StaleEstimatorWarning, match="cpus: saved 2, now 4"):
        load_estimator(path, fingerprint={"device": "host", "cpus": 4})
    meta_file = metadata_path(path)
    meta = json.loads(meta_file.read_text())
    meta["versions"]["xgboost"] = "0.0.1"
    meta_file.write_text(json.dumps(meta))
    with pytest.warns(StaleEstimatorWarning, match="xgboost: saved '0.0.1'"):
        load_estimator(path)
    assert issubclass(StaleEstimatorWarning, UserWarning)


def test_load_refuses_broken_files(tmp_path, latency_model):
    path = save_estimator(latency_model, tmp_path / "m.json")
    path.write_text(path.read_text().replace('"learner"', '"learner" ', 1))
    with pytest.raises(EstimatorFileError, match="changed"):
        load_estimator(path)
    with pytest.raises(EstimatorFileError, match="no such file"):
        load_estimator(tmp_path / "absent.json")
    with pytest.raises(NotFittedError):
        save_estimator(LatencyEstimator(), tmp_path / "unfitted.json")


# -- sampling ---------------------------------------------------------------------------------------------
NAMES = ["a", "b", "c", "d", "e", "f", "g", "h"]


def test_random_sample_is_deterministic_and_distinct():
    space = config_space(NAMES, 3)
    s1, s2 = random_sample(space, 25, seed=1), random_sample(space, 25, seed=1)
    assert s1 == s2 and len(set(s1)) == 25 and set(s1) <= set(space)
    assert random_sample(space, 25, seed=2) != s1
    assert random_sample(space[:10], 25) == space[:10]


def test_stratified_sample_balances_slots_and_includes_uniform():
    s = stratified_sample(NAMES, 3, 25, seed=0)
    assert s == stratified_sample(NAMES, 3, 25, seed=0) and s != stratified_sample(NAMES, 3, 25, seed=1)
    assert len(s) == 25 and len(set(s)) == 25
    assert s[:8] == [(v, v, v) for v in NAMES]
    for slot in range(3):
        counts = Counter(c[slot] for c in s)
        assert set(counts) == set(NAMES)  # every (slot, variant) covered
        assert max(counts.values()) - min(counts.values()) <= 1
    stitched = stratified_sample(NAMES, 3, 20, seed=0, include_uniform=False)
    assert len(stitched) == 20 and all(len(set(c)) > 1 for c in stitched)
    assert all(set(Counter(c[s] for c in stitched)) == set(NAMES) for s in range(3))
    with pytest.raises(ValueError, match="uniform"):
        stratified_sample(NAMES, 3, 5)
    assert len(stratified_sample(["a", "b"], 2, 10)) == 4  # the whole space


def test_active_sample_is_deterministic_and_targets_disagreement():
    compat = synthetic_compat(3)
    space = config_space(list(VARIANTS), 3)
    rows = {c: config_features(c, VARIANTS, compat) for c in space}
    known = {(v, v, v): VARIANTS[v]["accuracy"] for v in VARIANTS}
    calls: list[list] = []

    def measure(configs):
        calls.append(list(configs))
        return [synthetic_accuracy(c, compat) for c in configs]

    def run():
        return active_sample(space, rows, measure, 20, seed=0, known=known, initial=12, batch=4, n_models=4,
                             make_estimator=lambda: AccuracyEstimator(n_estimators=30, learning_rate=0.2))

    first = run()
    assert len(first.configs) == 20 and len(set(first.configs)) == 20
    assert not set(first.configs) & set(known)  # known configs are never measured again
    assert [len(r) for r in first.rounds] == [12, 4, 4] and len(calls) == 3
    assert first.values == [synthetic_accuracy(c, compat) for c in first.configs]
    assert len(first.disagreement) == 2
    calls.clear()
    assert run().configs == first.configs


def test_layering_estimators_do_not_import_the_face():
    code = (
        "import sys, estimators.features, estimators.latency, estimators.accuracy, "
        "estimators.sampling, estimators.persist\n"
        "bad = [m for m in ('loom.model.partition', 'loom.model.stitch', 'loom.api', 'loom.cli', 'loom.app.demo', 'xgboost')"
        " if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
