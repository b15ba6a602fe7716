"""onnxruntime's kernel registry: which ops a set of providers can run, and load failures.

Ops are checked against the registered kernels at the op version the model's opset
selects, so every unsupported op is listed at once (a load stops at the first).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import onnx

from backends.base import op_label, subgraphs
from loom.core.errors import BackendError, ModelError, UnsupportedOpsError

#: onnxruntime reports a kernel missing for a type as "Could not find an implementation
#: for ConvInteger(10) node with name '...'": the one unsupported-op case only a load finds.
_NO_KERNEL = re.compile(r"Could not find an implementation for (\S+?)\((\d+)\)")
#: onnxruntime >= 1.2x says it as "Failed to find kernel for Cast(28) (node:'' ep:'CPU...')"
#: when no kernel takes the node's types (a FLOAT4E2M1 Cast, a float16 Swish)
_NO_KERNEL_FOR = re.compile(r"Failed to find kernel for (\S+?)\((\d+)\)")


def _norm(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


@lru_cache(maxsize=8)
def _kernels(providers: frozenset[str]) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """(domain, op) -> version ranges of the kernels registered for ``providers``."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    table: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for k in C.get_all_opkernel_def():
        if k.provider in providers:
            table.setdefault((_norm(k.domain), k.op_name), []).append(tuple(k.version_range))
    return table


@lru_cache(maxsize=1)
def _ort_schemas() -> dict[tuple[str, str], list[int]]:
    """(domain, op) -> since_versions of the schemas onnxruntime registers (its contrib ops too)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    table: dict[tuple[str, str], list[int]] = {}
    for s in C.get_all_operator_schema():
        table.setdefault((_norm(s.domain), s.name), []).append(int(s.since_version))
    return table


#: Ops onnxruntime resolves while building the graph, so no kernel exists for them:
#: ``Constant`` nodes become initializers at session creation.
_GRAPH_LEVEL_OPS = {("", "Constant")}


def _supported(
    key: tuple[str, str], opset: int | None, kernels: dict[tuple[str, str], list[tuple[int, int]]]
) -> bool:
    """Whether a kernel covers the op's version at ``opset``, or its ONNX function can be inlined."""
    domain, op = key
    if key in _GRAPH_LEVEL_OPS:
        return True
    ranges = kernels.get(key, [])
    if opset is None:  # the model does not import the domain: the version is unknown
        return bool(ranges)
    function = False
    try:
        schema = onnx.defs.get_schema(op, opset, domain)
        since: int | None = schema.since_version
        function = schema.has_function or schema.has_context_dependent_function
    except onnx.defs.SchemaError:  # not an ONNX op (or not yet at this opset): ORT's own schemas
        versions = [v for v in _ort_schemas().get(key, []) if v <= opset]
        since = max(versions) if versions else None
    if since is None:  # no such op at this opset (Gelu before opset 20): ORT refuses the graph
        return False
    return any(lo <= since <= hi for lo, hi in ranges) or function


def unsupported_ops(model: onnx.ModelProto, providers: frozenset[str]) -> list[str]:
    """Every op of ``model`` no kernel of ``providers`` runs (``If``/``Loop`` bodies and
    model-local functions included). ONNX function ops without a kernel (``HardSwish``,
    ``Mish``, ...) count as supported: onnxruntime inlines their bodies."""
    kernels = _kernels(providers)
    opsets = {_norm(o.domain): o.version for o in model.opset_import}
    local = {(_norm(f.domain), f.name): f for f in model.functions}
    bad: set[str] = set()
    seen_functions: set[tuple[str, str]] = set()

    def visit(nodes: Sequence[onnx.NodeProto]) -> None:
        for node in nodes:
            key = (_norm(node.domain), node.op_type)
            if key in local:
                if key not in seen_functions:
                    seen_functions.add(key)
                    visit(local[key].node)
            elif not _supported(key, opsets.get(key[0]), kernels):
                bad.add(op_label(*key))
            for g in subgraphs(node):  # If/Loop/Scan bodies
                visit(g.node)

    visit(model.graph.node)
    return sorted(bad)


def load_error(backend: str, name: str, exc: Exception) -> Exception:
    """Sort an onnxruntime load failure: a missing kernel, a bad model, or the engine."""
    message = str(exc)
    found = _NO_KERNEL.findall(message) + _NO_KERNEL_FOR.findall(message)
    if found:
        return UnsupportedOpsError(backend, name, sorted({op for op, _ in found}))
    kind = type(exc).__name__
    if kind in ("InvalidProtobuf", "InvalidGraph", "InvalidArgument", "NoSuchFile", "Fail", "NotImplemented"):
        return ModelError(f"{name}: onnxruntime cannot load it: {message}")
    return BackendError(f"{name}: onnxruntime failed to load it ({kind}): {message}")
