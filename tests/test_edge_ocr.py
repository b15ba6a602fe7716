"""The edge zoo's OCR task machinery on a small plain conv chain (no download).

The real task (PP-OCRv4 recognition on rendered words) is built by ``scripts/edge_ocr.py``;
these tests check what it relies on: structured pruning that slices channel groups and
really removes weights, leaves the groups of the chosen cut anchors whole (a backbone
without residual adds has its block outputs as its only cuts), and keeps the function
close when nothing is dropped; and greedy CTC decoding that agrees with the library's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
pytest.importorskip("PIL")

import edge_ocr as eo  # noqa: E402

from loom.model.scoring import ctc_accuracy  # noqa: E402


def chain(width: int = 16, blocks: int = 4, seed: int = 0) -> onnx.ModelProto:
    """pointwise -> hardswish -> depthwise -> ..., like PP-LCNet's plain stages, then a pooled head."""
    rng = np.random.default_rng(seed)
    inits, nodes, x, cin = [], [], "x", 3
    for b in range(blocks):
        inits += [numpy_helper.from_array((rng.standard_normal((width, cin, 1, 1)) / np.sqrt(cin)).astype(np.float32), f"pw{b}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(width)).astype(np.float32), f"pb{b}"),
                  numpy_helper.from_array(rng.standard_normal((width, 1, 3, 3)).astype(np.float32) / 3, f"dw{b}")]
        nodes += [helper.make_node("Conv", [x, f"pw{b}", f"pb{b}"], [f"p{b}"], name=f"pw{b}"),
                  helper.make_node("HardSwish", [f"p{b}"], [f"h{b}"], name=f"hs{b}"),
                  helper.make_node("Conv", [f"h{b}", f"dw{b}"], [f"d{b}"], group=width, pads=[1, 1, 1, 1], name=f"dw{b}")]
        x, cin = f"d{b}", width
    inits.append(numpy_helper.from_array((rng.standard_normal((width, 5)) / 4).astype(np.float32), "head"))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pool"], name="gap"),
              helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
              helper.make_node("MatMul", ["flat", "head"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_structured_pruning_removes_channels_but_not_at_the_anchors() -> None:
    model = chain()
    assert len(eo.structured_groups(model)) == 3  # pw1..pw3 read the previous block; pw0's group feeds pw1
    anchors = eo.cut_anchors(model, shares=(0.5,))
    pruned, report = eo.prune_structured(model, 0.25, keep_whole=anchors)
    assert report["groups"] == 2 and report["conv_channels"] == 2 * 4
    assert eo.parameters(pruned) < eo.parameters(model) and eo.macs(pruned) < eo.macs(model)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in onnx.shape_inference.infer_shapes(pruned).graph.value_info}
    assert shapes[anchors[0]][1] == 16  # the anchor keeps its width: every variant can be cut there
    x = np.random.default_rng(1).random((2, 3, 8, 8), dtype=np.float32)
    assert run(pruned, x).shape == (2, 5)


def test_dropping_nothing_is_the_same_function() -> None:
    model = chain()
    same, report = eo.prune_structured(model, 0.0)
    x = np.random.default_rng(1).random((2, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(run(same, x), run(model, x), rtol=1e-5, atol=1e-5)
    assert report["conv_channels"] == 0


def test_builder_scores_agree_with_the_library() -> None:
    rng = np.random.default_rng(0)
    probs = rng.random((20, 12, 7)).astype(np.float32)
    y = np.full((20, 5), -1, dtype=np.int64)
    for i, seq in enumerate(eo.ctc_greedy(probs)):
        row = list(seq[:5]) if i % 3 else [1, 2]  # two thirds exact, the rest wrong
        y[i, :len(row)] = row
    exact, chars = eo.ocr_scores(probs, y)
    assert (exact, chars) == pytest.approx(ctc_accuracy(probs, y))
