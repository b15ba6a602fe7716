"""Converters onnx2torch lacks: QDQ int8 (QuantizeLinear, DequantizeLinear) and Reduce* at opset 18.

Imported only by ``_torch_convert`` once torch and onnx2torch are importable: it imports
both at module level. Each converter has onnx2torch's signature ``(node, graph) ->
OperationConverterResult`` and raises ``NotImplementedError`` (naming what) for the forms
it does not take, which the backend lists as unsupported. Semantics: docs/backends.md.
"""

from __future__ import annotations

from typing import Any

import torch
from onnx import helper
from onnx2torch.node_converters.registry import get_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.onnx_tensor import OnnxTensor
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value
from torch import nn

#: integer types QuantizeLinear writes and DequantizeLinear reads, with their ranges
QTYPES: dict[torch.dtype, tuple[int, int]] = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.uint16: (0, 65535),
    torch.int16: (-32768, 32767),
}
#: DequantizeLinear also reads int32 (the biases of onnxruntime's static quantizer)
DQ_TYPES = (*QTYPES, torch.int32)
#: ONNX element type -> torch dtype, for QuantizeLinear's ``output_dtype`` (opset 21)
_ONNX_QTYPES = {2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16}
#: what QDQ nodes may carry; ``saturate`` matters for float8 only, which is refused anyway
_QDQ_ATTRIBUTES = {"axis", "block_size", "output_dtype", "saturate", "precision"}
#: the Reduce ops whose ``axes`` became an input at opset 18 (ReduceSum did so at 13)
REDUCE_18 = (
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
    "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSumSquare",
)  # fmt: skip


def _shaped(t: torch.Tensor, x: torch.Tensor, axis: int, per_axis: bool) -> torch.Tensor:
    """A scale or zero point broadcast against ``x``: a scalar, or a vector along ``axis``."""
    if not per_axis:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


class Dequantize(nn.Module):
    """``y = (x - zero_point) * scale``, the difference taken in int32 as onnxruntime does."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point.to(torch.int32))
        self.axis = axis
        self.per_axis = scale.numel() > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = _shaped(self.scale, x, self.axis, self.per_axis)
        zero = _shaped(self.zero_point, x, self.axis, self.per_axis)
        return (x.to(torch.int32) - zero).to(scale.dtype) * scale


class Quantize(nn.Module):
    """``y = saturate(round(x / scale) + zero_point)``, rounding half to even (as ONNX says)."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("zero_point", zero_point.to(torch.float32))
        self.axis = axis
        self.per_axis = scale.numel() > 1
        self.dtype = dtype
        self.low, self.high = QTYPES[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = _shaped(self.scale, x, self.axis, self.per_axis)
        zero = _shaped(self.zero_point, x, self.axis, self.per_axis)
        q = torch.round(x.to(torch.float32) / scale) + zero
        return q.clamp(self.low, self.high).to(self.dtype)


class Constant(nn.Module):
    """A value computed once at conversion (a DequantizeLinear of stored weights)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self) -> torch.Tensor:
        return self.value


def _inputs(node: OnnxNode, n: int) -> list[str]:
    """The node's first ``n`` input names, ``""`` for the optional ones it leaves out."""
    names = list(node.input_values)
    return names + [""] * (n - len(names))


def _const(name: str, graph: OnnxGraph, what: str) -> torch.Tensor:
    """An initializer or Constant output as a tensor; a computed one is not converted."""
    try:
        value = get_const_value(name, graph)
    except KeyError:
        raise NotImplementedError(f"{what} computed at run time") from None
    if isinstance(value, OnnxTensor):
        value = value.to_torch()
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)


def _check_qdq(node: OnnxNode, scale: torch.Tensor) -> int:
    """The node's axis, after refusing what this converter does not take (it is registered
    for every opset version of QDQ: an attribute it does not know is refused too)."""
    unknown = sorted(set(node.attributes) - _QDQ_ATTRIBUTES)
    if unknown:
        raise NotImplementedError(f"attribute(s) {unknown}")
    if int(node.attributes.get("block_size", 0)):
        raise NotImplementedError("blocked quantization (block_size)")
    if int(node.attributes.get("precision", 0)):
        raise NotImplementedError("precision")
    if scale.dim() > 1:
        raise NotImplementedError(f"a scale of rank {scale.dim()}")
    if not scale.is_floating_point():
        raise NotImplementedError(f"a {scale.dtype} scale")
    return int(node.attributes.get("axis", 1))


def _zero_point(zp_name: str, graph: OnnxGraph, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if zp_name:
        return _const(zp_name, graph, "zero point")
    return torch.zeros(scale.shape, dtype=dtype)


def quantize_linear(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """QuantizeLinear with a constant scale and zero point, per tensor or per axis."""
    x, scale_name, zp_name = _inputs(node, 3)
    scale = _const(scale_name, graph, "scale")
    axis = _check_qdq(node, scale)
    if zp_name:
        dtype: torch.dtype | None = _const(zp_name, graph, "zero point").dtype
    else:  # the output type is an attribute since opset 21; uint8 (ONNX type 2) by default
        dtype = _ONNX_QTYPES.get(int(node.attributes.get("output_dtype", 0)) or 2)
    if dtype not in QTYPES:
        raise NotImplementedError(f"quantizing to {dtype or 'that type'} (takes uint8, int8, uint16, int16)")
    module = Quantize(scale, _zero_point(zp_name, graph, scale, dtype), axis, dtype)
    return OperationConverterResult(module, OnnxMapping(inputs=(x,), outputs=node.output_values))


def dequantize_linear(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """DequantizeLinear; stored weights (a constant input) are dequantized once, here."""
    x, scale_name, zp_name = _inputs(node, 3)
    scale = _const(scale_name, graph, "scale")
    axis = _check_qdq(node, scale)
    if int(node.attributes.get("output_dtype", 0)):
        raise NotImplementedError("output_dtype")
    try:
        stored: torch.Tensor | None = _const(x, graph, "input")
    except NotImplementedError:
        stored = None
    if stored is not None and stored.dtype not in DQ_TYPES:
        raise NotImplementedError(f"dequantizing {stored.dtype}")
    zero = _zero_point(zp_name, graph, scale, stored.dtype if stored is not None else torch.int32)
    if zero.dtype not in DQ_TYPES:
        raise NotImplementedError(f"dequantizing {zero.dtype}")
    module = Dequantize(scale, zero, axis)
    if stored is None:
        return OperationConverterResult(module, OnnxMapping(inputs=(x,), outputs=node.output_values))
    with torch.no_grad():
        folded = Constant(module(stored))
    return OperationConverterResult(folded, OnnxMapping(inputs=(), outputs=node.output_values))


def reduce_18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Reduce* at opset 18 (``axes`` an input): onnx2torch's opset-13 converter, given the
    constant axes as the attribute they used to be."""
    data, axes_name = _inputs(node, 2)
    axes = [int(a) for a in _const(axes_name, graph, "axes").reshape(-1).tolist()] if axes_name else []
    keepdims = int(node.attributes.get("keepdims", 1))
    if not axes and int(node.attributes.get("noop_with_empty_axes", 0)):
        module: nn.Module = Passthrough()
        return OperationConverterResult(module, OnnxMapping(inputs=(data,), outputs=node.output_values))
    attrs: dict[str, Any] = {"keepdims": keepdims, **({"axes": axes} if axes else {})}
    proto = helper.make_node(node.operation_type, [data], list(node.output_values), **attrs)
    older = get_converter(operation_type=node.operation_type, version=13)
    result = older(OnnxNode(proto, unique_name=node.unique_name), graph)
    return OperationConverterResult(result.torch_module, OnnxMapping(inputs=(data,), outputs=node.output_values))


class Passthrough(nn.Module):
    """A reduction over no axes with ``noop_with_empty_axes``: the input, copied."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


#: op type -> (converter, the first and last opset version it is registered for; None:
#: every later one). Reduce* later versions are aliased only when their schema changed
#: types alone (``_torch_convert``).
CONVERTERS: dict[str, tuple[Any, int, int | None]] = {
    "QuantizeLinear": (quantize_linear, 10, None),
    "DequantizeLinear": (dequantize_linear, 10, None),
    **{op: (reduce_18, 18, 18) for op in REDUCE_18},
}
