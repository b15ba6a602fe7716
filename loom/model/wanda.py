"""Calibration-aware unstructured pruning, Wanda style (Sun et al. 2023, "A Simple and
Effective Pruning Approach for Large Language Models").

A weight's score is ``|W_ij| * ||X_j||_2``, its magnitude times the L2 norm of the input
feature it multiplies over the calibration data; the lowest ``sparsity`` share of every
output row (a Gemm/MatMul output neuron, a Conv output channel) is zeroed. ``calibrate``
reads the norms in one onnxruntime pass with the weighted nodes' inputs as extra outputs,
keeping only per-feature sums of squares; ``prune_wanda`` prunes. How each op's weight maps
to its input features, why depthwise convs are compared across the tensor and when a
weight falls back to magnitude: ``docs/model.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from loom.core.onnxutil import constant_names, copy_model
from loom.core.runref import EVAL_BATCH, iter_batches, session, with_taps


@dataclass(frozen=True)
class WeightUse:
    """How one node reads a weight: which activation feeds it and along which axes."""

    weight: str
    node: str
    op: str
    activation: str
    act_axis: int  # the activation's feature axis (negative: counted from the end)
    in_axis: int  # the weight's axis of input features (Conv: 1, per group)
    out_axis: int  # the weight's axis of outputs: one row per index
    groups: int = 1

    @property
    def layout(self) -> tuple[str, int, int, int]:
        return self.op, self.in_axis, self.out_axis, self.groups

    def features(self, shape: Sequence[int]) -> int:
        """How many input features (channels) the weight of ``shape`` reads."""
        return int(shape[self.in_axis]) * self.groups


@dataclass
class Calibration:
    """Per-feature input norms of every prunable weight, from one pass over calibration data."""

    #: weight -> how it is read (the first reader, when several read it alike)
    uses: dict[str, WeightUse] = field(default_factory=dict)
    #: weight -> ||X_j||_2 per input feature (for a grouped conv: per input channel, all groups)
    norms: dict[str, np.ndarray] = field(default_factory=dict)
    #: weight -> why it is pruned by magnitude instead
    magnitude: dict[str, str] = field(default_factory=dict)
    #: calibration samples the norms were taken over
    samples: int = 0

    @property
    def weights(self) -> list[str]:
        return [*self.norms, *self.magnitude]


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _use(node: onnx.NodeProto, position: int, shape: Sequence[int], constants: set[str]) -> WeightUse | str:
    """How ``node`` reads its input ``position`` (a weight of ``shape``), or why it cannot be said."""
    other = node.input[1 - position] if len(node.input) > 1 else ""
    if not other or other in constants:
        return f"{node.op_type} {node.name!r}: both operands are constant"
    a = _attrs(node)
    base = {"weight": node.input[position], "node": node.name, "op": node.op_type, "activation": other}
    if node.op_type == "Conv":
        if position != 1 or len(shape) < 3:
            return f"Conv {node.name!r}: the weight is not a [O, I/g, k...] kernel"
        return WeightUse(**base, act_axis=1, in_axis=1, out_axis=0, groups=int(a.get("group", 1)))
    if len(shape) != 2:
        return f"{node.op_type} {node.name!r}: a {len(shape)}-D weight (only 2-D matrices are scored per row)"
    if node.op_type == "MatMul":
        if position == 1:  # X [..., in] @ W [in, out]
            return WeightUse(**base, act_axis=-1, in_axis=0, out_axis=1)
        return WeightUse(**base, act_axis=-2, in_axis=1, out_axis=0)  # W [out, in] @ X [..., in, n]
    trans_a, trans_b = int(a.get("transA", 0)), int(a.get("transB", 0))
    if position == 1:  # A' [m, in] @ B' [in, out]; B is [out, in] under transB
        return WeightUse(**base, act_axis=0 if trans_a else 1, in_axis=1 if trans_b else 0, out_axis=0 if trans_b else 1)
    # a constant A: W' [out, in] @ B' [in, n]; W is [in, out] under transA, B is [n, in] under transB
    return WeightUse(**base, act_axis=1 if trans_b else 0, in_axis=0 if trans_a else 1, out_axis=1 if trans_a else 0)


def weight_uses(model: onnx.ModelProto, weights: Iterable[str]) -> tuple[dict[str, list[WeightUse]], dict[str, str]]:
    """Every Conv/Gemm/MatMul read of each of ``weights``; and the weights that cannot be scored, with why."""
    wanted = set(weights)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer if t.name in wanted}
    constants = constant_names(model.graph)
    uses: dict[str, list[WeightUse]] = {w: [] for w in weights}
    refused: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        for position, name in enumerate(node.input[:2]):
            if name not in wanted:
                continue
            use = _use(node, position, shapes[name], constants)
            if isinstance(use, str):
                refused.setdefault(name, use)
            else:
                uses[name].append(use)
    for name, found in uses.items():
        if name in refused:
            continue
        if not found:
            refused[name] = "read by no Conv/Gemm/MatMul"
        elif len({u.layout for u in found}) > 1:
            refused[name] = f"read along different axes by {', '.join(repr(u.node) for u in found)}"
    return {k: v for k, v in uses.items() if k not in refused}, refused


def _sum_squares(x: np.ndarray, axis: int) -> np.ndarray:
    axis = axis % x.ndim
    return np.square(x, dtype=np.float64).sum(axis=tuple(i for i in range(x.ndim) if i != axis))


def calibrate(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], weights: Sequence[str], *,
              batch: int = EVAL_BATCH) -> Calibration:
    """The input-feature norms of ``weights`` over ``feeds`` (input name -> array, first axis samples)."""
    uses, refused = weight_uses(model, weights)
    cal = Calibration(magnitude=dict(refused), samples=len(next(iter(feeds.values()))))
    taps = sorted({(u.activation, u.act_axis) for found in uses.values() for u in found})
    sums: dict[tuple[str, int], np.ndarray] = {}
    bad: dict[tuple[str, int], str] = {}

    def add(key: tuple[str, int], value: np.ndarray) -> None:
        if key in bad:
            return
        if value.ndim < 2 or not -value.ndim <= key[1] < value.ndim:
            bad[key] = f"activation {key[0]!r} has shape {list(value.shape)}, no feature axis {key[1]}"
        elif not np.issubdtype(value.dtype, np.floating):
            bad[key] = f"activation {key[0]!r} is {value.dtype}, not float"
        else:
            s = _sum_squares(value, key[1])
            if key in sums and sums[key].shape != s.shape:
                bad[key] = f"activation {key[0]!r} changes its feature count between batches"
            else:
                sums[key] = sums[key] + s if key in sums else s

    graph_inputs = set(feeds)
    run = sorted({name for name, _ in taps if name not in graph_inputs})
    for key in taps:  # graph inputs read by a weighted node: straight from the feeds
        if key[0] in graph_inputs:
            for start in range(0, cal.samples, batch):
                add(key, np.asarray(feeds[key[0]][start : start + batch]))
    if run:
        sess = session(with_taps(model, run), name="calibration (weighted nodes' inputs as outputs)")
        for got in iter_batches(sess, feeds, run, batch=batch):
            for key in taps:
                if key[0] in got:
                    add(key, got[key[0]])
    shapes = {t.name: list(t.dims) for t in model.graph.initializer if t.name in uses}
    for name, found in uses.items():
        problems = [bad[(u.activation, u.act_axis)] for u in found if (u.activation, u.act_axis) in bad]
        need = found[0].features(shapes[name])
        total = None
        for u in found:
            s = sums.get((u.activation, u.act_axis))
            if s is None or len(s) != need:
                problems.append(f"{u.op} {u.node!r}: {need} input features expected, the activation has "
                                f"{None if s is None else len(s)}")
            else:
                total = s if total is None else total + s
        if problems or total is None:
            cal.magnitude[name] = problems[0] if problems else "no activation read"
        elif not np.isfinite(total).all():
            cal.magnitude[name] = f"non-finite activations at {found[0].activation!r}"
        else:
            cal.uses[name] = found[0]
            cal.norms[name] = np.sqrt(total)
    return cal


def wanda_scores(w: np.ndarray, use: WeightUse, norm: np.ndarray) -> np.ndarray:
    """``|W| * ||X_j||`` with the norm of each weight's input feature (same shape as ``w``)."""
    if use.op == "Conv":
        out, per_group = w.shape[:2]
        rows = norm.reshape(use.groups, per_group)[np.arange(out) // (out // use.groups)]  # [O, I/g]
        return np.abs(w) * rows.reshape(out, per_group, *([1] * (w.ndim - 2)))
    shape = [1] * w.ndim
    shape[use.in_axis] = -1
    return np.abs(w) * norm.reshape(shape)


def lowest_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """True for the ``round(sparsity * row length)`` lowest scores of every row of a 2-D array."""
    k = int(round(sparsity * scores.shape[1]))
    mask = np.zeros(scores.shape, dtype=bool)
    if k > 0:
        idx = np.argpartition(scores, k - 1, axis=1)[:, :k]
        np.put_along_axis(mask, idx, True, axis=1)
    return mask


def per_row(use: WeightUse, shape: Sequence[int]) -> bool:
    """Whether the scores of a weight are compared within output rows (False: across the tensor)."""
    return not (use.op == "Conv" and shape[1] == 1)


def prune_mask(w: np.ndarray, use: WeightUse | None, norm: np.ndarray | None, sparsity: float) -> np.ndarray:
    """Which weights of ``w`` to zero: Wanda per row (``use`` and ``norm`` given), else by magnitude across the tensor."""
    if use is None or norm is None:
        return lowest_mask(np.abs(w).reshape(1, -1), sparsity).reshape(w.shape)
    scores = np.moveaxis(wanda_scores(w, use, norm), use.out_axis, 0)
    rows = scores.reshape(scores.shape[0], -1) if per_row(use, w.shape) else scores.reshape(1, -1)
    return np.moveaxis(lowest_mask(rows, sparsity).reshape(scores.shape), 0, use.out_axis)


def prune_wanda(model: onnx.ModelProto, sparsity: float, calibration: Calibration, *,
                exclude: Iterable[str] = ()) -> onnx.ModelProto:
    """Zero the lowest-scoring ``sparsity`` share of every output row of each calibrated weight
    (``calibration.magnitude``'s weights: the smallest-magnitude share of the tensor)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    out = copy_model(model)
    skip = set(exclude)
    index = {t.name: i for i, t in enumerate(out.graph.initializer)}
    for name in calibration.weights:
        if name in skip or name not in index:
            continue
        t = out.graph.initializer[index[name]]
        w = numpy_helper.to_array(t)
        mask = prune_mask(w, calibration.uses.get(name), calibration.norms.get(name), sparsity)
        t.CopyFrom(numpy_helper.from_array(np.where(mask, np.zeros((), w.dtype), w).astype(w.dtype), name))
    return out
