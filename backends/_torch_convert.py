"""ONNX block -> ``torch.nn.Module`` for the PyTorch backend: onnx2torch plus what it lacks.

Nothing here imports torch at module import time: ``require()`` imports torch and
onnx2torch on first use (through ``loom.core.compat``) and adds this package's converters
to onnx2torch's registry once per process (``_torch_qdq``: QDQ int8, Reduce* at opset 18;
and newer op versions that differ from one onnx2torch converts only in their types).
``unsupported()`` lists every op a block cannot be converted with, all at once.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from backends.base import ModelSource, op_label, subgraphs
from loom.core import compat
from loom.core.errors import MissingDependencyError

INSTALL = "pip install 'sparseloom[torch]'"
#: onnx2torch imports torchvision for these two ops only
TORCHVISION_OPS = ("NonMaxSuppression", "RoiAlign")
#: name of the Identity outputs ``prepare`` adds (one per graph output, in order)
_OUT = "__loom_out_{}"

_lock = threading.Lock()
_state: dict[str, Any] = {}


def require() -> tuple[Any, Any]:
    """``(torch, onnx2torch)``, imported and extended once; ``MissingDependencyError`` says
    what to install when either is missing or onnx2torch is older than 1.5."""
    missing = [m for m in ("torch", "onnx2torch") if not compat.is_installed(m)]
    if missing:
        raise MissingDependencyError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; the "
            f"PyTorch backend needs torch and onnx2torch>=1.5: {INSTALL}"
        )
    with _lock:
        if "onnx2torch" not in _state:
            torch = compat.require("torch")
            problem = _torchvision_problem()
            o2t = _import_onnx2torch(problem)
            version = importlib.metadata.version("onnx2torch")
            if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (1, 5):
                raise MissingDependencyError(
                    f"onnx2torch {version} is too old for the PyTorch backend (needs >= 1.5): {INSTALL}"
                )
            _state["added"] = _register_converters()
            _state.update(torch=torch, onnx2torch=o2t, version=version, torchvision=problem)
    return _state["torch"], _state["onnx2torch"]


def status() -> dict[str, Any]:
    """onnx2torch's version, whether torchvision is usable, how many converters were added."""
    require()
    return {
        "onnx2torch": _state["version"],
        "torchvision": "ok" if _state["torchvision"] is None else f"unusable: {_state['torchvision']}",
        "added_converters": len(_state["added"]),
    }


def _torchvision_problem() -> str | None:
    """Why torchvision cannot be imported (``None`` when it can).

    A torchvision built for another torch (PyPI's CUDA build beside a CPU torch) fails on
    import with "operator torchvision::nms does not exist"; onnx2torch needs it only for
    NonMaxSuppression and RoiAlign, so the rest converts without it.
    """
    if not compat.is_installed("torchvision"):
        return "not installed"
    try:
        importlib.import_module("torchvision")
    except Exception as exc:  # RuntimeError from a mismatched build, ImportError, ...
        return f"{type(exc).__name__}: {exc}"
    return None


def _import_onnx2torch(problem: str | None) -> Any:
    """Import onnx2torch; without a usable torchvision, against a stand-in for its import
    only (removed from ``sys.modules`` afterwards) whose functions raise when called."""
    if problem is None:
        return importlib.import_module("onnx2torch")

    def unusable(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError(f"torchvision is unusable here ({problem})")

    stand_in = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.box_convert = ops.roi_align = unusable  # type: ignore[attr-defined]
    stand_in.ops = ops  # type: ignore[attr-defined]
    saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.ops")}
    sys.modules.update({"torchvision": stand_in, "torchvision.ops": ops})
    try:
        return importlib.import_module("onnx2torch")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# --- the registry -------------------------------------------------------------------------


#: newer versions reviewed by hand as converting like the older one, although their
#: documentation changed: MaxPool 22 says windows starting in the right padding are
#: ignored (torch ignores them too); ReduceMax/Min 20 add bool (False < True).
_REVIEWED = {("MaxPool", 22), ("ReduceMax", 20), ("ReduceMin", 20)}


def _signature(schema: Any) -> tuple[Any, ...]:
    """All of a schema but its types: attributes (with defaults), inputs, outputs, the
    documentation (where semantic changes are written down), whitespace aside."""
    return (
        sorted((name, int(a.type), str(a.default_value)) for name, a in schema.attributes.items()),
        [(i.name, int(i.option)) for i in schema.inputs],
        [(o.name, int(o.option)) for o in schema.outputs],
        schema.min_input, schema.max_input, schema.min_output, schema.max_output,
        " ".join((schema.doc or "").split()),
    )  # fmt: skip


def _types_only(newer: Any, older: Any) -> bool:
    """Whether ``newer`` differs from ``older`` only in its type constraints."""
    if (newer.name, newer.since_version) in _REVIEWED:
        return _signature(newer)[:-1] == _signature(older)[:-1]
    return _signature(newer) == _signature(older)


def _versions() -> dict[str, list[Any]]:
    """ONNX op type -> its schemas (default domain), oldest first."""
    found: dict[str, list[Any]] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        if schema.domain == "":
            found.setdefault(schema.name, []).append(schema)
    return {op: sorted(s, key=lambda s: s.since_version) for op, s in found.items()}


def _registered(op: str, version: int) -> Any:
    from onnx2torch.node_converters.registry import get_converter

    try:
        return get_converter(operation_type=op, version=version)
    except NotImplementedError:
        return None


def _register_converters() -> list[str]:
    """Add this package's converters, then alias newer op versions whose schema differs
    from the newest one onnx2torch converts only in type constraints (bfloat16, float8,
    int4, ... added in opsets 19-25). Returns ``Op@version`` for each entry added."""
    from onnx2torch.node_converters.registry import add_converter

    from backends._torch_qdq import CONVERTERS

    added: list[str] = []
    versions = _versions()
    for op, (converter, first, last) in CONVERTERS.items():
        for schema in versions.get(op, []):
            v = schema.since_version
            if first <= v <= (last or v) and _registered(op, v) is None:
                add_converter(operation_type=op, version=v)(converter)
                added.append(f"{op}@{v}")
    for op, schemas in versions.items():
        known = [s for s in schemas if _registered(op, s.since_version) is not None]
        if not known:
            continue
        newest = known[-1]
        for schema in schemas:
            if schema.since_version > newest.since_version and _types_only(schema, newest):
                add_converter(operation_type=op, version=schema.since_version)(_registered(op, newest.since_version))
                added.append(f"{op}@{schema.since_version}")
    return added


# --- checks ----------------------------------------------------------------------------------


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, those of subgraphs (If, Loop, Scan bodies) included."""
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from _nodes(sub)


def _domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def _opsets(proto: onnx.ModelProto) -> dict[str, int]:
    return {_domain(o.domain): int(o.version) for o in proto.opset_import}


def missing(proto: onnx.ModelProto) -> list[str]:
    """Op types (``op_label`` spelling) with no converter at the model's opset: cheap, no
    conversion; ops that need torchvision count as missing when it is unusable."""
    from onnx2torch.node_converters.registry import get_converter

    require()
    opsets = _opsets(proto)
    bad: set[str] = set()
    for node in _nodes(proto.graph):
        domain = _domain(node.domain)
        label = op_label(domain, node.op_type)
        try:
            get_converter(operation_type=node.op_type, version=opsets.get(domain, 1), domain=domain)
        except NotImplementedError:
            bad.add(label)
            continue
        if domain == "" and node.op_type in TORCHVISION_OPS and _state["torchvision"] is not None:
            bad.add(f"{label} (needs torchvision: {_state['torchvision']})")
    return sorted(bad)


def refused(proto: onnx.ModelProto) -> list[str]:
    """Ops whose converter refuses this node's form, ``Op (why)``: each node is converted
    on its own (the whole conversion stops at the first), its module thrown away."""
    from onnx2torch.node_converters.registry import get_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.utils.safe_shape_inference import safe_shape_inference

    require()
    model = safe_shape_inference(prepare(proto))
    opsets = _opsets(model)
    graph = OnnxGraph(model.graph)
    bad: set[str] = set()
    for node in graph.nodes.values():
        label = op_label(node.domain, node.operation_type)
        try:
            converter = get_converter(
                operation_type=node.operation_type, version=opsets.get(node.domain, 1), domain=node.domain
            )
            converter(node, graph)
        except NotImplementedError as exc:
            if not str(exc).startswith("Converter is not implemented"):
                bad.add(f"{label} ({exc})")
        except Exception as exc:  # a converter failing on this node's inputs
            bad.add(f"{label} ({type(exc).__name__}: {exc})")
    return sorted(bad)


def unsupported(proto: onnx.ModelProto) -> list[str]:
    """Every op of the block that cannot be converted: no converter, or one that refuses."""
    return sorted(set(missing(proto)) | set(refused(proto)))


# --- conversion ------------------------------------------------------------------------------


def full_model(src: ModelSource) -> onnx.ModelProto:
    """The block with its weights (``src.proto`` is read without external data)."""
    if isinstance(src.data, str) and any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in src.proto.graph.initializer
    ):
        return onnx.load(src.data)
    return src.proto


def prepare(proto: onnx.ModelProto, *, widen: bool = False) -> onnx.ModelProto:
    """A copy onnx2torch converts as wanted: ``ai.onnx`` spelled ``""``; stored int8 weights
    dequantized (``fold_dequantize``); float16 made float32 with ``widen`` (``widen_half``);
    each graph output produced by an Identity of its
    own, so the module returns one tensor per output, in order (onnx2torch merges outputs
    of one node, and cannot return an input or a constant)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for node in _nodes(model.graph):
        node.domain = _domain(node.domain)
    fold_dequantize(model.graph)
    if widen:
        widen_half(model.graph)
    opsets = _opsets(model)
    opsets.setdefault("", 17)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets.items())
    for i, out in enumerate(model.graph.output):
        model.graph.node.append(helper.make_node("Identity", [out.name], [_OUT.format(i)], name=_OUT.format(i)))
        out.name = _OUT.format(i)
    return model


_INT_TYPES = (np.uint8, np.int8, np.uint16, np.int16, np.int32)


def fold_dequantize(graph: onnx.GraphProto) -> None:
    """Replace each DequantizeLinear of stored weights by its result, a float initializer.

    onnx2torch's Conv (and others) take their weights only from initializers, not from a
    node's output; and a weight dequantized once costs nothing per run. Same arithmetic
    as the run-time converter: ``(x - zero_point)`` in int32, then times the scale.
    """
    inits = {t.name: t for t in graph.initializer}
    kept, consumed = [], set()
    for node in graph.node:
        names = [n for n in node.input if n]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        foldable = (
            node.op_type == "DequantizeLinear" and node.domain == "" and len(names) >= 2
            and all(n in inits for n in names) and set(attrs) <= {"axis", "block_size"}
            and not attrs.get("block_size")
        )  # fmt: skip
        x = numpy_helper.to_array(inits[names[0]]) if foldable else None
        if x is None or x.dtype.type not in _INT_TYPES:
            kept.append(node)
            continue
        scale = numpy_helper.to_array(inits[names[1]])
        zero = numpy_helper.to_array(inits[names[2]]) if len(names) > 2 else np.zeros_like(scale, np.int32)
        value = _dequantize(x, scale, zero, int(attrs.get("axis", 1)))
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        consumed.update(names)
    if len(kept) == len(graph.node):
        return
    del graph.node[:]
    graph.node.extend(kept)
    used = {n for node in _nodes(graph) for n in node.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name in consumed and t.name not in used]
    for t in unused:
        graph.initializer.remove(t)


def _dequantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    if scale.size > 1:  # per axis
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    else:
        scale, zero = scale.reshape(()), zero.reshape(())
    return (x.astype(np.int32) - zero.astype(np.int32)).astype(scale.dtype) * scale


_HALF, _FLOAT = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


def widen_half(graph: onnx.GraphProto) -> None:
    """Every float16 of the graph (and its subgraphs) made float32: initializers, tensor
    attributes (Constant, ConstantOfShape), the types Cast and friends produce, declared
    types. For the CPU, where torch's float16 kernels ran 9-40x slower than float32 here."""

    def widen(t: onnx.TensorProto) -> None:
        if t.data_type == _HALF:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    for t in graph.initializer:
        widen(t)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == _HALF:
            value.type.tensor_type.elem_type = _FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                widen(attr.t)
            elif attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype") and attr.i == _HALF:
                attr.i = _FLOAT
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                widen_half(sub)
            for t in attr.tensors:
                widen(t)


def convert(proto: onnx.ModelProto, *, widen: bool = False) -> Any:
    """The block as a ``torch.fx.GraphModule`` in eval mode, on the CPU; its positional
    inputs are the graph inputs in order, and it returns one tensor per graph output (a
    tensor alone, or a list). Raises onnx2torch's ``NotImplementedError`` on the first
    op it cannot convert."""
    _, o2t = require()
    return o2t.convert(prepare(proto, widen=widen)).eval()


def precision(proto: onnx.ModelProto) -> str:
    """``int8`` (QDQ nodes), ``fp16`` (half-precision weights or casts) or ``fp32``."""
    ops = {n.op_type for n in _nodes(proto.graph)}
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        return "int8"
    half = onnx.TensorProto.FLOAT16
    if any(t.data_type == half for t in proto.graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == half for a in n.attribute)
        for n in _nodes(proto.graph)
    ):
        return "fp16"
    return "fp32"


def io_dtypes(values: Any) -> dict[str, np.dtype]:
    """Declared numpy dtype of each graph input or output (float32 when not declared)."""
    result: dict[str, np.dtype] = {}
    for value in values:
        try:
            result[value.name] = np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        except Exception:  # undefined or non-numpy element type
            result[value.name] = np.dtype(np.float32)
    return result
