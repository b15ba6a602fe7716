"""Features of blocks and processors, computed from the ONNX file and the profile alone.

Every feature is a property of the block's graph or of the processor's description,
never an id seen in training, so unmeasured blocks and tasks can be predicted. Rows
are ``dict[str, float]``; matrices follow a fixed *feature schema* (``BLOCK_FEATURES``,
``PROCESSOR_FEATURES``, ``LATENCY_FEATURES``) and a mismatch raises
``FeatureSchemaError``. What each feature counts: ``docs/estimators.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from loom.core.errors import LoomError
from loom.core.onnxutil import concrete, infer_shapes, node_inputs, node_macs


class FeatureSchemaError(LoomError, ValueError):
    """Rows do not match an estimator's feature schema. Names every missing and extra feature."""

    def __init__(self, message: str, *, missing: Sequence[str] = (), extra: Sequence[str] = ()) -> None:
        self.missing = list(missing)
        self.extra = list(extra)
        parts = [message]
        if self.missing:
            parts.append(f"missing: {', '.join(self.missing)}")
        if self.extra:
            parts.append(f"extra: {', '.join(self.extra)}")
        super().__init__("; ".join(parts))


# -- schemas ------------------------------------------------------------------------------
#: Op types with their own histogram column (in this order); all others count as op_other.
OP_VOCABULARY: tuple[str, ...] = (
    "Conv", "MatMul", "Gemm", "Add", "Mul", "Relu", "Softmax", "LayerNormalization", "Erf",
    "Transpose", "Reshape", "QuantizeLinear", "DequantizeLinear", "Cast", "ReduceMean",
)
#: quantized and fused forms counted under their float family in the histogram
OP_ALIASES: dict[str, str] = {
    "ConvInteger": "Conv", "QLinearConv": "Conv",
    "MatMulInteger": "MatMul", "QLinearMatMul": "MatMul", "FusedMatMul": "MatMul",
}

CONV_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv"})
MATMUL_OPS = frozenset({"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "FusedMatMul"})
CONVERT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast"})
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Constant"})

#: Block features, in schema order.
BLOCK_FEATURES: tuple[str, ...] = (
    "macs_total", "macs_conv", "macs_matmul", "macs_other", "convert_elems",
    "params", "nonzero_params", "sparsity", "weight_bytes",
    "prec_fp32", "prec_fp16", "prec_int8",
    "act_in_bytes", "act_out_bytes", "act_total_bytes",
    "n_nodes",
    *(f"op_{op}" for op in OP_VOCABULARY), "op_other",
)

PROCESSOR_KINDS: tuple[str, ...] = ("cpu", "gpu", "npu")
PROCESSOR_BACKENDS: tuple[str, ...] = ("onnxruntime", "openvino", "tvm", "tensorrt")
PRECISION_HINTS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")

#: Processor features, in schema order. ``proc_peak_gops`` and ``proc_mem_gbps`` are NaN
#: (missing, which XGBoost handles natively) unless the profile states them; they are
#: what lets one model cover processors of the same kind and engine on different chips.
PROCESSOR_FEATURES: tuple[str, ...] = (
    *(f"proc_kind_{k}" for k in PROCESSOR_KINDS), "proc_kind_other",
    *(f"proc_backend_{b}" for b in PROCESSOR_BACKENDS), "proc_backend_other",
    "proc_threads",
    *(f"proc_precision_{p}" for p in PRECISION_HINTS), "proc_precision_default",
    "proc_peak_gops", "proc_mem_gbps",
)

#: What the latency estimator reads: a block on a processor.
LATENCY_FEATURES: tuple[str, ...] = BLOCK_FEATURES + PROCESSOR_FEATURES


# -- block features -------------------------------------------------------------------------
_FLOAT32_UP = {TensorProto.FLOAT, TensorProto.DOUBLE}
_FLOAT16 = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
_INT_LOW = {
    TensorProto.INT8, TensorProto.UINT8,
    *(getattr(TensorProto, n) for n in ("INT4", "UINT4") if hasattr(TensorProto, n)),
}
_ELEM_BYTES = {
    TensorProto.FLOAT: 4, TensorProto.DOUBLE: 8, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2,
    TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.INT16: 2, TensorProto.UINT16: 2,
    TensorProto.INT32: 4, TensorProto.UINT32: 4, TensorProto.INT64: 8, TensorProto.UINT64: 8,
    TensorProto.BOOL: 1,
}
#: (op type, input index) pairs that are quantization parameters, not weights
_QPARAM_INPUTS: dict[str, tuple[int, ...]] = {
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2),
    "QLinearConv": (1, 2, 4, 5, 6, 7), "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "ConvInteger": (2, 3), "MatMulInteger": (2, 3),
}


def _elem_bytes(elem_type: int) -> float:
    if elem_type in (getattr(TensorProto, "INT4", -1), getattr(TensorProto, "UINT4", -1)):
        return 0.5
    return float(_ELEM_BYTES.get(elem_type, 4))


def _constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant nodes' ``value`` tensors, by name."""
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and node.output:
                    out[node.output[0]] = attr.t
    return out


def _static_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors computable from constants alone (engines fold them at load time)."""
    static = {t.name for t in graph.initializer}
    changed = True
    nodes = list(graph.node)
    while changed:  # a few passes: the file's node order need not be topological
        changed = False
        for node in nodes:
            outs = [o for o in node.output if o]
            if outs and not set(outs) <= static and all(x in static for x in node_inputs(node)):
                static.update(outs)
                changed = True
    return static


def _weight_stats(graph: onnx.GraphProto) -> dict[str, float]:
    consts = _constant_tensors(graph)
    qparams: set[str] = set()
    zero_points: dict[str, tuple[str, int]] = {}  # quantized weight -> (zero point tensor, axis)
    dequantized: set[str] = set()  # int32 biases of QDQ models are weights too
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input:
            dequantized.add(node.input[0])
        for i in _QPARAM_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i]:
                qparams.add(node.input[i])
        if node.op_type == "DequantizeLinear" and len(node.input) > 2 and node.input[2]:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            zero_points[node.input[0]] = (node.input[2], axis)
    params = nonzero = 0
    by_prec = {"fp32": 0, "fp16": 0, "int8": 0}
    weight_bytes = 0.0
    for name, tensor in consts.items():
        if name in qparams:
            continue
        dt = tensor.data_type
        if dt in _FLOAT32_UP:
            prec = "fp32"
        elif dt in _FLOAT16:
            prec = "fp16"
        elif dt in _INT_LOW or (dt == TensorProto.INT32 and name in dequantized):
            prec = "int8"
        else:
            continue  # int32/int64/bool: shapes, indices, masks
        arr = numpy_helper.to_array(tensor)
        n = int(arr.size)
        if n == 0:
            continue
        zero = 0
        if name in zero_points and zero_points[name][0] in consts:
            zp = numpy_helper.to_array(consts[zero_points[name][0]])
            if zp.ndim == 1 and arr.ndim > 1 and zp.size == arr.shape[zero_points[name][1] % arr.ndim]:
                shape = [1] * arr.ndim
                shape[zero_points[name][1] % arr.ndim] = zp.size
                zp = zp.reshape(shape)
            zero = zp
        params += n
        nonzero += int(np.count_nonzero(arr.astype(np.int64) != zero if prec == "int8" else arr != 0))
        by_prec[prec] += n
        weight_bytes += n * _elem_bytes(dt)
    return {
        "params": float(params),
        "nonzero_params": float(nonzero),
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "weight_bytes": weight_bytes,
        "prec_fp32": by_prec["fp32"] / params if params else 0.0,
        "prec_fp16": by_prec["fp16"] / params if params else 0.0,
        "prec_int8": by_prec["int8"] / params if params else 0.0,
    }


def _tensor_bytes(name: str, shapes: Mapping[str, tuple[list, int]]) -> float:
    if name not in shapes:
        return 0.0
    dims, elem = shapes[name]
    return float(np.prod(concrete(dims), dtype=np.float64)) * _elem_bytes(elem)


def block_features(model: onnx.ModelProto) -> dict[str, float]:
    """Features of one block (or any ONNX model), keys in ``BLOCK_FEATURES`` order.

    Pure function of the graph: a few milliseconds for the zoo's blocks, dominated by
    shape inference. Each feature is defined in ``docs/estimators.md``.
    """
    graph = model.graph
    shapes = infer_shapes(model)
    static = _static_tensors(graph)
    f = dict.fromkeys(BLOCK_FEATURES, 0.0)
    for node in graph.node:
        op = node.op_type
        hist = OP_ALIASES.get(op, op)
        key = f"op_{hist}" if hist in OP_VOCABULARY else "op_other"
        f[key] += 1.0
        if op != "Constant":
            f["n_nodes"] += 1.0
        outs = [o for o in node.output if o]
        if not outs or set(outs) <= static:
            continue  # folded at load time
        f["act_total_bytes"] += sum(_tensor_bytes(o, shapes) for o in outs)
        if op in CONVERT_OPS:
            dims = shapes.get(outs[0], ([], 0))[0]
            f["convert_elems"] += float(np.prod(concrete(dims), dtype=np.float64)) if dims else 0.0
            continue
        if op in VIEW_OPS:
            continue
        macs = float(node_macs(node, shapes))
        if op in CONV_OPS:
            f["macs_conv"] += macs
        elif op in MATMUL_OPS:
            f["macs_matmul"] += macs
        else:
            f["macs_other"] += macs
    f["macs_total"] = f["macs_conv"] + f["macs_matmul"] + f["macs_other"]
    f.update(_weight_stats(graph))
    inits = {t.name for t in graph.initializer}
    f["act_in_bytes"] = sum(_tensor_bytes(i.name, shapes) for i in graph.input if i.name not in inits)
    f["act_out_bytes"] = sum(_tensor_bytes(o.name, shapes) for o in graph.output)
    return {k: float(f[k]) for k in BLOCK_FEATURES}


# -- processor features -------------------------------------------------------------------------
_THREAD_KEYS = ("threads", "intra_op_threads", "intra_op_num_threads", "num_threads",
                "INFERENCE_NUM_THREADS", "inference_num_threads")
_PRECISION_KEYS = ("precision", "precision_hint", "inference_precision", "INFERENCE_PRECISION_HINT")
_PRECISION_ALIASES = {
    "f32": "fp32", "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "f16": "fp16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
    "i8": "int8", "int8": "int8", "u8": "int8",
}
_BACKEND_ALIASES = {"ort": "onnxruntime", "onnxruntime": "onnxruntime", "openvino": "openvino",
                    "ov": "openvino", "tvm": "tvm", "tensorrt": "tensorrt", "trt": "tensorrt"}


def processor_features(kind: str, backend: str, options: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Features of a processor from its device-profile entry, keys in ``PROCESSOR_FEATURES`` order.

    ``options`` are the backend options of the profile (``threads``/``intra_op_threads``,
    ``precision``: ``f32``, ``fp16``, ...); ``peak_gops`` and ``mem_gbps`` are read when
    present (a datasheet figure) and are missing values otherwise. Unknown kinds and
    backends fall in the ``other`` columns rather than failing: a profile of a new chip
    should still get a (less informed) prediction.
    """
    options = dict(options or {})
    f = dict.fromkeys(PROCESSOR_FEATURES, 0.0)
    k = kind.lower()
    f[f"proc_kind_{k}" if k in PROCESSOR_KINDS else "proc_kind_other"] = 1.0
    b = _BACKEND_ALIASES.get(backend.lower(), "other")
    f[f"proc_backend_{b}" if b in PROCESSOR_BACKENDS else "proc_backend_other"] = 1.0
    threads = next((options[key] for key in _THREAD_KEYS if options.get(key) is not None), 1)
    f["proc_threads"] = float(threads)
    hint = next((str(options[key]).lower() for key in _PRECISION_KEYS if options.get(key) is not None), None)
    p = _PRECISION_ALIASES.get(hint or "", "default")
    f[f"proc_precision_{p}"] = 1.0
    for key, name in (("peak_gops", "proc_peak_gops"), ("mem_gbps", "proc_mem_gbps")):
        value = options.get(key)
        f[name] = float(value) if value is not None else math.nan
    return f


def latency_row(block: Mapping[str, float], processor: Mapping[str, float]) -> dict[str, float]:
    """One row of the latency estimator: a block's features and a processor's, in schema order."""
    row = {**block, **processor}
    ordered = {k: row[k] for k in LATENCY_FEATURES if k in row}
    ordered.update((k, v) for k, v in row.items() if k not in ordered)  # caller's extras last
    return ordered


# -- rows -> matrix -------------------------------------------------------------------------------
def schema_of(rows: Sequence[Mapping[str, float]], *, known: Sequence[str] = ()) -> list[str]:
    """The schema of dict rows: names of ``known`` first (in that order), then the rest in first-seen order.

    Every row must have the same keys: a feature missing from some rows is a bug in
    whoever built them, not a missing value (use NaN for that).
    """
    if not rows:
        raise FeatureSchemaError("no rows to learn a feature schema from")
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    order = [k for k in known if k in seen] + [k for k in seen if k not in set(known)]
    for i, row in enumerate(rows):
        if len(row) != len(order):
            raise FeatureSchemaError(f"row {i} lacks features the other rows have",
                                     missing=[k for k in order if k not in row])
    return order


def check_names(expected: Sequence[str], got: Sequence[str], *, what: str = "features") -> None:
    """Raise ``FeatureSchemaError`` naming the missing and extra names (order is checked by callers)."""
    exp, have = list(expected), list(got)
    missing = [k for k in exp if k not in set(have)]
    extra = [k for k in have if k not in set(exp)]
    if missing or extra:
        raise FeatureSchemaError(f"{what} do not match the estimator's schema of {len(exp)} features",
                                 missing=missing, extra=extra)
    if len(set(have)) != len(have):
        dupes = sorted({k for k in have if have.count(k) > 1})
        raise FeatureSchemaError(f"{what} repeat names: {', '.join(dupes)}")


def to_matrix(
    X: Any,
    feature_names: Sequence[str],
    *,
    given_names: Sequence[str] | None = None,
) -> np.ndarray:
    """``X`` as a float matrix whose columns follow ``feature_names``.

    ``X`` may be a sequence of dict rows (matched by name), a DataFrame-like object
    with ``columns`` (matched by name), or a 2-D array whose columns are
    ``given_names`` (matched by name, reordered when needed) or, without names,
    assumed to be in schema order (only the count can be checked then).
    """
    names = list(feature_names)
    if isinstance(X, Mapping):
        X = [X]
    elif isinstance(X, Iterator):
        X = list(X)
    if isinstance(X, Sequence) and not isinstance(X, np.ndarray) and X and isinstance(X[0], Mapping):
        rows: Sequence[Mapping[str, float]] = X  # type: ignore[assignment]
        for i, row in enumerate(rows):
            if len(row) != len(names) or any(k not in row for k in names):
                check_names(names, list(row), what=f"row {i}'s features")
        return np.array([[float(row[k]) for k in names] for row in rows], dtype=np.float64)
    if hasattr(X, "columns") and given_names is None:
        given_names = [str(c) for c in X.columns]
        X = np.asarray(X, dtype=np.float64)
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 0:
        return arr.reshape(0, len(names))
    if arr.ndim != 2:
        raise FeatureSchemaError(f"expected a 2-D feature matrix, got an array of shape {arr.shape}")
    if given_names is not None:
        given = list(given_names)
        if len(given) != arr.shape[1]:
            raise FeatureSchemaError(f"{len(given)} feature names for a matrix of {arr.shape[1]} columns")
        check_names(names, given)
        if given != names:
            arr = arr[:, [given.index(k) for k in names]]
        return arr
    if arr.shape[1] != len(names):
        raise FeatureSchemaError(
            f"the matrix has {arr.shape[1]} columns, the estimator's schema has {len(names)} "
            f"(pass feature_names= or dict rows to see which differ)"
        )
    return arr


def rows_to_matrix(rows: Iterable[Mapping[str, float]], feature_names: Sequence[str]) -> np.ndarray:
    """Dict rows as a matrix in ``feature_names`` order (shorthand for ``to_matrix``)."""
    return to_matrix(list(rows), feature_names)
