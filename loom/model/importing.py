"""Import a model as exported in the wild: one static graph, a current opset, a free batch axis.

``normalize_model`` turns what exporters commonly write into what the offline pipeline
needs, and says what it did (``Imported.notes``, recorded in the manifest): initializers
listed as graph inputs (IR 3) are dropped from the inputs, an old opset is converted
(``onnx.version_converter``), an ``If`` on a constant condition is replaced by its branch,
a batch axis fixed at 1 becomes symbolic (with the ``Reshape`` constants that hard-code
it), and shapes are inferred again. The result must run a batch of 2 exactly as two
batch-1 runs. What cannot be normalized is a ``ModelError`` naming the op or the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from loom.core.errors import ManifestError, ModelError
from loom.core.onnxutil import check_model, copy_model, infer_shapes
from loom.core.runref import session
from loom.model.family import TensorSpec

#: opsets below this are converted to TARGET_OPSET (per-channel QDQ int8 needs 13)
MIN_OPSET = 13
TARGET_OPSET = 17
BATCH = "batch"
GRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


@dataclass
class Imported:
    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)


def normalize_model(model: onnx.ModelProto, *, name: str,
                    sample: np.ndarray | Mapping[str, np.ndarray] | None = None) -> Imported:
    """A normalized copy of ``model`` and what was done to it; ``sample``: a few real inputs
    (one array for a one-input model, else input name -> array)."""
    m = copy_model(model)
    notes: list[str] = []
    _refuse_zero_dims(m, name)
    _drop_initializer_inputs(m, notes)
    _inline_static_ifs(m, name, notes)
    _upgrade_opset(m, name, notes)
    batch = _symbolic_batch(m, name, notes)
    if batch is not None:
        _batch_reshapes(m, name, batch, notes)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as exc:
        raise ModelError(f"{name}: shape inference fails after import: {exc}") from exc
    check_model(m, name=name)
    _check_batch_runs(m, name, sample)
    return Imported(m, notes)


def tensor_spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    tt = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    if dtype not in ("float32", "int64", "int32"):
        raise ModelError(f"{vi.name}: a family's input and output are float32, int64 or int32, not {dtype}")
    return TensorSpec(name=vi.name, shape=dims, dtype=dtype)  # type: ignore[arg-type]


def read_sample(path: Path, field: str, inputs: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The first two samples of every input in a data file, read before anything is written.

    A model with one input reads array ``x``; one with several reads the array named
    after each input (``inputs``).
    """
    arrays = {name: name for name in inputs} if len(inputs) > 1 else {(inputs[0] if inputs else "x"): "x"}
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = sorted(a for a in arrays.values() if a not in data.files)
            if missing:
                raise ManifestError(f"{field}: {path} has no array(s) {missing} for the model's inputs "
                                    f"(has {sorted(data.files)})")
            return {name: data[a][:2] for name, a in arrays.items()}
    except ManifestError:
        raise
    except Exception as exc:
        raise ManifestError(f"{field}: cannot read {path}: {exc}") from exc


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        out.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None))
    return out


def _graph_inputs(m: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in m.graph.initializer}
    return [i for i in m.graph.input if i.name not in inits]


def _refuse_zero_dims(m: onnx.ModelProto, name: str) -> None:
    for kind, values in (("input", m.graph.input), ("output", m.graph.output)):
        for vi in values:
            dims = _dims(vi)
            if 0 in dims:
                raise ModelError(
                    f"{name}: {kind} {vi.name!r} has a zero-sized dimension (axis {dims.index(0)} of {dims}); "
                    "no data flows through it, so it cannot be evaluated or cut"
                )


def _drop_initializer_inputs(m: onnx.ModelProto, notes: list[str]) -> None:
    """IR 3 lists every initializer among the graph inputs; IR >= 4 keeps them constant."""
    inits = {t.name for t in m.graph.initializer}
    kept = [i for i in m.graph.input if i.name not in inits]
    dropped = len(m.graph.input) - len(kept)
    if dropped:
        del m.graph.input[:]
        m.graph.input.extend(kept)
        notes.append(f"{dropped} initializer(s) removed from the graph inputs (IR {m.ir_version})")
    m.ir_version = max(m.ir_version, 4)


def _constants(g: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for node in g.node:
        if node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _inline_static_ifs(m: onnx.ModelProto, name: str, notes: list[str]) -> None:
    """Replace each If on a constant condition by the branch it takes; refuse other subgraphs."""
    g = m.graph
    for _ in range(100):  # nested Ifs surface once their parent is inlined
        consts = _constants(g)
        found = next(((i, n) for i, n in enumerate(g.node) if any(a.type in GRAPH_ATTRS for a in n.attribute)), None)
        if found is None:
            return
        i, node = found
        label = node.name or f"{node.op_type}_{i}"
        if node.op_type != "If":
            raise ModelError(f"{name}: {node.op_type} node {label!r} holds a subgraph; a family model must be one "
                             "static graph (cuts, pruning and quantization do not reach into subgraphs)")
        if node.input[0] not in consts:
            raise ModelError(f"{name}: If node {label!r}: its condition {node.input[0]!r} is computed from the "
                             "input, so neither branch can be chosen at import; a family model must be one static "
                             "graph (export with the branch resolved)")
        taken = "then_branch" if bool(np.asarray(consts[node.input[0]]).reshape(-1)[0]) else "else_branch"
        branch = next(a.g for a in node.attribute if a.name == taken)
        new_nodes, new_inits = _inlined(branch, node, f"{label}/")
        nodes = list(g.node)
        del g.node[:]
        g.node.extend([*nodes[:i], *new_nodes, *nodes[i + 1:]])
        g.initializer.extend(new_inits)
        notes.append(f"If node {label!r} on a constant condition replaced by its {taken}")
    raise ModelError(f"{name}: If nodes nested more than 100 deep")


def _inlined(branch: onnx.GraphProto, node: onnx.NodeProto, prefix: str) -> tuple[list, list]:
    """The branch's nodes and initializers, renamed so that they write the If node's outputs."""
    made = {o for n in branch.node for o in n.output if o}
    internal = made | {t.name for t in branch.initializer}
    out_map = {bo.name: io for bo, io in zip(branch.output, node.output, strict=True) if bo.name in made}

    def ren(x: str) -> str:
        return out_map.get(x) or (prefix + x if x in internal else x)

    nodes = []
    for n in branch.node:
        n2 = onnx.NodeProto()
        n2.CopyFrom(n)
        n2.name = prefix + (n.name or n.op_type)
        for seq in (n2.input, n2.output):
            for j, x in enumerate(seq):
                seq[j] = ren(x) if x else x
        nodes.append(n2)
    for bo, io in zip(branch.output, node.output, strict=True):
        if bo.name not in made:  # an outer tensor or a branch initializer passed through
            nodes.append(onnx.helper.make_node("Identity", [ren(bo.name)], [io], name=f"{prefix}{io}"))
    inits = []
    for t in branch.initializer:
        t2 = onnx.TensorProto()
        t2.CopyFrom(t)
        t2.name = prefix + t.name
        inits.append(t2)
    return nodes, inits


def _upgrade_opset(m: onnx.ModelProto, name: str, notes: list[str]) -> None:
    version = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        raise ModelError(f"{name}: opset_import: no default (ai.onnx) opset")
    if version > onnx.defs.onnx_opset_version():
        raise ModelError(f"{name}: opset_import: opset {version} is newer than this onnx supports "
                         f"({onnx.defs.onnx_opset_version()})")
    if version < MIN_OPSET:
        try:
            converted = onnx.version_converter.convert_version(m, TARGET_OPSET)
        except Exception as exc:
            raise ModelError(f"{name}: opset_import: cannot convert opset {version} to {TARGET_OPSET} "
                             f"(onnx.version_converter: {exc})") from exc
        m.CopyFrom(converted)
        notes.append(f"opset {version} converted to {TARGET_OPSET} (onnx.version_converter)")
    m.ir_version = max(m.ir_version, onnx.helper.find_min_ir_version_for(list(m.opset_import)))


def _symbolic_batch(m: onnx.ModelProto, name: str, notes: list[str]) -> str | None:
    """Make a batch axis fixed at 1 symbolic; the batch symbol, or None if inputs have no batch axis."""
    inputs = _graph_inputs(m)
    firsts = [(_dims(i) or [None])[0] for i in inputs]
    fixed = [(i.name, d) for i, d in zip(inputs, firsts, strict=True) if isinstance(d, int) and d > 1]
    if fixed:
        raise ModelError(f"{name}: input {fixed[0][0]!r} has a batch axis fixed at {fixed[0][1]}; "
                         "evaluation runs any batch size: export with a dynamic (or batch-1) first axis")
    if not inputs or any(not i.type.tensor_type.shape.dim for i in inputs):
        return None
    if all(d == 1 for d in firsts):
        touched = []
        for vi in [*inputs, *m.graph.output]:
            dims = vi.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
                dims[0].dim_param = BATCH  # clears dim_value (a oneof)
                touched.append(vi.name)
        del m.graph.value_info[:]  # inferred again, without the fixed batch
        notes.append(f"batch axis fixed at 1 made symbolic ({BATCH!r}) on {touched}")
        return BATCH
    symbols = {d for d in firsts if isinstance(d, str)}
    return symbols.pop() if len(symbols) == 1 else None


def _batch_reshapes(m: onnx.ModelProto, name: str, batch: str, notes: list[str]) -> None:
    """Rewrite Reshape shape constants whose leading 1 is the batch (to 0, or -1), one pass per layer."""
    g = m.graph
    for _ in range(len(g.node) + 1):
        shapes = infer_shapes(m)
        consts = _constants(g)
        changed = False
        for i, node in enumerate(g.node):
            if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in consts:
                continue
            target = np.asarray(consts[node.input[1]]).astype(np.int64).reshape(-1)
            data = shapes.get(node.input[0], ([], 0))[0]
            if not len(target) or target[0] != 1 or not data or data[0] != batch:
                continue
            label = node.name or f"Reshape_{i}"
            allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
            if not allowzero:
                target[0] = 0  # copy the data's first axis: the batch
            elif -1 not in target:
                target[0] = -1
            else:
                raise ModelError(f"{name}: Reshape node {label!r}: its shape {consts[node.input[1]].tolist()} "
                                 "hard-codes a batch of 1 and cannot take 0 (allowzero) or -1 (already used)")
            new = f"{node.input[1]}__{BATCH}"
            g.initializer.append(numpy_helper.from_array(target, new))
            notes.append(f"Reshape node {label!r}: shape {consts[node.input[1]].tolist()} -> {target.tolist()}")
            node.input[1] = new
            changed = True
        if not changed:
            return


def _feeds(m: onnx.ModelProto, sample: np.ndarray | Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    inputs = _graph_inputs(m)
    if isinstance(sample, np.ndarray) and len(inputs) == 1:
        sample = {inputs[0].name: sample}
    if sample is not None and all(vi.name in sample and len(sample[vi.name]) >= 2 for vi in inputs):
        return {vi.name: np.asarray(sample[vi.name][:2]) for vi in inputs}
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in inputs:
        dims = [d if isinstance(d, int) else (2 if j == 0 else 4) for j, d in enumerate(_dims(vi))]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = (rng.standard_normal(dims) if np.issubdtype(dtype, np.floating) else np.zeros(dims)).astype(dtype)
    return feeds


def _check_batch_runs(m: onnx.ModelProto, name: str, sample: np.ndarray | Mapping[str, np.ndarray] | None) -> None:
    """A batch of 2 must give exactly what two batch-1 runs give (nothing mixes samples)."""
    feeds = _feeds(m, sample)
    sess = session(m, name=name)
    try:
        both = sess.run(None, feeds)
        ones = [sess.run(None, {k: v[j : j + 1] for k, v in feeds.items()}) for j in range(2)]
    except Exception as exc:
        raise ModelError(f"{name}: does not run at batch 1 and 2 after import: {exc}") from exc
    for o, got, a, b in zip(sess.get_outputs(), both, *ones, strict=True):
        want = np.concatenate([np.asarray(a), np.asarray(b)]) if np.ndim(a) else None
        if want is None or np.shape(got) != want.shape:
            raise ModelError(f"{name}: output {o.name!r} has no batch axis (shape {list(np.shape(got))} at batch 2)")
        scale = max(1.0, float(np.abs(want[np.isfinite(want)]).max(initial=0)))
        if not np.allclose(got, want, rtol=1e-4, atol=1e-5 * scale, equal_nan=True):
            raise ModelError(f"{name}: output {o.name!r} at batch 2 differs from two batch-1 runs; some op mixes "
                             "samples across the first axis or hard-codes the batch")
