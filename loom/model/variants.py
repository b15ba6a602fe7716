"""Variants of one dense ONNX model, made without retraining: pruned, structured, int8, fp16.

Unstructured variants are pruned with Wanda's calibration-aware score (``wanda.py``) when
the family has calibration data, by magnitude (``prune_unstructured``) otherwise or on request.

``make_variants`` adds such variants to a family and records each one's accuracy. The
nodes that write a family's cut tensors stay float, so cuts survive quantization.
How each kind is made and why: ``docs/model.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from loom.core.atomic import staged_file, staged_folder
from loom.core.errors import ManifestError, ModelError
from loom.core.onnxutil import copy_model, infer_shapes, load_model, save_model
from loom.core.runref import predicted_classes, run_batched, session
from loom.model.family import DataSpec, Family, Manifest, Metric, Variant, load_family
from loom.model.importing import normalize_model, read_sample, tensor_spec
from loom.model.precision import CHANNELWISE, convert_fp16, preserved_tensors, quantize_int8
from loom.model.scoring import score, targets
from loom.model.wanda import Calibration, calibrate, per_row, prune_wanda

Progress = Callable[[str], None]
WEIGHTED_OPS = {"Conv": 1, "Gemm": 1, "MatMul": 1}
#: the unstructured pruners: calibration-aware (``wanda.py``) and per-tensor magnitude
PRUNERS = ("wanda", "magnitude")


def _set_init(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(graph.initializer):
        if t.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(t).dtype), name))
            return
    raise KeyError(name)


# -- unstructured -------------------------------------------------------------------------
def prunable_weights(model: onnx.ModelProto, *, min_size: int = 256) -> list[str]:
    """Initializers that are the weight input of a Conv, Gemm or MatMul (and not tiny)."""
    inits = {t.name: t for t in model.graph.initializer}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS:
            for x in node.input[:2]:
                t = inits.get(x)
                if t is not None and len(t.dims) >= 2 and int(np.prod(t.dims)) >= min_size and x not in names:
                    names.append(x)
    return names


def prune_unstructured(model: onnx.ModelProto, sparsity: float, *, exclude: Iterable[str] = ()) -> onnx.ModelProto:
    """Zero the smallest-magnitude ``sparsity`` share of each prunable weight tensor."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    out = copy_model(model)
    skip = set(exclude)
    for name in prunable_weights(out):
        if name in skip:
            continue
        w = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == name))
        k = int(round(sparsity * w.size))
        if k == 0:
            continue
        threshold = np.partition(np.abs(w).ravel(), k - 1)[k - 1]
        pruned = np.where(np.abs(w) <= threshold, 0, w)
        _set_init(out.graph, name, pruned)
    return out


def weight_sparsity(model: onnx.ModelProto) -> float:
    """Share of zeros among the prunable weights."""
    inits = {t.name: t for t in model.graph.initializer}
    total = zeros = 0
    for name in prunable_weights(model):
        w = numpy_helper.to_array(inits[name])
        total += w.size
        zeros += int((w == 0).sum())
    return zeros / total if total else 0.0


# -- structured ------------------------------------------------------------------------------


@dataclass
class ChannelGroup:
    """Channels that can be removed together: one producer, channelwise ops, weighted sinks."""

    producer: int
    channels: int
    axis: int  # channel axis of the tensors in the region
    region: list[int] = field(default_factory=list)  # channelwise nodes
    sinks: list[tuple[int, int]] = field(default_factory=list)  # (node, weight axis to slice)


def _weight_layout(node: onnx.NodeProto, w: np.ndarray, as_sink: bool) -> int | None:
    """The axis of weight ``w`` that holds output channels (producer) or input channels (sink)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        if attrs.get("group", 1) != 1:
            return None
        return 1 if as_sink else 0
    if node.op_type == "MatMul":
        return 0 if as_sink else 1
    if node.op_type == "Gemm":
        if attrs.get("transA", 0):
            return None
        trans_b = attrs.get("transB", 0)
        if as_sink:
            return 1 if trans_b else 0
        return 0 if trans_b else 1
    return None


def channel_groups(model: onnx.ModelProto) -> list[ChannelGroup]:
    """Every prunable group of the graph (see ``prune_structured``)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    shapes = infer_shapes(model)
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(g.node):
        for x in n.input:
            readers.setdefault(x, []).append(i)
    outputs = {o.name for o in g.output}
    # Scalars written by Constant nodes (GELU's 0.5, 1/sqrt(2), 1.0 in torch exports)
    scalars = {
        n.output[0] for n in g.node
        if n.op_type == "Constant" and any(
            a.name == "value" and int(np.prod(a.t.dims)) == 1 for a in n.attribute
        )
    }
    groups = []
    for p, node in enumerate(g.node):
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim < 2:
            continue
        w_axis = _weight_layout(node, w, as_sink=False)
        if w_axis is None:
            continue
        channels = w.shape[w_axis]
        rank = len(shapes.get(node.output[0], ([], 0))[0])
        if rank < 2:
            continue
        axis = 1 if node.op_type == "Conv" or (node.op_type == "Gemm") else rank - 1
        group = ChannelGroup(producer=p, channels=channels, axis=axis)
        if _grow(group, g, node.output[0], inits, readers, outputs, rank, scalars):
            groups.append(group)
    return groups


def _per_channel_ok(shape: Sequence[int], channels: int, axis: int, rank: int) -> bool:
    if int(np.prod(shape)) == 1:
        return True
    aligned = [1] * (rank - len(shape)) + list(shape)
    return len(aligned) == rank and aligned[axis] == channels and int(np.prod(aligned)) == channels


def _grow(group, g, start, inits, readers, outputs, rank, scalars) -> bool:  # noqa: ANN001
    """Collect the channelwise region fed by ``start`` and its weighted sinks; False if not internal.

    First the region is grown forward (through channelwise ops, stopping at weighted
    ops), then every region node's other inputs are checked: each must be a region
    tensor, a scalar or a per-channel constant. Checking only after growing matters for
    GELU, whose final Mul reads two region tensors reached along different paths.
    """
    region_tensors = {start}
    frontier = [start]
    while frontier:
        t = frontier.pop()
        if t in outputs:
            return False
        for c in readers.get(t, []):
            node = g.node[c]
            if c in group.region or any(s == c for s, _ in group.sinks):
                continue
            if node.op_type in WEIGHTED_OPS and node.input[0] == t and len(node.input) > 1 and node.input[1] in inits:
                w = numpy_helper.to_array(inits[node.input[1]])
                w_axis = _weight_layout(node, w, as_sink=True)
                if w_axis is None or w.shape[w_axis] != group.channels or t in node.input[1:]:
                    return False
                group.sinks.append((c, w_axis))
                continue
            if node.op_type not in CHANNELWISE:
                return False  # a reshape, a pooling over channels, a concat...: not internal
            group.region.append(c)
            region_tensors.add(node.output[0])
            frontier.append(node.output[0])
    for c in group.region:
        node = g.node[c]
        if node.op_type == "BatchNormalization":
            if any(x not in inits for x in node.input[1:]):
                return False
            continue
        for x in node.input:
            if not x or x in region_tensors or x in scalars:
                continue
            if x in inits and _per_channel_ok(inits[x].dims, group.channels, group.axis, rank):
                continue
            return False  # mixes with a full-width tensor (a residual add): not internal
    return bool(group.sinks)


def prune_structured(model: onnx.ModelProto, sparsity: float) -> tuple[onnx.ModelProto, int]:
    """Physically remove the lowest-L1 ``sparsity`` share of channels in every internal group.

    A group starts at a Conv/Gemm/MatMul with constant weights, flows through channelwise
    ops (activations, bias adds, batch norms, pooling) and ends only in other weighted
    ops. Any tensor that leaves such a region (a block output, a residual add, a graph
    output, a reshape into heads) disqualifies it, which is what keeps the cuts' shapes.
    Returns the pruned model and the number of groups pruned.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    out = copy_model(model)
    g = out.graph
    groups = channel_groups(out)
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    new_inits: dict[str, np.ndarray] = {}
    for gi, group in enumerate(groups):
        prod = g.node[group.producer]
        w = inits[prod.input[1]]
        w_axis = _weight_layout(prod, w, as_sink=False)
        score = np.abs(np.moveaxis(w, w_axis, 0)).reshape(group.channels, -1).sum(axis=1)
        bias_name = prod.input[2] if len(prod.input) > 2 and prod.input[2] else None
        if bias_name is not None:
            score = score + np.abs(inits[bias_name].reshape(-1))
        keep_n = max(1, int(round(group.channels * (1 - sparsity))))
        keep = np.sort(np.argsort(-score, kind="stable")[:keep_n])

        def sliced(name: str, axis: int, tag: str, keep: np.ndarray = keep, gi: int = gi) -> str:
            value = np.take(inits[name], keep, axis=axis)
            new = f"{name}__{tag}{gi}"
            new_inits[new] = inits[new] = value  # a sink's weight may be the next group's producer
            return new

        prod.input[1] = sliced(prod.input[1], w_axis, "out")
        if bias_name is not None:
            prod.input[2] = sliced(bias_name, 0, "out")
        rank = 4 if prod.op_type == "Conv" else 2
        for r in group.region:
            node = g.node[r]
            if node.op_type == "BatchNormalization":
                for j in range(1, len(node.input)):
                    node.input[j] = sliced(node.input[j], 0, "bn")
                continue
            for j, x in enumerate(node.input):
                if x in inits and int(np.prod(inits[x].shape)) > 1:
                    shape = inits[x].shape
                    axis = group.axis - (max(rank, len(shape)) - len(shape)) if prod.op_type == "Conv" else len(shape) - 1
                    node.input[j] = sliced(x, axis, "ch")
        for s, axis in group.sinks:
            g.node[s].input[1] = sliced(g.node[s].input[1], axis, "in")
    # Rebuild initializers: new slices in, tensors no node reads any more out.
    read = {x for n in g.node for x in n.input}
    kept = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(kept)
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in new_inits.items() if k in read)
    del g.value_info[:]
    onnx.checker.check_model(out)
    return out, len(groups)


# -- families ----------------------------------------------------------------------------------
def measure_accuracy(family: Family, path: Path, *, reference: np.ndarray | None = None, label: str = "",
                     limit: int | None = None) -> float:
    """The family's metric for the model at ``path`` (``scoring.score``; NaN/inf refused), on
    the first ``limit`` evaluation samples (None: all)."""
    feeds, y = family.eval_feeds(limit)
    sess = session(load_model(path), name=str(path))
    out_name = family.manifest.output.name
    outputs = run_batched(sess, feeds)[out_name]
    what = f"{label or path.name}: output {out_name!r}"
    if family.manifest.metric.name == "agreement":
        if reference is None:
            raise ValueError("metric 'agreement' needs the dense variant's logits as reference")
        return score(family, outputs, predicted_classes(reference[:limit], name="dense reference"), name=what)
    return score(family, outputs, targets(family, feeds, y), name=what)


def init_family(
    dense: str | Path,
    out_dir: str | Path,
    *,
    task: str,
    num_classes: int,
    eval_file: str = "eval.npz",
    calib_file: str = "calib.npz",
    metric: str = "top1",
    description: str = "",
    made_by: str = "",
    fine_tuned: str | None = None,
) -> Family:
    """Start a family in ``out_dir`` from one dense ONNX (normalized on import, then copied there).

    The data files must already be in ``out_dir``. Everything is written into a folder
    beside ``out_dir`` and moved in only once the dense variant is scored: a failure
    leaves ``out_dir`` as it was.
    """
    out = Path(out_dir)
    raw = load_model(dense, check=False)
    names = [i.name for i in raw.graph.input if i.name not in {t.name for t in raw.graph.initializer}]
    sample = read_sample(out / eval_file, "eval_data", names)
    read_sample(out / calib_file, "calib_data", names)
    imported = normalize_model(raw, name=str(dense), sample=sample)
    model = imported.model
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if not inputs or len(model.graph.output) != 1:
        raise ModelError(f"{dense}: a family model needs at least one input and exactly one output "
                         f"(has {len(inputs)} and {len(model.graph.output)})")
    made_by = made_by or "the dense model"
    if imported.notes:
        made_by += "; normalized on import: " + "; ".join(imported.notes)
    manifest = Manifest(
        task=task, description=description, inputs=[tensor_spec(i) for i in inputs],
        output=tensor_spec(model.graph.output[0]), num_classes=num_classes, metric=Metric(name=metric),
        eval_data=DataSpec(file=eval_file, y=None if metric == "agreement" else "y"),
        calib_data=DataSpec(file=calib_file, y=None),
        variants=[Variant(name="dense", file="dense.onnx", kind="dense", made_by=made_by)],
    )
    with staged_folder(out, link=sorted({eval_file, calib_file})) as stage:
        save_model(model, stage / "dense.onnx")
        Family(manifest, stage).save()
        add_variant(load_family(stage), "dense", stage / "dense.onnx", kind="dense", made_by=made_by,
                    fine_tuned=fine_tuned, normalize=False)
    return load_family(out)


def add_variant(
    family: Family,
    name: str,
    path: Path,
    *,
    kind: str,
    sparsity: float | None = None,
    precision: str = "fp32",
    made_by: str = "",
    accuracy: float | None = None,
    fine_tuned: str | None = None,
    normalize: bool = True,
) -> Variant:
    """Record (or replace) a variant whose file is already in the family folder; measure it
    (unless ``accuracy`` was measured already).

    The file is normalized as the dense model was (``importing``): a variant exported at an
    older opset is converted, so that blocks of different variants can be merged into one
    graph; what was done is added to ``made_by``. ``normalize=False``: the file was made
    here from the normalized dense model (or is it), so there is nothing to redo.
    """
    path = Path(path).resolve()
    try:
        file = str(path.relative_to(family.root.resolve()))
    except ValueError:
        raise ManifestError(f"{path}: a variant's file must be inside the family folder {family.root}") from None
    if not normalize:
        load_model(path)  # checked
    elif (imported := normalize_model(load_model(path, check=False), name=str(path),
                                      sample=family.eval_feeds(2)[0])).notes:
        with staged_file(path) as tmp:
            save_model(imported.model, tmp)
        note = "normalized on import: " + "; ".join(imported.notes)
        made_by = f"{made_by}; {note}" if made_by else note
    if accuracy is None:
        accuracy = measure_accuracy(family, path, reference=_reference(family))
    variant = Variant(
        name=name,
        file=file,
        kind=kind,  # type: ignore[arg-type]
        sparsity=round(weight_sparsity(load_model(path)) if sparsity is None else sparsity, 4),
        precision=precision,  # type: ignore[arg-type]
        made_by=made_by,
        accuracy=round(accuracy, 5),
        size_bytes=path.stat().st_size,
        fine_tuned=fine_tuned,  # type: ignore[arg-type]
    )
    others = [v for v in family.manifest.variants if v.name != name]
    family.manifest.variants = [*others, variant] if len(others) == len(family.manifest.variants) else [
        variant if v.name == name else v for v in family.manifest.variants
    ]
    family.save()
    return variant


def _reference(family: Family) -> np.ndarray | None:
    """The dense variant's outputs, for metric 'agreement' (None for top1)."""
    if family.manifest.metric.name != "agreement":
        return None
    dense = family.variant_path(family.reference_variant().name)
    feeds, _ = family.eval_feeds()
    return run_batched(session(load_model(dense), name=str(dense)), feeds)[family.manifest.output.name]


def _add_made(family: Family, name: str, model: onnx.ModelProto, **record: object) -> None:
    """Write variant ``name`` beside its final file, score it, and only then move it in and record it."""
    target = family.root / f"{name}.onnx"
    with staged_file(target) as tmp:
        save_model(model, tmp)
        accuracy = measure_accuracy(family, tmp, reference=_reference(family), label=name)
    add_variant(family, name, target, accuracy=accuracy, normalize=False, **record)  # type: ignore[arg-type]


def _unstructured_pruner(family: Family, base: onnx.ModelProto, pruner: str | None,
                         say: Progress) -> tuple[Calibration | None, str]:
    """Wanda's calibration of ``base`` (None: magnitude pruning) and, for a fallback, why."""
    if pruner == "magnitude":
        return None, ""
    feeds = family.calib_feeds()
    samples = len(next(iter(feeds.values())))
    if samples == 0:
        why = f"the calibration data ({family.manifest.calib_data.file}) has no samples"
        if pruner == "wanda":
            raise ManifestError(f"{family.path}: calib_data: Wanda pruning needs calibration samples; {why}")
        say(f"{family.task}: magnitude pruning for the unstructured variants: {why}")
        return None, f" (not Wanda: {why})"
    say(f"{family.task}: Wanda calibration on {samples} samples")
    return calibrate(base, feeds, prunable_weights(base)), ""


def _add_unstructured(family: Family, base: onnx.ModelProto, source: str, sparsities: Sequence[float],
                      pruner: str | None, say: Progress) -> None:
    """The unstructured variants of ``base``, by Wanda or by magnitude (``make_variants``)."""
    calibration, fallback = _unstructured_pruner(family, base, pruner, say)
    for s in sparsities:
        name = f"unstructured-{round(s * 100)}-pt"
        say(f"{family.task}: {name}")
        if calibration is not None:
            pruned = prune_wanda(base, s, calibration)
            how = _wanda_made_by(calibration, base)
            made_by = f"loom: Wanda pruning of {source} to {s:.0%} ({weight_sparsity(pruned):.2%} achieved; {how}), no fine-tuning"
        else:
            pruned = prune_unstructured(base, s)
            made_by = (f"loom: per-layer magnitude pruning of {source} to {s:.0%} ({weight_sparsity(pruned):.2%} achieved)"
                       f"{fallback}, no fine-tuning")
        _add_made(family, name, pruned, kind="unstructured", fine_tuned="no", made_by=made_by)


def _wanda_made_by(calibration: Calibration, base: onnx.ModelProto) -> str:
    """How a Wanda variant was scored, for its ``made_by``."""
    dims = {t.name: list(t.dims) for t in base.graph.initializer if t.name in calibration.uses}
    depthwise = sum(1 for name, u in calibration.uses.items() if not per_row(u, dims[name]))
    parts = [f"|W|*||X|| compared within each output row, ||X|| over {calibration.samples} calibration samples"]
    if depthwise:
        parts.append(f"{depthwise} depthwise conv(s) compared across the tensor")
    if calibration.magnitude:
        parts.append(f"{len(calibration.magnitude)} weight(s) by magnitude across the tensor "
                     f"({'; '.join(sorted(set(calibration.magnitude.values()))[:3])})")
    return "; ".join(parts)


def make_variants(
    family: Family | str | Path,
    *,
    unstructured: Sequence[float] = (),
    structured: Sequence[float] = (),
    int8: bool = False,
    fp16: bool = False,
    source: str = "dense",
    pruner: str | None = None,
    progress: Progress | None = None,
) -> Family:
    """Add post-training variants of ``source`` to a family and record their accuracy.

    ``pruner`` makes the unstructured variants: ``"wanda"`` scores weights by magnitude times
    the norm of their input on the family's calibration data (``wanda.py``), ``"magnitude"``
    by magnitude alone (``prune_unstructured``); None: Wanda when the family has calibration
    samples, else magnitude, and ``progress`` and the variant's ``made_by`` say so. The
    sparsity recorded is the share of zeros actually reached.
    """
    family = family if isinstance(family, Family) else load_family(family)
    say = progress or (lambda _m: None)
    if pruner is not None and pruner not in PRUNERS:
        raise ValueError(f"pruner must be one of {PRUNERS} (or None: wanda when there is calibration data), got {pruner!r}")
    src_path = family.variant_path(source)
    base = load_model(src_path)
    keep = preserved_tensors(base)
    if unstructured:
        _add_unstructured(family, base, source, unstructured, pruner, say)
    for s in structured:
        name = f"structured-{round(s * 100)}-pt"
        say(f"{family.task}: {name}")
        pruned, n = prune_structured(base, s)
        _add_made(family, name, pruned, kind="structured", sparsity=s,
                  fine_tuned="no", made_by=f"loom: removed the lowest-L1 {s:.0%} of channels in {n} internal groups of {source}, no fine-tuning")
    suffix = "" if source == "dense" else f"{source}-"
    src_sparsity = family.variant(source).sparsity
    if int8:
        name = f"{suffix}int8"
        say(f"{family.task}: {name}")
        calib = family.calib_feeds()
        _add_made(family, name, quantize_int8(base, calib, preserve=keep), kind="int8", precision="int8",
                  sparsity=src_sparsity, fine_tuned="no",
                  made_by=f"loom: onnxruntime static QDQ int8 of {source} (uint8 activations, per-channel 7-bit-range int8 weights, "
                          f"{len(next(iter(calib.values())))} calibration samples), cut tensors {keep} kept float")
    if fp16:
        name = f"{suffix}fp16"
        say(f"{family.task}: {name}")
        _add_made(family, name, convert_fp16(base, preserve=keep), kind="fp16", precision="fp16", sparsity=src_sparsity, fine_tuned="no",
                  made_by=f"loom: float16 conversion of {source} (onnxconverter-common), float32 at inputs, outputs and cuts")
    return family
