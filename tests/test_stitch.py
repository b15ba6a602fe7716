"""Stitched configs: chained and merged give the same outputs; accuracy is measured right."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from backends import get_backend
from loom.core.errors import ManifestError
from loom.core.onnxutil import load_model
from loom.core.runref import run_batched, session
from loom.model.stitch import StitchedModel, evaluate_config, evaluate_configs, merge_config

MIXED = [
    ("dense", "unstructured-50-pt", "structured-25-pt"),
    ("int8", "dense", "fp16"),
    ("structured-25-pt", "int8", "unstructured-50-pt"),
    ("fp16", "fp16", "int8"),
]


@pytest.mark.parametrize("config", MIXED)
def test_chained_and_merged_agree(synth_partition, synth_family, config):
    x, _ = synth_family.eval_data()
    with StitchedModel(synth_partition, config) as chain:
        chained = chain.run({"input": x})["logits"]
    merged = run_batched(session(merge_config(synth_partition, config), name="merged"), {"input": x})["logits"]
    tol = 1e-5 if not {"int8", "fp16"} & set(config) else 5e-2 * np.abs(chained).max()
    np.testing.assert_allclose(merged, chained, atol=tol)
    assert (merged.argmax(-1) == chained.argmax(-1)).mean() >= 0.97


def test_uniform_config_equals_the_variant(synth_partition, synth_family):
    x, _ = synth_family.eval_data()
    full = run_batched(session(load_model(synth_family.variant_path("dense")), name="d"), {"input": x})["logits"]
    merged = run_batched(session(merge_config(synth_partition, ["dense"] * 3), name="m"), {"input": x})["logits"]
    np.testing.assert_allclose(merged, full, atol=1e-5)


def test_accuracy_of_configs(synth_partition, synth_family):
    configs = list(itertools.product(["dense", "int8", "structured-25-pt"], repeat=3))
    many = evaluate_configs(synth_partition, configs, synth_family)
    assert many[("dense",) * 3] == 1.0  # the synthetic labels are the dense model's predictions
    for c in [("dense",) * 3, *configs[5:8]]:
        assert evaluate_config(synth_partition, c, synth_family) == pytest.approx(many[c])
        assert evaluate_config(synth_partition, c, synth_family, merged=False) == pytest.approx(many[c])


def test_accuracy_against_hand_count(synth_partition, synth_family):
    x, y = synth_family.eval_data()
    config = ("structured-25-pt", "dense", "int8")
    logits = run_batched(session(merge_config(synth_partition, config), name="m"), {"input": x})["logits"]
    by_hand = sum(int(a == b) for a, b in zip(logits.argmax(-1), y, strict=True)) / len(y)
    assert evaluate_config(synth_partition, config, synth_family) == pytest.approx(by_hand)


def test_bad_configs(synth_partition):
    with pytest.raises(ManifestError, match="has 2 slot"):
        StitchedModel(synth_partition, ["dense", "dense"])
    with pytest.raises(ManifestError, match=r"unknown variant\(s\) \['nope'\]"):
        merge_config(synth_partition, ["dense", "nope", "dense"])


def test_chain_across_two_backends(synth_partition, synth_family):
    """A chain can span processors: slots on onnxruntime and OpenVINO (f32) agree."""
    pytest.importorskip("openvino", reason="openvino is not installed")
    x, _ = synth_family.eval_data(16)
    ort_b = get_backend("onnxruntime")
    ov_b = get_backend("openvino", precision="f32")
    config = ("dense", "unstructured-50-pt", "dense")
    with StitchedModel(synth_partition, config, backends=[ort_b, ov_b, ort_b]) as mixed, \
            StitchedModel(synth_partition, config, backends=ort_b) as plain:
        np.testing.assert_allclose(mixed.run({"input": x})["logits"], plain.run({"input": x})["logits"], atol=1e-4)


def test_evaluation_threads_apply_only_inside_and_only_by_default():
    import onnx
    from onnx import TensorProto, helper

    from loom.core.runref import evaluation_threads, session

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)

    def threads(**kw):
        return session(m, name="relu", **kw).get_session_options().intra_op_num_threads

    assert threads() == 1
    with evaluation_threads(2):
        assert threads() == 2 and threads(threads=1) == 1
    assert threads() == 1
