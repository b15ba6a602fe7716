"""Wanda pruning (loom/model/wanda.py): scores from activations, rows pruned to the target,
every weight layout mapped to its input features, and the fallback to magnitude."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from synth import residual_cnn, write_family_data

from loom.core.errors import ManifestError
from loom.core.runref import run_batched, session
from loom.model.family import load_family
from loom.model.variants import (
    init_family,
    make_variants,
    prunable_weights,
    prune_unstructured,
    weight_sparsity,
)
from loom.model.wanda import calibrate, per_row, prune_mask, prune_wanda, wanda_scores

ZOO = Path(__file__).resolve().parent.parent / "zoo"
RNG = np.random.default_rng(7)


def _model(x_shape: list, nodes: list, inits: dict[str, np.ndarray], out: str) -> onnx.ModelProto:
    """input -> Relu (so the weighted node reads an internal tensor) -> ``nodes`` -> ``out``."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["act"], name="relu"), *nodes], "m",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *x_shape[1:]])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def gemm(trans_b: int, k: int = 16, m: int = 6) -> onnx.ModelProto:
    w = RNG.standard_normal((m, k) if trans_b else (k, m))
    return _model([None, k], [helper.make_node("Gemm", ["act", "w"], ["y"], name="fc", transB=trans_b)], {"w": w}, "y")


def matmul(k: int = 16, m: int = 6) -> onnx.ModelProto:
    """X [N, T, k] @ W [k, m]"""
    return _model([None, 3, k], [helper.make_node("MatMul", ["act", "w"], ["y"], name="mm")],
                  {"w": RNG.standard_normal((k, m))}, "y")


def matmul_left(k: int = 16, m: int = 6) -> onnx.ModelProto:
    """W [m, k] @ X [N, k, T]: the constant is the left operand, features on X's axis -2"""
    return _model([None, k, 5], [helper.make_node("MatMul", ["w", "act"], ["y"], name="mm")],
                  {"w": RNG.standard_normal((m, k))}, "y")


def conv(cin: int = 8, cout: int = 12, groups: int = 1) -> onnx.ModelProto:
    w = RNG.standard_normal((cout, cin // groups, 3, 3))
    return _model([None, cin, 6, 6], [helper.make_node("Conv", ["act", "w"], ["y"], name="conv", group=groups,
                                                       pads=[1, 1, 1, 1])], {"w": w}, "y")


def feeds_for(model: onnx.ModelProto, n: int = 10, scale: np.ndarray | None = None) -> dict[str, np.ndarray]:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.abs(RNG.standard_normal((n, *dims)))
    if scale is not None:
        x = x * scale
    return {"input": x.astype(np.float32)}


def weight(model: onnx.ModelProto, name: str = "w") -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


LAYOUTS = {
    "gemm": (lambda: gemm(0), -1, 0),  # (model, feature axis of X, feature axis of W)
    "gemm-transB": (lambda: gemm(1), -1, 1),
    "matmul": (matmul, -1, 0),
    "matmul-left": (matmul_left, -2, 1),
}


def _norms(x: np.ndarray, axis: int) -> np.ndarray:
    """||X_j||_2 by definition: over every axis but the feature axis."""
    moved = np.moveaxis(np.maximum(x, 0), axis, -1)
    return np.sqrt((moved.astype(np.float64) ** 2).reshape(-1, moved.shape[-1]).sum(axis=0))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matrix_norms_and_scores_follow_the_input_feature_axis(layout):
    make, x_axis, w_axis = LAYOUTS[layout]
    model = make()
    feeds = feeds_for(model)
    cal = calibrate(model, feeds, ["w"], batch=3)  # 10 samples: batches of 3, 3, 3, 1
    assert not cal.magnitude and cal.samples == 10
    expected = _norms(feeds["input"], x_axis)
    np.testing.assert_allclose(cal.norms["w"], expected, rtol=1e-5)
    w = weight(model)
    shape = [1, 1]
    shape[w_axis] = -1
    np.testing.assert_allclose(wanda_scores(w, cal.uses["w"], cal.norms["w"]), np.abs(w) * expected.reshape(shape), rtol=1e-5)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_every_output_row_reaches_the_target(layout, sparsity):
    make, _, w_axis = LAYOUTS[layout]
    model = make()
    pruned = weight(prune_wanda(model, sparsity, calibrate(model, feeds_for(model), ["w"])))
    rows = np.moveaxis(pruned, w_axis, -1)  # one output row per line
    assert ((rows == 0).sum(axis=1) == round(sparsity * rows.shape[1])).all()


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_rows_reach_the_target_and_groups_read_their_own_channels(groups):
    model = conv(cin=8, cout=12, groups=groups)
    feeds = feeds_for(model, scale=np.arange(1, 9).reshape(8, 1, 1))  # channel c's norm grows with c
    cal = calibrate(model, feeds, ["w"], batch=4)
    norms = _norms(feeds["input"], 1)
    np.testing.assert_allclose(cal.norms["w"], norms, rtol=1e-5)
    w = weight(model)
    per_group_out, per_group_in = 12 // groups, 8 // groups
    expected = np.empty_like(w)
    for o in range(12):
        channels = norms[(o // per_group_out) * per_group_in:(o // per_group_out + 1) * per_group_in]
        expected[o] = np.abs(w[o]) * channels.reshape(-1, 1, 1)
    np.testing.assert_allclose(wanda_scores(w, cal.uses["w"], cal.norms["w"]), expected, rtol=1e-5)
    pruned = weight(prune_wanda(model, 0.5, cal))
    row = per_group_in * 9
    assert ((pruned.reshape(12, -1) == 0).sum(axis=1) == row // 2).all()


def test_depthwise_conv_is_compared_across_the_tensor():
    """One input channel per output: a row is one 3x3 kernel sharing one norm, so the
    whole tensor is compared; the channel whose input is loudest keeps all its weights."""
    model = conv(cin=8, cout=8, groups=8)
    scale = np.ones((8, 1, 1))
    scale[5] = 100.0
    cal = calibrate(model, feeds_for(model, scale=scale), ["w"])
    assert not per_row(cal.uses["w"], weight(model).shape)
    pruned = weight(prune_wanda(model, 0.5, cal))
    assert (pruned == 0).sum() == round(0.5 * pruned.size)
    assert (pruned[5] != 0).all()


def test_activations_decide_not_magnitudes():
    """Feature 0 has tiny weights but huge activations: magnitude prunes it, Wanda keeps it."""
    model = gemm(1, k=64, m=4)  # 256 weights: prunable_weights' smallest
    w = np.ones((4, 64), dtype=np.float32) + RNG.uniform(0, 0.1, (4, 64)).astype(np.float32)
    w[:, 0] = 0.01
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    scale = np.ones(64)
    scale[0] = 1000.0
    feeds = feeds_for(model, scale=scale)
    wanda = weight(prune_wanda(model, 0.5, calibrate(model, feeds, ["w"])))
    magnitude = weight(prune_unstructured(model, 0.5))
    assert (wanda[:, 0] != 0).all() and (magnitude[:, 0] == 0).all()
    # and keeping it is what keeps the outputs: Wanda's error is the smaller one
    x = feeds["input"]
    dense_y, wanda_y, mag_y = (x @ m.T for m in (w, wanda, magnitude))
    assert np.abs(wanda_y - dense_y).mean() < np.abs(mag_y - dense_y).mean()


def test_a_weight_with_no_activation_is_pruned_by_magnitude():
    """Both MatMul operands constant: no activation to read, so magnitude across the tensor."""
    a = RNG.standard_normal((16, 16))
    model = _model([None, 16], [helper.make_node("MatMul", ["c", "w"], ["cw"], name="const"),
                                helper.make_node("MatMul", ["act", "cw"], ["y"], name="mm")],
                   {"c": a, "w": RNG.standard_normal((16, 16))}, "y")
    cal = calibrate(model, feeds_for(model), ["w"])
    assert "both operands are constant" in cal.magnitude["w"] and "w" not in cal.norms
    pruned = weight(prune_wanda(model, 0.5, cal))
    np.testing.assert_array_equal(pruned == 0, prune_mask(weight(model), None, None, 0.5))
    assert (pruned == 0).sum() == 128


def test_pruned_models_stay_finite_on_the_zoo():
    """A trained model of the embedded zoo, pruned hard: finite outputs, target reached."""
    family = load_family(ZOO / "image-cls")
    dense = onnx.load(family.variant_path("dense"))
    cal = calibrate(dense, family.calib_feeds(64), prunable_weights(dense))
    assert not cal.magnitude
    feeds, _ = family.eval_feeds(64)
    for sparsity in (0.5, 0.9):
        pruned = prune_wanda(dense, sparsity, cal)
        assert weight_sparsity(pruned) == pytest.approx(sparsity, abs=0.01)
        out = run_batched(session(pruned, name="pruned"), feeds)[family.manifest.output.name]
        assert np.isfinite(out).all()


def test_residual_cnn_outputs_stay_finite():
    model = residual_cnn()
    feeds = feeds_for(model)
    pruned = prune_wanda(model, 0.9, calibrate(model, feeds, prunable_weights(model)))
    assert np.isfinite(run_batched(session(pruned, name="pruned"), feeds)["logits"]).all()


# -- families: the default pruner and its fallback ------------------------------------------
def _family(folder: Path, *, calib_samples: int | None = None):  # noqa: ANN202
    model = residual_cnn()
    write_family_data(folder, model)
    if calib_samples is not None:
        np.savez(folder / "calib.npz", x=np.zeros((calib_samples, 1, 8, 8), np.float32))
    onnx.save(model, folder / "source.onnx")
    return init_family(folder / "source.onnx", folder, task="synthetic", num_classes=5)


def test_families_with_calibration_data_get_wanda(tmp_path):
    said: list[str] = []
    family = make_variants(_family(tmp_path), unstructured=[0.5], progress=said.append)
    v = family.variant("unstructured-50-pt")
    assert v.made_by.startswith("loom: Wanda pruning of dense to 50%") and "32 calibration samples" in v.made_by
    assert any("Wanda calibration on 32 samples" in s for s in said)
    assert v.sparsity == round(weight_sparsity(onnx.load(family.variant_path(v.name))), 4)
    family = make_variants(family, unstructured=[0.5], pruner="magnitude")
    assert family.variant("unstructured-50-pt").made_by.startswith("loom: per-layer magnitude pruning")


def test_a_family_without_calibration_data_falls_back_to_magnitude_and_says_so(tmp_path):
    family = _family(tmp_path, calib_samples=0)
    said: list[str] = []
    family = make_variants(family, unstructured=[0.5], progress=said.append)
    made_by = family.variant("unstructured-50-pt").made_by
    assert "magnitude pruning" in made_by and "not Wanda" in made_by and "has no samples" in made_by
    assert any("magnitude pruning" in s and "no samples" in s for s in said)
    with pytest.raises(ManifestError, match="Wanda pruning needs calibration samples"):
        make_variants(family, unstructured=[0.5], pruner="wanda")
    with pytest.raises(ValueError, match="pruner must be one of"):
        make_variants(family, unstructured=[0.5], pruner="sparsegpt")


def test_the_cli_chooses_the_pruner(tmp_path, capsys):
    from loom.cli import main

    family = _family(tmp_path)
    assert main(["variants", "make", str(family.root), "--unstructured", "40", "--pruner", "magnitude"]) == 0
    assert load_family(tmp_path).variant("unstructured-40-pt").made_by.startswith("loom: per-layer magnitude pruning")
    assert main(["variants", "make", str(family.root), "--unstructured", "40"]) == 0
    assert load_family(tmp_path).variant("unstructured-40-pt").made_by.startswith("loom: Wanda pruning")
    capsys.readouterr()
