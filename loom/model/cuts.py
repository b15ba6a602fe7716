"""Finding cuts in one ONNX graph, and splitting a graph at a chain of cuts.

A cut is found from an *anchor* tensor T: the nodes needed to compute T (T's
ancestors) form the part before the cut, and the cut itself is every non-static
tensor that part produces (or a graph input) which something after it still reads.
That set always separates the graph, however the exporter ordered its nodes
(PROBE.md: torch interleaves transformer layers in the node list), and in a
transformer it is the hidden state plus what later layers read again (the mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx

from loom.core.errors import AlignmentError
from loom.core.onnxutil import (
    MAX_IR_VERSION,
    infer_shapes,
    node_inputs,
    node_macs,
    producers,
    topological_order,
)

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


@dataclass(frozen=True)
class CutCandidate:
    #: sorted tensor names crossing the cut (graph inputs included when read later)
    tensors: tuple[str, ...]
    #: the tensor whose ancestors define the part before the cut
    anchor: str
    #: share of the model's MACs computed before the cut
    macs_before: float
    #: how many of ``tensors`` are produced by nodes (graph inputs excluded)
    produced: int


@dataclass
class GraphIndex:
    """Precomputed structure of one model, shared by the analyses below."""

    model: onnx.ModelProto
    order: list[int]
    producer: dict[str, int]
    static: set[str]
    graph_inputs: list[str]
    graph_outputs: list[str]
    shapes: dict[str, tuple[list, int]]
    macs: list[int]
    readers: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def build(cls, model: onnx.ModelProto) -> GraphIndex:
        g = model.graph
        order = topological_order(g)
        inits = {t.name for t in g.initializer}
        # Static tensors are fixed at export time: initializers, Constant outputs and
        # anything computed from those alone. They never cross a cut: the block that
        # reads one gets a copy of the nodes that make it.
        static = set(inits)
        for i in order:
            node = g.node[i]
            ins = node_inputs(node)
            if all(x in static for x in ins):
                static.update(o for o in node.output if o)
        graph_inputs = [i.name for i in g.input if i.name not in inits]
        shapes = infer_shapes(model)
        macs = [node_macs(n, shapes) if not set(n.output) <= static else 0 for n in g.node]
        readers: dict[str, list[int]] = {}
        for i, node in enumerate(g.node):
            for x in node_inputs(node):
                readers.setdefault(x, []).append(i)
        return cls(
            model=model,
            order=order,
            producer=producers(g),
            static=static,
            graph_inputs=graph_inputs,
            graph_outputs=[o.name for o in g.output],
            shapes=shapes,
            macs=macs,
            readers=readers,
        )

    @property
    def total_macs(self) -> int:
        return max(1, sum(self.macs))

    def ancestors(self, tensor: str) -> set[int]:
        """Indices of the non-static nodes needed to compute ``tensor``."""
        seen: set[int] = set()
        stack = [tensor]
        while stack:
            t = stack.pop()
            i = self.producer.get(t)
            if i is None or i in seen or t in self.static:
                continue
            seen.add(i)
            stack.extend(node_inputs(self.model.graph.node[i]))
        return seen

    def crossing(self, before: set[int]) -> list[str]:
        """Non-static tensors made before the cut (or graph inputs) that are read after it."""
        g = self.model.graph
        out: set[str] = set()
        candidates = list(self.graph_inputs)
        candidates += [o for i in before for o in g.node[i].output if o]
        for t in candidates:
            if t in self.static:
                continue
            if t in self.graph_outputs or any(r not in before for r in self.readers.get(t, [])):
                out.add(t)
        return sorted(out)

    def is_float(self, tensor: str) -> bool:
        return self.shapes.get(tensor, ([], 0))[1] in FLOAT_TYPES


def candidate_cuts(index: GraphIndex, *, max_tensors: int = 2) -> list[CutCandidate]:
    """Every distinct cut with at most ``max_tensors`` produced (float) tensors, in graph order."""
    g = index.model.graph
    compute = {i for i in range(len(g.node)) if index.macs[i] > 0 or not set(g.node[i].output) <= index.static}
    found: dict[tuple[str, ...], CutCandidate] = {}
    for i in index.order:
        for anchor in g.node[i].output:
            if not anchor or anchor in index.static or anchor in index.graph_outputs:
                continue
            before = index.ancestors(anchor)
            if not (compute - before):  # nothing left after the cut
                continue
            tensors = index.crossing(before)
            if any(t in index.graph_outputs for t in tensors):
                continue
            produced = [t for t in tensors if t not in index.graph_inputs]
            if not produced or len(produced) > max_tensors:
                continue
            if not all(index.is_float(t) for t in produced):
                continue  # block interfaces carry float activations only
            key = tuple(tensors)
            if key not in found:
                share = sum(index.macs[j] for j in before) / index.total_macs
                found[key] = CutCandidate(key, anchor, share, len(produced))
    return sorted(found.values(), key=lambda c: c.macs_before)


def slot_nodes(index: GraphIndex, cuts: Sequence[Sequence[str]], *, name: str) -> list[list[int]]:
    """Split a model's non-static nodes into ``len(cuts) + 1`` slots at a chain of cuts.

    The part before cut k is every node needed to compute cut k's tensors; cuts must be
    nested (each later one needs everything the earlier one does).
    """
    g = index.model.graph
    missing = sorted({t for cut in cuts for t in cut if t not in index.producer and t not in index.graph_inputs})
    if missing:
        raise AlignmentError(f"{name}: has no tensor(s) {missing} used by the cuts")
    prefixes: list[set[int]] = []
    for k, cut in enumerate(cuts):
        before: set[int] = set()
        for t in cut:
            before |= index.ancestors(t)
        crossing = index.crossing(before)
        if sorted(crossing) != sorted(cut):
            raise AlignmentError(
                f"{name}: cut {k} {list(cut)} does not separate the graph: the tensors crossing "
                f"it are {crossing}"
            )
        if prefixes and not prefixes[-1] <= before:
            raise AlignmentError(f"{name}: cut {k} {list(cut)} is not after cut {k - 1}")
        prefixes.append(before)
    every = {i for i in range(len(g.node)) if not set(g.node[i].output) <= index.static}
    prefixes.append(every)
    slots: list[list[int]] = []
    done: set[int] = set()
    for before in prefixes:
        slots.append([i for i in index.order if i in before and i not in done])
        done |= before
    return slots


def extract_block(
    index: GraphIndex,
    nodes: list[int],
    inputs: Sequence[str],
    outputs: Sequence[str],
    *,
    graph_name: str = "block",
) -> onnx.ModelProto:
    """A standalone model of ``nodes`` reading ``inputs`` and writing ``outputs``.

    Static helpers (Constant nodes, shape arithmetic on constants) that the nodes read
    are copied in, as are the initializers they read; value infos come from shape
    inference on the whole model so that blocks keep symbolic batch axes.
    """
    g = index.model.graph
    node_set = set(nodes)
    needed_static: list[int] = []
    stack = [x for i in nodes for x in node_inputs(g.node[i]) if x in index.static]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        j = index.producer.get(t)
        if j is not None and j not in node_set:
            node_set.add(j)
            needed_static.append(j)
            stack.extend(node_inputs(g.node[j]))
    ordered = [i for i in index.order if i in node_set]
    read = {x for i in ordered for x in node_inputs(g.node[i])}
    inits = [t for t in g.initializer if t.name in read]

    def value_info(name: str) -> onnx.ValueInfoProto:
        shape, elem = index.shapes.get(name, (None, onnx.TensorProto.FLOAT))
        dims = None if shape is None else [d if d is not None else "batch" for d in shape]
        return onnx.helper.make_tensor_value_info(name, elem or onnx.TensorProto.FLOAT, dims)

    graph = onnx.helper.make_graph(
        [g.node[i] for i in ordered],
        graph_name,
        [value_info(x) for x in inputs],
        [value_info(x) for x in outputs],
        initializer=inits,
    )
    block = onnx.helper.make_model(graph, opset_imports=list(index.model.opset_import))
    block.ir_version = min(index.model.ir_version or MAX_IR_VERSION, MAX_IR_VERSION)
    block.producer_name = "sparseloom"
    return block
