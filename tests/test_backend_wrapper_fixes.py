"""Wrapper losses found by running onnx's node tests through the backends
(scripts/backend_conformance.py): one tiny model per bug, each something the engine
itself runs and the wrapper used to refuse or get wrong."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from backends.base import as_declared
from loom.core.errors import BackendError, ModelError, UnsupportedOpsError

ml_dtypes = pytest.importorskip("ml_dtypes")


def _model(nodes, inputs, outputs, opset=17, ir=8):
    graph = h.make_graph(nodes, "fix", inputs, outputs)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=ir)


def _vi(name, elem, shape):
    return h.make_tensor_value_info(name, elem, shape)


def _cast(to, opset=21, ir=10):
    return _model(
        [h.make_node("Cast", ["x"], ["y"], to=to)], [_vi("x", T.FLOAT, [4])], [_vi("y", to, [4])], opset, ir
    )


X4 = np.array([1.5, -2.25, 3.0, 6.0], np.float32)


# --- base.as_declared: bit containers read by bits ------------------------------------


def test_as_declared_reads_bf16_and_float8_containers_by_bits():
    bf16 = np.dtype(ml_dtypes.bfloat16)
    container = np.array([1.5, -2.25], bf16).view(np.uint16).view(np.float16)  # OpenVINO's
    assert as_declared(container, bf16).astype(np.float32).tolist() == [1.5, -2.25]
    f8 = np.dtype(ml_dtypes.float8_e4m3fn)
    bits = np.array([1.5, -2.25], f8).view(np.uint8)
    assert as_declared(bits, f8).astype(np.float32).tolist() == [1.5, -2.25]
    # a wider float holds the values themselves: converted by value
    assert as_declared(np.array([1.5], np.float32), bf16).astype(np.float32).tolist() == [1.5]


def test_as_declared_unpacks_4bit_types_or_refuses():
    packed = np.array([0xC3, 0x75], np.uint8)  # low nibble first: 3, 12, 5, 7
    f4 = as_declared(packed, np.dtype(ml_dtypes.float4_e2m1fn), [4])
    assert f4.astype(np.float32).tolist() == [1.5, -2.0, 3.0, 6.0]
    i4 = as_declared(packed.view(np.int8), np.dtype(ml_dtypes.int4), [2, 2])
    assert i4.shape == (2, 2) and i4.astype(np.int8).ravel().tolist() == [3, -4, 5, 7]
    with pytest.raises(BackendError, match="cannot be unpacked"):
        as_declared(packed, np.dtype(ml_dtypes.uint4))  # shape unknown: never guess


# --- onnxruntime -----------------------------------------------------------------------


def test_ort_failed_to_find_kernel_is_an_unsupported_op():
    pytest.importorskip("onnxruntime")
    from backends import get_backend
    from backends._ort_kernels import load_error

    message = (
        "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Failed to find kernel for Swish(24) "
        "(node:'' ep:'CPUExecutionProvider'). Kernel not found"
    )
    err = load_error("onnxruntime", "b", RuntimeError(message))
    assert isinstance(err, UnsupportedOpsError) and err.ops == ["Swish"]
    model = _model(  # no CPU kernel casts float16 to FLOAT4E2M1 (onnxruntime 1.32)
        [h.make_node("Cast", ["x"], ["y"], to=T.FLOAT4E2M1)],
        [_vi("x", T.FLOAT16, [4])], [_vi("y", T.FLOAT4E2M1, [4])], opset=23, ir=11,
    )  # fmt: skip
    try:
        get_backend("onnxruntime").load(model)
    except UnsupportedOpsError as exc:
        assert exc.ops == ["Cast"]
    except ModelError as exc:  # pragma: no cover - the bug
        pytest.fail(f"a missing kernel was filed as a bad model: {exc}")


# --- OpenVINO --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ov():
    pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino)")
    from backends import get_backend

    return get_backend("openvino")


def _run(backend, model, feeds):
    block = backend.load(model)
    try:
        return backend.run(block, feeds)
    finally:
        backend.release(block)


@pytest.mark.openvino
def test_openvino_pass_through_input_renamed_after_its_output(ov):
    # OpenVINO names the parameter x after the output y it flows into
    model = _model([h.make_node("Dropout", ["x"], ["y"])], [_vi("x", T.FLOAT, [2, 3])], [_vi("y", T.FLOAT, [2, 3])])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(_run(ov, model, {"x": x})["y"], x)


@pytest.mark.openvino
def test_openvino_unused_inputs_are_dropped_not_refused(ov):
    # an empty axes input (folded away) and CastLike's type source (only its type is read)
    model = _model(
        [
            h.make_node("ReduceSum", ["x", "axes"], ["r"], keepdims=1, noop_with_empty_axes=1),
            h.make_node("CastLike", ["x", "like"], ["c"]),
        ],
        [_vi("x", T.FLOAT, [2, 3]), _vi("axes", T.INT64, [0]), _vi("like", T.DOUBLE, [1])],
        [_vi("r", T.FLOAT, [2, 3]), _vi("c", T.DOUBLE, [2, 3])],
        opset=18,
    )
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    feeds = {"x": x, "axes": np.zeros(0, np.int64), "like": np.zeros(1, np.float64)}
    out = _run(ov, model, feeds)
    np.testing.assert_array_equal(out["r"], x)
    assert out["c"].dtype == np.float64
    np.testing.assert_array_equal(out["c"], x.astype(np.float64))


@pytest.mark.openvino
@pytest.mark.parametrize(
    "to, dtype",
    [(T.BFLOAT16, "bfloat16"), (T.FLOAT8E4M3FN, "float8_e4m3fn"), (T.FLOAT8E5M2, "float8_e5m2")],
)
def test_openvino_low_precision_outputs_keep_their_values(ov, to, dtype):
    want = np.dtype(getattr(ml_dtypes, dtype))
    got = _run(ov, _cast(to), {"x": X4})["y"]
    assert got.dtype == want
    assert got.astype(np.float32).tolist() == X4.astype(want).astype(np.float32).tolist()


@pytest.mark.openvino
def test_openvino_4bit_outputs_are_unpacked(ov):
    got = _run(ov, _cast(T.INT4, opset=21, ir=10), {"x": X4})["y"]
    assert got.shape == (4,) and got.astype(np.int8).tolist() == [2, -2, 3, 6]


@pytest.mark.openvino
def test_openvino_unsupported_ops_answers_for_unreadable_models(ov):
    fnuz = _model(  # a type the frontend cannot read at all: one entry saying so
        [h.make_node("Identity", ["x"], ["y"])],
        [_vi("x", T.FLOAT8E4M3FNUZ, [4])], [_vi("y", T.FLOAT8E4M3FNUZ, [4])], opset=21, ir=10,
    )  # fmt: skip
    ops = ov.unsupported_ops(fnuz)
    assert len(ops) == 1 and "FLOAT8E4M3FNUZ" in ops[0], ops
    assert ov.unsupported_ops(_cast(T.FLOAT8E4M3FNUZ)) == ["Cast"]  # found by partial conversion
    seq = _model(  # sequence ops: "No conversion rule found for operations: util::..."
        [h.make_node("SequenceConstruct", ["x"], ["s"]), h.make_node("SequenceAt", ["s", "i"], ["y"])],
        [_vi("x", T.FLOAT, [2]), _vi("i", T.INT64, [])], [_vi("y", T.FLOAT, [2])],
    )  # fmt: skip
    assert isinstance(ov.unsupported_ops(seq), list)


# --- TVM -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tvm_backend(tmp_path_factory):
    pytest.importorskip("tvm", reason="tvm is not installed (pip install 'sparseloom[tvm]')")
    from backends import get_backend

    return get_backend("tvm", cache_dir=str(tmp_path_factory.mktemp("tvm-cache")))


def test_tvm_scalar_inputs_stay_scalars(tvm_backend):
    model = _model([h.make_node("Add", ["a", "b"], ["c"])], [_vi("a", T.FLOAT, []), _vi("b", T.FLOAT, [])], [_vi("c", T.FLOAT, [])])
    out = _run(tvm_backend, model, {"a": np.array(1.5, np.float32), "b": np.array(2.0, np.float32)})
    assert out["c"].shape == () and float(out["c"]) == 3.5


def test_tvm_shape_and_size_outputs(tvm_backend):
    model = _model(
        [h.make_node("Shape", ["x"], ["s"]), h.make_node("Size", ["x"], ["n"])],
        [_vi("x", T.FLOAT, [2, 3])], [_vi("s", T.INT64, [2]), _vi("n", T.INT64, [])],
    )  # fmt: skip
    out = _run(tvm_backend, model, {"x": np.zeros((2, 3), np.float32)})
    assert out["s"].dtype == np.int64 and out["s"].tolist() == [2, 3]
    assert out["n"].shape == () and int(out["n"]) == 6


@pytest.mark.openvino
def test_openvino_renamed_input_beside_named_ones(ov):
    # x is renamed after y; a and b keep their names: x must still reach its own port
    model = _model(
        [h.make_node("Identity", ["x"], ["y"]), h.make_node("Add", ["a", "b"], ["c"])],
        [_vi("a", T.FLOAT, [2]), _vi("x", T.FLOAT, [3]), _vi("b", T.FLOAT, [2])],
        [_vi("y", T.FLOAT, [3]), _vi("c", T.FLOAT, [2])],
    )
    feeds = {"a": np.ones(2, np.float32), "x": np.arange(3, dtype=np.float32), "b": np.ones(2, np.float32)}
    out = _run(ov, model, feeds)
    np.testing.assert_array_equal(out["y"], feeds["x"])
    np.testing.assert_array_equal(out["c"], [2.0, 2.0])
