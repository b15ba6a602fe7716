"""Stitched models: one variant per slot, run as a chain of blocks or merged into one graph.

A config such as ``("int8", "dense", "unstructured-80")`` names the variant whose
block fills each slot. ``StitchedModel`` runs the chain, each block on a backend
(one per slot, so a chain can span processors); ``merge_config`` builds one ONNX
graph from the same blocks, which removes the per-block call overhead and lets the
engine fuse across the cuts (PROBE.md: ~14 us per session.run).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from backends.base import Backend, LoadedBlock
from loom.core.errors import ManifestError
from loom.core.onnxutil import MAX_IR_VERSION, load_model, node_inputs
from loom.core.runref import EVAL_BATCH, predicted_classes, run_batched, session
from loom.model.family import Family
from loom.model.partition import Partition
from loom.model.scoring import score, targets

Config = tuple[str, ...]


def check_config(partition: Partition, config: Sequence[str]) -> Config:
    config = tuple(config)
    if len(config) != partition.k:
        raise ManifestError(
            f"config {list(config)} has {len(config)} slot(s); the partition of {partition.task} has {partition.k}"
        )
    unknown = sorted({v for v in config if v not in partition.variants})
    if unknown:
        raise ManifestError(f"config {list(config)}: unknown variant(s) {unknown} (have {sorted(partition.variants)})")
    return config


def _default_backend() -> Backend:
    from backends import get_backend

    return get_backend("onnxruntime")


class StitchedModel:
    """A config run as a chain of blocks; ``backends`` gives one backend per slot (or one for all)."""

    def __init__(
        self,
        partition: Partition,
        config: Sequence[str],
        *,
        backends: Backend | Sequence[Backend] | None = None,
    ) -> None:
        self.partition = partition
        self.config = check_config(partition, config)
        if backends is None:
            backends = _default_backend()
        self.backends = list(backends) if isinstance(backends, Sequence) else [backends] * partition.k
        if len(self.backends) != partition.k:
            raise ValueError(f"{len(self.backends)} backends for {partition.k} slots")
        self.block_ids = [partition.variants[v][s] for s, v in enumerate(self.config)]
        self._loaded: list[LoadedBlock] = []
        for backend, bid in zip(self.backends, self.block_ids, strict=True):
            self._loaded.append(backend.load(partition.block_path(bid), block_id=bid))

    def run(self, feeds: Mapping[str, np.ndarray], *, batch: int | None = None) -> dict[str, np.ndarray]:
        """Run the chain; returns every tensor the last block writes (the model's outputs)."""
        if batch is not None:
            n = len(next(iter(feeds.values())))
            parts = [self.run({k: v[i : i + batch] for k, v in feeds.items()}) for i in range(0, n, batch)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        env: dict[str, np.ndarray] = dict(feeds)
        out: dict[str, np.ndarray] = {}
        for backend, loaded in zip(self.backends, self._loaded, strict=True):
            out = backend.run(loaded, {n: env[n] for n in loaded.input_names})
            env.update(out)
        return out

    def memory_bytes(self) -> int:
        return sum(b.memory_bytes(lb) for b, lb in zip(self.backends, self._loaded, strict=True))

    def close(self) -> None:
        for backend, loaded in zip(self.backends, self._loaded, strict=True):
            backend.release(loaded)
        self._loaded = []

    def __enter__(self) -> StitchedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_config(partition: Partition, config: Sequence[str]) -> onnx.ModelProto:
    """One ONNX graph made of the config's blocks, outputs identical to the chain's.

    Names inside each block get a per-slot prefix (blocks of different variants may
    reuse initializer or node names); the tensors at the cuts keep theirs, which is
    what joins the blocks.
    """
    config = check_config(partition, config)
    blocks = [load_model(partition.block_path(partition.variants[v][s]), check=False) for s, v in enumerate(config)]
    interface = {t for cut in partition.cuts for t in cut}
    interface |= {i.name for i in blocks[0].graph.input} | {o.name for o in blocks[-1].graph.output}
    nodes, inits = [], []
    opsets: dict[str, int] = {}
    for s, block in enumerate(blocks):
        for op in block.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)

        def rename(name: str, s: int = s) -> str:
            return name if (not name or name in interface) else f"s{s}/{name}"

        for t in block.graph.initializer:
            t2 = onnx.TensorProto()
            t2.CopyFrom(t)
            t2.name = rename(t.name)
            inits.append(t2)
        for node in block.graph.node:
            n2 = onnx.NodeProto()
            n2.CopyFrom(node)
            del n2.input[:]
            n2.input.extend(rename(x) for x in node.input)
            del n2.output[:]
            n2.output.extend(rename(x) for x in node.output)
            n2.name = f"s{s}/{node.name}" if node.name else ""
            _rename_subgraph_reads(n2, rename)
            nodes.append(n2)
    graph = onnx.helper.make_graph(
        nodes, f"{partition.task}:" + "|".join(config),
        list(blocks[0].graph.input), list(blocks[-1].graph.output), initializer=inits,
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in sorted(opsets.items())]
    )
    model.ir_version = MAX_IR_VERSION
    model.producer_name = "sparseloom"
    return model


def _rename_subgraph_reads(node: onnx.NodeProto, rename) -> None:  # noqa: ANN001
    """Subgraphs (If/Loop) read outer tensors by name: rename those reads too."""
    for attr in node.attribute:
        subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subs:
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input}
            inner |= {t.name for t in sub.initializer}
            for n in sub.node:
                for j, x in enumerate(n.input):
                    if x and x not in inner and x in node_inputs(node):
                        n.input[j] = rename(x)


def evaluate_config(
    partition: Partition,
    config: Sequence[str],
    family: Family | None = None,
    *,
    merged: bool = True,
    limit: int | None = None,
    reference: np.ndarray | None = None,
) -> float:
    """The config's metric on the family's evaluation data (top-1, or agreement with dense).

    A sample whose outputs are NaN/inf counts as wrong: a stitched config is scored, never
    refused (its variants' own outputs were checked finite when they were made).
    """
    family = family or partition.family()
    feeds, y = family.eval_feeds(limit)
    out_name = family.manifest.output.name
    if merged:
        logits = run_batched(session(merge_config(partition, config), name="|".join(config)), feeds)[out_name]
    else:
        with StitchedModel(partition, config) as model:
            logits = model.run(feeds, batch=EVAL_BATCH)[out_name]
    what = f"config {'|'.join(config)}: output {out_name!r}"
    if reference is not None and family.manifest.metric.name == "agreement":
        target = predicted_classes(reference, name="reference")
    else:
        target = targets(family, feeds, y)
    return score(family, logits, target, name=what, nonfinite="wrong")


def evaluate_configs(
    partition: Partition,
    configs: Sequence[Sequence[str]],
    family: Family | None = None,
    *,
    on_done: Callable[[Config, float], None] | None = None,
    sessions: dict[str, object] | None = None,
    limit: int | None = None,
) -> dict[Config, float]:
    """The metric of many configs at once, sharing the work of common prefixes.

    Configs are walked as a tree over slots: the activations after slot ``s`` are
    computed once for every distinct prefix, so measuring all ``V**K`` configs costs
    about ``V**K / K`` full-model evaluations instead of ``V**K``. Blocks run on the
    reference engine (onnxruntime CPU), exactly the blocks the chain runs.

    ``sessions``: a dict kept by the caller across calls (block id -> session), so that
    measuring configs a few at a time (active sampling) does not reload every block.
    ``limit``: score on the first ``limit`` evaluation samples only (None: all).
    """
    family = family or partition.family()
    feeds, y = family.eval_feeds(limit)
    out_name = family.manifest.output.name
    wanted = [check_config(partition, c) for c in configs]
    labels = targets(family, feeds, y)
    if sessions is None:
        sessions = {}

    def run_block(bid: str, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if bid not in sessions:
            sessions[bid] = session(load_model(partition.block_path(bid), check=False), name=bid)
        info = partition.blocks[bid]
        # small batches (EVAL_BATCH): faster per sample, and each session's arena keeps its
        # peak while measuring every config holds ~50 sessions (at 256 a process grew to 16 GB)
        return run_batched(sessions[bid], {n: env[n] for n in info.inputs}, info.outputs)

    tree: dict = {}
    for c in wanted:
        node = tree
        for v in c:
            node = node.setdefault(v, {})
    results: dict[Config, float] = {}

    def walk(node: dict, prefix: tuple[str, ...], env: dict[str, np.ndarray]) -> None:
        s = len(prefix)
        for variant, child in node.items():
            out = run_block(partition.variants[variant][s], env)
            config = (*prefix, variant)
            if s == partition.k - 1:
                acc = score(family, out[out_name], labels, name=f"config {'|'.join(config)}", nonfinite="wrong")
                results[config] = acc
                if on_done:
                    on_done(config, acc)
            else:
                walk(child, config, {**env, **out})

    walk(tree, (), dict(feeds))
    return {c: results[c] for c in wanted}

