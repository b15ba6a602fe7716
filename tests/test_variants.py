"""Variant generation: sparsity reached, channels really removed, cuts kept float."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from synth import residual_cnn

from loom.core.errors import ModelError
from loom.core.onnxutil import infer_shapes, load_model
from loom.model.variants import (
    channel_groups,
    convert_fp16,
    preserved_tensors,
    prune_structured,
    prune_unstructured,
    quantize_int8,
    weight_sparsity,
)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


X = np.random.default_rng(3).standard_normal((16, 1, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_unstructured_reaches_sparsity(sparsity):
    pruned = prune_unstructured(residual_cnn(), sparsity)
    assert weight_sparsity(pruned) == pytest.approx(sparsity, abs=0.02)
    assert run(pruned, X).shape == (16, 5)


def test_structured_groups_are_the_internal_convs():
    model = residual_cnn(blocks=3)
    groups = channel_groups(model)
    producers = sorted(model.graph.node[g.producer].name for g in groups)
    # only each block's first conv feeds nothing but another conv; block outputs feed adds
    assert producers == ["b0.c1", "b1.c1", "b2.c1"]


def test_structured_removal_is_exact_for_zeroed_channels():
    """Zero half the internal channels by hand; removing them must not change the outputs."""
    model = residual_cnn()
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for t in zeroed.graph.initializer:
        if t.name.endswith(".c1.w") or t.name.endswith(".c1.b"):
            a = numpy_helper.to_array(t).copy()
            a[::2] = 0
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    pruned, groups = prune_structured(zeroed, 0.5)
    assert groups == 3
    shapes = infer_shapes(pruned)
    assert shapes["b0.r1"][0][1] == 4  # channels really removed inside the block
    assert shapes["b0.out"][0][1] == 8  # the block output (a cut) keeps its shape
    assert len(pruned.SerializeToString()) < len(zeroed.SerializeToString())
    np.testing.assert_allclose(run(pruned, X), run(zeroed, X), atol=1e-5)


def test_preserved_tensors_are_post_activation_cuts():
    assert preserved_tensors(residual_cnn()) == ["b0.out", "b1.out", "b2.out", "flat", "pool", "stem_relu"]


def test_int8_keeps_cut_tensors_float_and_named():
    model = residual_cnn()
    keep = preserved_tensors(model)
    q = quantize_int8(model, X, preserve=keep)
    ops = {n.op_type for n in q.graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    writers = {o: n for n in q.graph.node for o in n.output}
    for t in keep:
        assert t in writers, f"{t} vanished from the int8 model"
        assert writers[t].op_type not in ("QuantizeLinear", "DequantizeLinear")
    assert np.mean(run(q, X).argmax(-1) == run(model, X).argmax(-1)) >= 0.8


def test_fp16_has_float32_at_cuts():
    model = residual_cnn()
    keep = preserved_tensors(model)
    h = convert_fp16(model, preserve=keep)
    shapes = infer_shapes(h)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in h.graph.initializer)
    for t in keep:
        assert shapes[t][1] == onnx.TensorProto.FLOAT, t
    np.testing.assert_allclose(run(h, X), run(model, X), atol=5e-2)


def test_malformed_onnx_is_a_model_error(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07this is not protobuf\xff\xff")
    with pytest.raises(ModelError, match="broken.onnx"):
        load_model(bad)
    with pytest.raises(ModelError, match="no such ONNX file"):
        load_model(tmp_path / "absent.onnx")


def test_checker_failure_names_file(tmp_path):
    model = residual_cnn()
    model.graph.node[1].input[0] = "nonexistent_tensor"
    path = tmp_path / "dangling.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelError, match="dangling.onnx: fails the ONNX checker"):
        load_model(path)


def test_sparsity_bounds():
    with pytest.raises(ValueError):
        prune_unstructured(residual_cnn(), 1.0)
    with pytest.raises(ValueError):
        prune_structured(residual_cnn(), -0.1)
