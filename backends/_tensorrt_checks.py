"""What the TensorRT backend checks without TensorRT or a GPU: options, shapes, quantization.

Pure functions of a device profile's options and a block's ONNX graph, so that a profile
of another machine (a Jetson's, on a laptop) is checked here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.base import subgraphs
from loom.core.errors import ModelError

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

#: keyword-only options and their defaults (``option_problems`` validates a profile's
#: options against these without TensorRT being here)
OPTION_DEFAULTS: dict[str, Any] = {
    "fp16": False,
    "int8": False,
    "dla_core": None,
    "workspace_mb": None,
    "engine_cache_dir": None,
    "timing_cache": None,
    "device_id": 0,
    "opt_batch": 1,
    "max_batch": 8,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(
    *,
    fp16: Any = False,
    int8: Any = False,
    dla_core: Any = None,
    workspace_mb: Any = None,
    engine_cache_dir: Any = None,
    timing_cache: Any = None,
    device_id: Any = 0,
    opt_batch: Any = 1,
    max_batch: Any = 8,
) -> list[str]:
    """Every malformed option, as ``name: why`` (empty when all are well formed).

    Form only, so a device profile of another machine is checked here: whether the GPU,
    the DLA core or TensorRT exist is a question for the machine that runs it.
    """
    problems: list[str] = []
    for name, value in (("fp16", fp16), ("int8", int8)):
        if not isinstance(value, bool):
            problems.append(f"{name}: true or false, got {value!r}")
    if dla_core is not None and not (_is_int(dla_core) and dla_core >= 0):
        problems.append(f"dla_core: a DLA core index (0, 1, ...) or null, got {dla_core!r}")
    if workspace_mb is not None and not (_is_int(workspace_mb) and workspace_mb >= 1):
        problems.append(f"workspace_mb: a size in MiB >= 1 or null (TensorRT's default), got {workspace_mb!r}")
    if not (_is_int(device_id) and device_id >= 0):
        problems.append(f"device_id: a CUDA device index (0, 1, ...), got {device_id!r}")
    batches_ok = True
    for name, value in (("opt_batch", opt_batch), ("max_batch", max_batch)):
        if not (_is_int(value) and value >= 1):
            problems.append(f"{name}: an integer >= 1, got {value!r}")
            batches_ok = False
    if batches_ok and opt_batch > max_batch:
        problems.append(f"opt_batch: {opt_batch} is above max_batch {max_batch}")
    for name, value in (("engine_cache_dir", engine_cache_dir), ("timing_cache", timing_cache)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            problems.append(f"{name}: a path or null, got {value!r}")
    return problems


def path_problems(engine_cache_dir: Any, timing_cache: Any) -> list[str]:
    """The cache paths against this machine's files (checked when the backend is made here)."""
    problems: list[str] = []
    if engine_cache_dir is not None and Path(engine_cache_dir).is_file():
        problems.append(f"engine_cache_dir: {engine_cache_dir} is a file, not a directory")
    if timing_cache is not None and Path(timing_cache).is_dir():
        problems.append(f"timing_cache: {timing_cache} is a directory; give the cache file's path")
    return problems


def batch_range(*, opt_batch: int, max_batch: int, dla: bool) -> tuple[int, int, int]:
    """(min, opt, max) of a dynamic batch axis. A DLA has no dynamic shapes ("the
    profile's min, max, and opt values must be equal", TensorRT's DLA restrictions), so
    on a DLA the batch is fixed at ``opt_batch``."""
    if dla:
        return opt_batch, opt_batch, opt_batch
    return 1, opt_batch, max_batch


def input_profile(
    block: str, name: str, shape: Sequence[int], batch: tuple[int, int, int]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(min, opt, max) shapes of one network input for its optimization profile, or
    ``None`` when the input is static (TensorRT needs no profile for it).

    ``-1`` marks a dynamic dimension (TensorRT's convention). Axis 0 is the batch and
    takes ``batch``; any other dynamic axis has no range to give, so ``ModelError``.
    """
    dims = [int(d) for d in shape]
    other = [i for i, d in enumerate(dims) if d < 0 and i != 0]
    if other:
        raise ModelError(
            f"{block}: input {name!r} {tuple(dims)} has dynamic dimension(s) at axis {other}; "
            f"the tensorrt backend gives a range only to axis 0 (the batch): make the other "
            f"dimensions static in the block"
        )
    if not dims or dims[0] >= 0:
        return None
    lo, opt, hi = batch
    rest = tuple(dims[1:])
    return (lo, *rest), (opt, *rest), (hi, *rest)

def onnx_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node the parser sees: the graph, subgraphs (If/Loop/Scan) and local function bodies."""
    local = {(f.domain, f.name): f for f in proto.functions}
    out: list[onnx.NodeProto] = []
    seen: set[tuple[str, str]] = set()

    def visit(nodes: Sequence[onnx.NodeProto]) -> None:
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in local:
                if key not in seen:
                    seen.add(key)
                    visit(local[key].node)
                continue
            out.append(node)
            for g in subgraphs(node):
                visit(g.node)

    visit(proto.graph.node)
    return out


def has_qdq(proto: onnx.ModelProto) -> bool:
    """Whether a block is explicitly quantized (has QuantizeLinear/DequantizeLinear nodes)."""
    return any(n.op_type in QDQ_OPS and n.domain in ("", "ai.onnx") for n in onnx_nodes(proto))


def block_precision(proto: onnx.ModelProto) -> str:
    """The lowest precision a block's own types ask for: ``int8`` (Q/DQ nodes), ``fp16``
    (a float16 input, output, initializer, intermediate or Cast), else ``fp32``.

    What a strongly typed network (TensorRT 11) runs in: the builder no longer lowers
    precision on its own, so an ``fp32`` block has no layer the DLA can take.
    """
    if has_qdq(proto):
        return "int8"
    half = onnx.TensorProto.FLOAT16
    g = proto.graph
    typed = [*g.input, *g.output, *g.value_info]
    if any(v.type.tensor_type.elem_type == half for v in typed):
        return "fp16"
    if any(t.data_type == half for t in g.initializer):
        return "fp16"
    for node in onnx_nodes(proto):
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == half:
                return "fp16"
            if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == half:
                return "fp16"
    return "fp32"


def dla_problem(precision: str, *, version: str) -> str | None:
    """Why a strongly typed block cannot go to the DLA, or None. TensorRT 11.4 brought
    the DLA back for strongly typed networks only, and the DLA runs fp16 and int8 layers
    only: an fp32 block's every layer would fall back to the GPU (``GPU_FALLBACK``), and a
    profile measured on the GPU under a DLA processor's name is worse than no profile."""
    if precision != "fp32":
        return None
    return (
        f"float32 network (the DLA runs only fp16 and int8 layers; TensorRT {version} builds "
        f"strongly typed networks, so every layer would run on the GPU instead: load the "
        f"family's fp16 or int8 variant)"
    )


def quantization_problems(proto: onnx.ModelProto) -> list[str]:
    """Q/DQ nodes TensorRT cannot run: it supports only symmetric, signed int8 (zero point
    0, "TRT only supports symmetric quantization - zeroPt must be all zeros" is the parser's
    own assertion). Zero points that are not constants are left to the parser."""
    qdq = [
        n for n in onnx_nodes(proto)
        if n.op_type in QDQ_OPS and n.domain in ("", "ai.onnx") and len(n.input) >= 3 and n.input[2]
    ]  # fmt: skip
    wanted = {n.input[2] for n in qdq}  # convert only the zero points, never the weights
    constants: dict[str, np.ndarray] = {}
    for init in proto.graph.initializer:
        if init.name in wanted and init.data_location != onnx.TensorProto.EXTERNAL:
            constants[init.name] = onnx.numpy_helper.to_array(init)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in wanted:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    constants[node.output[0]] = onnx.numpy_helper.to_array(attr.t)
    bad: set[str] = set()
    for node in qdq:
        zero = constants.get(node.input[2])
        if zero is None:
            continue
        if zero.dtype == np.uint8:
            bad.add(f"{node.op_type} (uint8 zero point: TensorRT runs signed, symmetric int8 only)")
        elif np.issubdtype(zero.dtype, np.integer) and np.any(zero != 0):
            bad.add(f"{node.op_type} (non-zero zero point: TensorRT runs symmetric int8 only)")
    return sorted(bad)
