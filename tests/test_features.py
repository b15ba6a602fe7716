"""Block and processor features on graphs whose numbers can be worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from estimators.features import (
    BLOCK_FEATURES,
    LATENCY_FEATURES,
    OP_VOCABULARY,
    PROCESSOR_FEATURES,
    FeatureSchemaError,
    block_features,
    latency_row,
    processor_features,
    schema_of,
    to_matrix,
)

ZOO = Path(__file__).resolve().parent.parent / "zoo"


def _model(nodes, inits, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # onnx 1.23 writes 14, which onnxruntime 1.31 refuses
    onnx.checker.check_model(model)
    return model


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = (rng.uniform(0.1, 1.0, (4, 3, 3, 3)) * rng.choice([-1, 1], (4, 3, 3, 3))).astype(np.float32)
    w.reshape(-1)[::2] = 0.0  # half the conv weights pruned, in every output channel
    return {
        "w": w,
        "b": rng.uniform(0.1, 1.0, 4).astype(np.float32),
        "fc_w": rng.uniform(0.1, 1.0, (5, 4)).astype(np.float32),
        "fc_b": rng.uniform(0.1, 1.0, 5).astype(np.float32),
    }


def _tail(x: str, w: dict[str, np.ndarray]) -> tuple[list, list]:
    """Relu -> GlobalAveragePool -> Flatten -> Gemm(5x4) -> Softmax, shared by the fp32 and int8 graphs."""
    nodes = [
        helper.make_node("Relu", [x], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"]),
    ]
    inits = [numpy_helper.from_array(w["fc_w"], "fc_w"), numpy_helper.from_array(w["fc_b"], "fc_b")]
    return nodes, inits


IO = (
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
    [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 5])],
)


def fp32_cnn() -> onnx.ModelProto:
    w = _weights()
    tail, tail_inits = _tail("c", w)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), *tail]
    inits = [numpy_helper.from_array(w["w"], "w"), numpy_helper.from_array(w["b"], "b"), *tail_inits]
    return _model(nodes, inits, *IO)


def qdq_cnn(*, weight_zero_point: int = 0) -> onnx.ModelProto:
    """The same CNN with its conv in QDQ int8 form, as onnxruntime's static quantizer writes it."""
    w = _weights()
    scale = np.abs(w["w"]).reshape(4, -1).max(axis=1) / 127
    if weight_zero_point:  # uint8 weights around a zero point: the zeros are the zero point
        q = np.round(w["w"] / scale[:, None, None, None]).astype(np.int32) + weight_zero_point
        wq = q.astype(np.uint8)
        wzp = np.full(4, weight_zero_point, np.uint8)
    else:
        wq = np.round(w["w"] / scale[:, None, None, None]).astype(np.int8)
        wzp = np.zeros(4, np.int8)
    bq = np.round(w["b"] / (scale * 0.05)).astype(np.int32)
    inits = [
        numpy_helper.from_array(np.float32(0.05), "x_scale"),
        numpy_helper.from_array(np.uint8(128), "x_zp"),
        numpy_helper.from_array(wq, "w_q"),
        numpy_helper.from_array(scale.astype(np.float32), "w_scale"),
        numpy_helper.from_array(wzp, "w_zp"),
        numpy_helper.from_array(bq, "b_q"),
        numpy_helper.from_array((scale * 0.05).astype(np.float32), "b_scale"),
    ]
    tail, tail_inits = _tail("c", w)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["wd"], axis=0),
        helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["bd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1]),
        *tail,
    ]
    return _model(nodes, inits + tail_inits, *IO)


def fp16_cnn() -> onnx.ModelProto:
    """fp16 weights, float32 at the inputs and outputs (keep_io_types), as onnxconverter writes it."""
    w = _weights()
    tail, _ = _tail("c32", w)
    inits = [numpy_helper.from_array(w[k].astype(np.float16), k) for k in ("w", "b")]
    inits += [numpy_helper.from_array(w[k].astype(np.float16), k + "16") for k in ("fc_w", "fc_b")]
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("Conv", ["x16", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["c"], ["c32"], to=TensorProto.FLOAT),
        # the tail reads float32 weights: cast the fp16 initializers (static: folded at load)
        helper.make_node("Cast", ["fc_w16"], ["fc_w"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["fc_b16"], ["fc_b"], to=TensorProto.FLOAT),
        *tail,
    ]
    return _model(nodes, inits, *IO)


# -- block features ------------------------------------------------------------------------------
def test_schema_is_fixed_and_ordered():
    f = block_features(fp32_cnn())
    assert list(f) == list(BLOCK_FEATURES)
    assert LATENCY_FEATURES == BLOCK_FEATURES + PROCESSOR_FEATURES
    assert len(set(LATENCY_FEATURES)) == len(LATENCY_FEATURES)
    assert [k for k in BLOCK_FEATURES if k.startswith("op_")] == [f"op_{o}" for o in OP_VOCABULARY] + ["op_other"]
    assert all(isinstance(v, float) for v in f.values())


def test_fp32_cnn_features_by_hand():
    f = block_features(fp32_cnn())
    conv = 1 * 4 * 8 * 8 * (3 * 3 * 3)  # output elements x (Cin x kh x kw)
    assert f["macs_conv"] == conv == 6912
    assert f["macs_matmul"] == 5 * 4  # Gemm [1,4] x [4,5]
    assert f["macs_other"] == 256 + 4 + 5  # Relu, GlobalAveragePool, Softmax (Flatten is a view)
    assert f["macs_total"] == 6912 + 20 + 265
    assert f["convert_elems"] == 0
    assert f["params"] == 108 + 4 + 20 + 5
    assert f["nonzero_params"] == 137 - 54
    assert f["sparsity"] == pytest.approx(54 / 137)
    assert f["weight_bytes"] == 137 * 4
    assert (f["prec_fp32"], f["prec_fp16"], f["prec_int8"]) == (1.0, 0.0, 0.0)
    assert f["act_in_bytes"] == 3 * 8 * 8 * 4  # symbolic batch counts as 1
    assert f["act_out_bytes"] == 5 * 4
    assert f["act_total_bytes"] == 4 * (256 + 256 + 4 + 4 + 5 + 5)
    assert f["n_nodes"] == 6
    hist = {k: v for k, v in f.items() if k.startswith("op_") and v}
    assert hist == {"op_Conv": 1, "op_Relu": 1, "op_Gemm": 1, "op_Softmax": 1, "op_other": 2}


def test_int8_qdq_block_has_the_macs_of_its_fp32_source():
    fp32, int8 = block_features(fp32_cnn()), block_features(qdq_cnn())
    for key in ("macs_conv", "macs_matmul", "macs_other", "macs_total", "params"):
        assert int8[key] == fp32[key], key
    # the activation's Quantize/Dequantize pair is conversion work; the weights' DQ is folded
    assert int8["convert_elems"] == 2 * 3 * 8 * 8
    assert int8["prec_int8"] == pytest.approx((108 + 4) / 137)  # int8 weights + int32 bias
    assert int8["prec_fp32"] == pytest.approx(25 / 137)
    assert int8["nonzero_params"] == fp32["nonzero_params"]  # pruned zeros stay zero after quantization
    assert int8["op_QuantizeLinear"] == 1 and int8["op_DequantizeLinear"] == 3
    assert int8["weight_bytes"] == 108 + 4 * 4 + 25 * 4


def test_sparsity_of_uint8_weights_counts_the_zero_point_as_zero():
    f = block_features(qdq_cnn(weight_zero_point=128))
    assert f["nonzero_params"] == 137 - 54
    assert f["sparsity"] == pytest.approx(54 / 137)


def test_fp16_block():
    f = block_features(fp16_cnn())
    assert f["macs_conv"] == 6912 and f["macs_total"] == 6912 + 20 + 265
    assert f["prec_fp16"] == 1.0 and f["prec_fp32"] == 0.0
    assert f["weight_bytes"] == 137 * 2
    assert f["convert_elems"] == 192 + 256  # the two activation casts; the weight casts fold
    assert f["op_Cast"] == 4


def test_transformer_ops_and_constant_weights():
    rng = np.random.default_rng(1)
    wq = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "wq")
    shape = numpy_helper.from_array(np.array([1, 4, 2, 4], np.int64), "shape")
    nodes = [
        helper.make_node("Constant", [], ["wk"], value=numpy_helper.from_array(np.eye(8, dtype=np.float32))),
        helper.make_node("LayerNormalization", ["x", "ln_s", "ln_b"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "wq"], ["q"]),
        helper.make_node("MatMul", ["q", "wk"], ["k"]),
        helper.make_node("Erf", ["k"], ["e"]),
        helper.make_node("Reshape", ["e", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
        helper.make_node("ReduceMean", ["t"], ["y"], axes=[3], keepdims=0),
    ]
    inits = [wq, shape, numpy_helper.from_array(np.ones(8, np.float32), "ln_s"),
             numpy_helper.from_array(np.zeros(8, np.float32), "ln_b")]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4])])
    f = block_features(model)
    assert f["macs_matmul"] == 2 * (4 * 8 * 8)
    assert f["macs_other"] == 32 + 32 + 32 + 8  # LayerNorm, Erf, Transpose, ReduceMean (Reshape is a view)
    # Constant-node weights are parameters; the int64 shape is not; eye(8) is 56 zeros out of 64
    assert f["params"] == 64 + 64 + 16
    assert f["nonzero_params"] == 64 + 8 + 8
    assert f["n_nodes"] == 7  # the Constant is not a kernel
    for op in ("LayerNormalization", "MatMul", "Erf", "Reshape", "Transpose", "ReduceMean"):
        assert f[f"op_{op}"] >= 1, op
    assert f["op_MatMul"] == 2 and f["op_other"] == 1  # Constant


@pytest.mark.parametrize("task", ["image-cls", "seq-cls", "signal-cls"])
def test_zoo_variants_share_their_matmul_work(task):
    """Real exports: int8 QDQ, fp16 and pruned variants do the dense model's conv/matmul work."""
    folder = ZOO / task
    if not (folder / "dense.onnx").is_file():
        pytest.skip("embedded zoo not present")
    feats = {v: block_features(onnx.load(str(folder / f"{v}.onnx"))) for v in ("dense", "int8", "fp16", "unstructured-80")}
    for v in ("int8", "fp16", "unstructured-80"):
        assert feats[v]["macs_conv"] == feats["dense"]["macs_conv"], v
        assert feats[v]["macs_matmul"] == feats["dense"]["macs_matmul"], v
    assert feats["int8"]["prec_int8"] > 0.9
    assert feats["fp16"]["prec_fp16"] > 0.9
    assert 0.7 < feats["unstructured-80"]["sparsity"] < 0.85


# -- processor features ----------------------------------------------------------------------------
def test_processor_features():
    ort = processor_features("cpu", "onnxruntime", {"intra_op_threads": 1})
    ov = processor_features("cpu", "openvino", {"precision": "f32", "threads": 2})
    npu = processor_features("npu", "qnn", {"peak_gops": 26000})
    for f in (ort, ov, npu):
        assert list(f) == list(PROCESSOR_FEATURES)
    assert ort["proc_kind_cpu"] == 1 and ort["proc_backend_onnxruntime"] == 1 and ort["proc_threads"] == 1
    assert ort["proc_precision_default"] == 1
    assert ov["proc_backend_openvino"] == 1 and ov["proc_precision_fp32"] == 1 and ov["proc_threads"] == 2
    assert npu["proc_kind_npu"] == 1 and npu["proc_backend_other"] == 1 and npu["proc_peak_gops"] == 26000
    assert math.isnan(ort["proc_peak_gops"]) and math.isnan(ort["proc_mem_gbps"])
    assert sum(v for k, v in ov.items() if k.startswith("proc_kind_")) == 1
    row = latency_row(block_features(fp32_cnn()), ort)
    assert list(row) == list(LATENCY_FEATURES)


# -- rows -> matrix ------------------------------------------------------------------------------------
def test_to_matrix_matches_names_and_reports_mismatches():
    names = ["a", "b", "c"]
    rows = [{"c": 3.0, "a": 1.0, "b": 2.0}]
    assert to_matrix(rows, names).tolist() == [[1.0, 2.0, 3.0]]
    arr = np.array([[3.0, 1.0, 2.0]])
    assert to_matrix(arr, names, given_names=["c", "a", "b"]).tolist() == [[1.0, 2.0, 3.0]]
    with pytest.raises(FeatureSchemaError) as err:
        to_matrix([{"a": 1.0, "b": 2.0, "d": 4.0}], names)
    assert err.value.missing == ["c"] and err.value.extra == ["d"]
    assert "missing: c" in str(err.value) and "extra: d" in str(err.value)
    with pytest.raises(FeatureSchemaError, match="2 columns"):
        to_matrix(np.zeros((1, 2)), names)
    with pytest.raises(FeatureSchemaError):
        schema_of([{"a": 1.0}, {"b": 1.0}])
    assert schema_of([{"z": 1.0, "a": 2.0}], known=["a"]) == ["a", "z"]
