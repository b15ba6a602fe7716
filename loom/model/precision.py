"""Precision variants: int8 (static QDQ) and fp16 copies of a model whose cut tensors stay float32.

A block boundary always carries float32, whatever the slot's precision, so that any
variant's block can follow any other's: ``preserved_tensors`` picks the tensors of the
candidate cuts, and the converters keep them float32, under their original names,
written by their original nodes, and read directly by each block that needs them.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from loom.core.onnxutil import copy_model, save_model
from loom.model.cuts import GraphIndex, candidate_cuts

#: ops that act on each channel independently (a pruned channel stays pruned through them)
CHANNELWISE = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Gelu", "Clip", "Elu", "Selu", "Softplus",
    "HardSigmoid", "HardSwish", "Identity", "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt",
    "Pow", "BatchNormalization", "PRelu", "MaxPool", "AveragePool", "Dropout",
}


# -- which tensors must survive compression ---------------------------------------------------
def preserved_tensors(model: onnx.ModelProto, *, max_tensors: int = 2) -> list[str]:
    """Tensors of the model's candidate cuts that quantization and fp16 must keep float.

    Only the cheapest cuts (fewest tensors) are protected: protecting every two-tensor
    cut inside residual blocks would keep most activations float and undo int8's gain.
    A tensor that crosses a quarter of the cuts or more (a transformer's attention mask,
    read by every layer) is *carried*: it is kept, and not counted in a cut's size.
    """
    index = GraphIndex.build(model)
    cands = candidate_cuts(index, max_tensors=max_tensors)
    if not cands:
        return []
    inputs = {i.name for i in model.graph.input}
    counts: dict[str, int] = {}
    for c in cands:
        for t in c.tensors:
            if t not in inputs:
                counts[t] = counts.get(t, 0) + 1
    carried = {t for t, n in counts.items() if len(cands) >= 4 and n >= len(cands) / 4}
    own = {c.tensors: [t for t in c.tensors if t not in inputs and t not in carried] for c in cands}
    fewest = min((len(v) for v in own.values() if v), default=0)
    keep = carried | {t for v in own.values() if len(v) == fewest for t in v}
    # A tensor read only by an activation whose output is itself kept (conv -> relu,
    # add -> relu) needs no protection of its own: cut after the activation instead.
    nodes = model.graph.node
    redundant = {
        t for t in keep
        if (readers := index.readers.get(t, []))
        and all(nodes[r].op_type in CHANNELWISE and nodes[r].output[0] in keep for r in readers)
    }
    return sorted(keep - redundant)


def _name_nodes(model: onnx.ModelProto) -> None:
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def _writers(model: onnx.ModelProto, tensors: Iterable[str]) -> list[str]:
    want = set(tensors)
    return [n.name for n in model.graph.node if want & set(n.output)]


def _calibration_reader(feeds: Mapping[str, np.ndarray], batch: int = 16):  # noqa: ANN202
    """An onnxruntime ``CalibrationDataReader`` over ``feeds`` in batches of ``batch``."""
    from onnxruntime.quantization import CalibrationDataReader

    count = len(next(iter(feeds.values())))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{k: v[i : i + batch] for k, v in feeds.items()} for i in range(0, count, batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return Reader()


def int8_op_types(model: onnx.ModelProto) -> list[str] | None:
    """The ops int8 quantizes in ``model``: the quantizer's defaults (None), except in an
    attention model (it has a Softmax), where only the weighted ops are.

    The attention scores carry the mask as a large negative bias (-1e4): one 8-bit scale
    on that Add or the Softmax cannot resolve the scores (MiniLM-L6: 60.7% against 75.7%
    for fp32 when Add/Mul/Softmax are quantized, 76.0% with MatMul/Gemm only).
    """
    if any(n.op_type == "Softmax" for n in model.graph.node):
        return ["MatMul", "Gemm", "Conv"]
    return None


# -- int8 --------------------------------------------------------------------------------------
def quantize_int8(
    model: onnx.ModelProto,
    calib: np.ndarray | Mapping[str, np.ndarray],
    *,
    preserve: Sequence[str] = (),
    per_channel: bool = True,
    op_types: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Static QDQ int8 (uint8 activations, 7-bit-range int8 per-channel weights), cut tensors kept float.

    PROBE.md: int8 *signed* activations fuse poorly in onnxruntime's CPU kernels (slower
    than fp32), uint8 activations run 3x faster; dynamic quantization is 5x slower on convs.

    ``reduce_range``: onnxruntime's fused u8s8 kernels on x86 CPUs *without* VNNI (AVX2
    only, e.g. the AMD EPYC CI runners) add pairs of u8*s8 products in 16 bits, which
    saturates with full-range weights: the same int8 model scored 98.6% on an AVX512-VNNI
    machine and 68.9% on an AVX2 one (with the graph optimizations that fuse QDQ into
    QLinearConv; 98.6% without them). Weights in [-64, 63] cannot saturate anywhere.

    ``op_types``: the ops to quantize (default: ``int8_op_types``).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src = copy_model(model)
    _name_nodes(src)
    del src.graph.value_info[:]
    if not isinstance(calib, Mapping):
        calib = {next(i.name for i in src.graph.input if i.name not in {t.name for t in src.graph.initializer}): calib}

    # The quantizer logs a pre-processing hint at WARNING on every call; its pre-processing
    # (graph fusion) is exactly what must not run here, since it can move the cuts.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    with tempfile.TemporaryDirectory() as tmp:
        src_path, dst_path = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        save_model(src, src_path)
        quantize_static(
            str(src_path), str(dst_path), _calibration_reader(calib),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            reduce_range=True,
            nodes_to_exclude=_writers(src, preserve),
            op_types_to_quantize=list(op_types) if op_types is not None else int8_op_types(src),
            # one Q/DQ pair per reader: a shared pair on a carried tensor (read in every
            # block) would sit before the first cut and put its output across the others
            extra_options={"DedicatedQDQPair": True},
        )
        out = onnx.load(str(dst_path))
    _drop_dead_nodes(out)
    out.ir_version = min(out.ir_version, 10)
    return out


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads. The quantizer's dedicated Q/DQ pairs leave
    some for a node that reads one tensor several times (MobileNetV2's grey-to-RGB Concat):
    unread, they sit after every cut and put the tensor they read across all of them."""
    g = model.graph
    while True:
        read = {x for n in g.node for x in n.input} | {o.name for o in g.output}
        live = [n for n in g.node if any(o in read for o in n.output if o)]
        if len(live) == len(g.node):
            return
        del g.node[:]
        g.node.extend(live)


# -- fp16 --------------------------------------------------------------------------------------
def convert_fp16(model: onnx.ModelProto, *, preserve: Sequence[str] = ()) -> onnx.ModelProto:
    """Float16 everywhere but the graph's inputs, outputs and the ``preserve`` tensors.

    The nodes writing the cut tensors run in float32 (the converter puts casts around
    them), so a block boundary always carries float32, whatever the slot's precision.
    """
    from onnxconverter_common import float16

    src = copy_model(model)
    _name_nodes(src)
    del src.graph.value_info[:]
    with warnings.catch_warnings():
        # "the float32 number 6.9e-08 will be truncated to 1e-07": expected of fp16, per weight
        warnings.simplefilter("ignore", UserWarning)
        out = float16.convert_float_to_float16(
            src, keep_io_types=True, node_block_list=_writers(src, preserve), disable_shape_infer=False
        )
    _restore_names(src, out, preserve)
    _cast_per_reader(out, preserve)
    out.ir_version = min(out.ir_version, 10)
    return out


def _cast_per_reader(model: onnx.ModelProto, preserve: Sequence[str]) -> None:
    """Give each reader of a preserved tensor its own Cast to float16, placed just before it.

    The converter casts a tensor once, where it is made; a tensor read in every block (a
    transformer's mask) would then cross each later cut as its float16 copy, not itself.
    """
    g = model.graph
    want = set(preserve)
    outputs = {o.name for o in g.output}
    nodes = [onnx.NodeProto() for _ in g.node]
    for mine, n in zip(nodes, g.node, strict=True):
        mine.CopyFrom(n)
    for cast in [n for n in nodes if n.op_type == "Cast" and n.input[0] in want]:
        out = cast.output[0]
        users = [n for n in nodes if out in n.input]
        if len(users) < 2 or out in outputs:
            continue
        nodes = [n for n in nodes if n is not cast]
        for k, user in enumerate(users):
            dedicated = onnx.NodeProto()
            dedicated.CopyFrom(cast)
            dedicated.name = f"{cast.name or 'Cast'}__{k}"
            dedicated.output[0] = f"{out}__{k}"
            for j, x in enumerate(user.input):
                if x == out:
                    user.input[j] = dedicated.output[0]
            at = next(i for i, n in enumerate(nodes) if n is user)
            nodes.insert(at, dedicated)
    del g.node[:]
    g.node.extend(nodes)


def _restore_names(src: onnx.ModelProto, out: onnx.ModelProto, preserve: Sequence[str]) -> None:
    """Make each preserved tensor name float32 again, written by its original node.

    onnxconverter-common keeps a blocked node in float32 but renames its output
    (``X`` -> ``X_output_cast_0``) and either feeds it to a Cast back to float16 that
    takes the old name, or, when the next node is blocked too, leaves the new name.
    Both are undone here by swapping names, so that ``X`` is the float32 tensor and the
    float16 copy (if any) is ``X__fp16``.
    """
    want = set(preserve)
    original = {n.name: list(n.output) for n in src.graph.node}
    renames: dict[str, str] = {}
    for node in out.graph.node:
        for j, (old, new) in enumerate(zip(original.get(node.name, []), list(node.output), strict=False)):
            if old in want and old != new:
                renames[new] = old  # float32 tensor gets the original name back
                renames[old] = f"{old}__fp16"  # the Cast's float16 output, if there is one
                node.output[j] = new  # renamed below with everything else
    if not renames:
        return
    for node in out.graph.node:
        for seq in (node.input, node.output):
            for j, x in enumerate(seq):
                if x in renames:
                    seq[j] = renames[x]
    for o in out.graph.output:
        if o.name in renames:
            o.name = renames[o.name]
    kept = [vi for vi in out.graph.value_info if vi.name not in renames and vi.name not in renames.values()]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)


