"""Small ONNX helpers shared by variant generation, partitioning and stitching.

Loading goes through ``load_model`` so that a malformed file always ends in a
``ModelError`` naming the file, never in a protobuf traceback.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from loom.core.errors import ModelError

#: onnxruntime 1.31 refuses IR versions above 13; onnx 1.23's make_model writes 14.
MAX_IR_VERSION = 10


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of ``model`` (what a transformation edits instead of its input)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def load_model(path: str | Path, *, check: bool = True) -> onnx.ModelProto:
    """Read and check an ONNX file; every failure is a ``ModelError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ...
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    if check:
        check_model(model, name=str(path))
    return model


def check_model(model: onnx.ModelProto, *, name: str) -> None:
    """Run the ONNX checker and our own minimal requirements; raise ``ModelError``."""
    if not model.graph.node:
        raise ModelError(f"{name}: the graph has no nodes")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"{name}: fails the ONNX checker: {exc}") from exc


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Save with an IR version onnxruntime accepts, weights embedded in the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.save(model, str(path))
    return path


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def constant_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors whose values are fixed: initializers and outputs of Constant nodes."""
    names = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            names.update(node.output)
    return names


def producers(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name -> index of the node that writes it."""
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Tensor name -> indices of the nodes that read it (subgraph reads included)."""
    result: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        for name in node_inputs(node):
            result[name].append(i)
    return result


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node, including tensors its subgraphs (If/Loop bodies) read from outside."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input}
            inner |= {t.name for t in sub.initializer}
            names += [x for n in sub.node for x in node_inputs(n) if x not in inner]
    return names


def topological_order(graph: onnx.GraphProto) -> list[int]:
    """Node indices in a valid execution order (the file's order may already be one)."""
    prod = producers(graph)
    deps = [{prod[x] for x in node_inputs(n) if x in prod} for n in graph.node]
    order: list[int] = []
    state = [0] * len(graph.node)  # 0 new, 1 visiting, 2 done
    for root in range(len(graph.node)):
        stack = [(root, False)]
        while stack:
            i, expanded = stack.pop()
            if expanded:
                if state[i] != 2:
                    state[i] = 2
                    order.append(i)
                continue
            if state[i] == 2:
                continue
            if state[i] == 1:
                continue
            state[i] = 1
            stack.append((i, True))
            stack.extend((d, False) for d in deps[i] if state[d] == 0)
    return order


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[list[int | str | None], int]]:
    """Tensor name -> (shape with symbolic dims as str/None, element type), via shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise ModelError(f"shape inference failed: {exc}") from exc
    out: dict[str, tuple[list[int | str | None], int]] = {}
    graph = inferred.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            out[vi.name] = ([], tt.elem_type)
            continue
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        out[vi.name] = (dims, tt.elem_type)
    for t in graph.initializer:
        out[t.name] = (list(t.dims), t.data_type)
    return out


def concrete(shape: Iterable[int | str | None], batch: int = 1) -> list[int]:
    """Replace symbolic dims (the batch axis) by ``batch``."""
    return [d if isinstance(d, int) and d > 0 else batch for d in shape]


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[list, int]]) -> int:
    """Multiply-accumulates of one node at batch 1 (0 for ops that do no matmul-like work).

    Conv, ConvTranspose, MatMul (and their integer/quantized forms) and Gemm dominate
    the cost of every model in the zoo; elementwise ops are counted as one op per
    output element so that attention's softmax and norms still weigh something.
    """
    def shape(name: str) -> list[int]:
        return concrete(shapes.get(name, ([], 0))[0])

    op = node.op_type
    out = shape(node.output[0]) if node.output and node.output[0] in shapes else []
    out_elems = int(np.prod(out)) if out else 0
    if op in ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose"):
        w_index = 3 if op == "QLinearConv" else 1
        w = shape(node.input[w_index])
        if len(w) >= 2:
            return out_elems * int(np.prod(w[1:]))
        return 0
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm", "FusedMatMul"):
        a = shape(node.input[0])
        k = a[-1] if a else 0
        if op == "Gemm":
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a and len(a) == 2 else k
        return out_elems * int(k)
    return out_elems


def tensor_array(graph: onnx.GraphProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(initializers(graph)[name])


def replace_initializer(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    """Swap an initializer's value in place, keeping its name and position."""
    for i, t in enumerate(graph.initializer):
        if t.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    raise KeyError(name)


def model_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()
