"""``loom partition``: cut every variant of a family into K slots, write and verify the blocks.

The blocks go into a content-addressed block store (by default ``blockstore/`` beside the
partition folder), keyed by the sha256 of their bytes; the partition refers to them by
that key. Every variant's chain of blocks is then checked against the variant itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loom.core.errors import AlignmentError
from loom.core.onnxutil import load_model, node_inputs
from loom.core.runref import run_batched, session
from loom.model.align import AlignmentReport, CutTolerance, align, choose_cuts, load_indexes
from loom.model.blockstore import BlockStore
from loom.model.cuts import CutCandidate, GraphIndex, extract_block, slot_nodes
from loom.model.family import Cut, Family, load_family
from loom.model.partition import BlockInfo, Partition

Progress = Callable[[str], None]


def _variant_precision(family: Family, name: str) -> str:
    return family.variant(name).precision


#: How closely a variant's chain of blocks must reproduce the variant, by precision.
#: fp32: max abs difference of the outputs. int8/fp16: max abs difference relative to
#: the largest output magnitude, plus top-1 agreement. For those two, both sides run with
#: onnxruntime's basic optimizations only: with all of them, the monolithic int8 model folds a
#: DequantizeLinear -> Add -> QuantizeLinear run across the cut into one requantization,
#: which rounds differently from the split chain (same math); in a network that amplifies
#: rounding (MobileNetV2 int8, PTQ) that alone moved the logits by 17%.
CHAIN_TOLERANCE = {"fp32": 1e-5, "fp16": 3e-2, "int8": 5e-2}
MIN_TOP1_AGREEMENT = 0.97
#: an fp32 chain may differ from its variant by this many times the variant's own rounding
#: noise (the same model run with and without onnxruntime's fusions)
NOISE_FACTOR = 10.0


def partition_family(
    family: Family | str | Path,
    out_dir: str | Path,
    *,
    k: int = 3,
    cuts: Sequence[Sequence[str]] | None = None,
    max_tensors: int = 2,
    tolerance: CutTolerance | None = None,
    verify_samples: int = 64,
    update_manifest: bool = False,
    store: BlockStore | str | Path | None = None,
    progress: Progress | None = None,
) -> Partition:
    """Cut every variant of ``family`` into ``k`` slots; write ``partition.yaml`` to ``out_dir``.

    The blocks go to ``store`` (a ``BlockStore`` or its folder; default: ``blockstore/``
    beside ``out_dir``, so partitions made side by side share one store).
    """
    family = family if isinstance(family, Family) else load_family(family)
    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = store if isinstance(store, BlockStore) else BlockStore(store or out.parent / "blockstore")
    say(f"{family.task}: reading {len(family.variants)} variants")
    indexes = load_indexes(family)
    if cuts is not None and len(cuts) != k - 1:
        k = len(cuts) + 1
    say(f"{family.task}: checking cuts")
    report = align(family, indexes=indexes, max_tensors=max_tensors, tolerance=tolerance or CutTolerance(),
                   only=cuts)
    chosen = _chosen_cuts(family, report, cuts, k)
    cut_lists = [list(c.tensors) for c in chosen]
    shares = [c.macs_before for c in chosen]
    partition = Partition(
        task=family.task,
        family_path=os.path.relpath(Path(family.path).resolve(), out.resolve()),
        cuts=cut_lists,
        variants={},
        blocks={},
        root=out,
        slot_macs_share=[b - a for a, b in zip([0.0, *shares], [*shares, 1.0], strict=True)],
        store=os.path.relpath(store.root.resolve(), out.resolve()),
    )
    final_outputs = indexes[family.reference_variant().name].graph_outputs
    for name, idx in indexes.items():
        say(f"{family.task}: extracting {name}")
        partition.variants[name] = _write_blocks(partition, store, idx, name, final_outputs,
                                                 _variant_precision(family, name))

    say(f"{family.task}: verifying that each chain of blocks reproduces its variant")
    partition.verification = verify_chains(partition, family, samples=verify_samples)
    bad = {v: r for v, r in partition.verification.items() if not r["ok"]}
    if bad:
        raise AlignmentError(f"{family.path}: chained blocks do not reproduce variant(s) {bad}")
    partition.save()
    store.add_partition(partition)  # records who uses which block; the files are there already
    if update_manifest:
        family.manifest.cuts = [Cut(tensors=list(c.tensors), macs_before=round(c.macs_before, 4)) for c in report.aligned]
        family.save()
    return partition


def _chosen_cuts(family: Family, report: AlignmentReport, cuts: Sequence[Sequence[str]] | None,
                 k: int) -> list[CutCandidate]:
    """The cuts asked for (each checked), or the ``k - 1`` aligned cuts that balance the slots."""
    if cuts is not None:
        refused = [(c, report.reasons_for(sorted(c))) for c in cuts]
        refused = [(c, r) for c, r in refused if r]
        if refused:
            lines = [f"cut {list(c)} refused: " + "; ".join(r) for c, r in refused]
            raise AlignmentError(f"{family.path}:\n  " + "\n  ".join(lines))
        return sorted(report.aligned, key=lambda c: c.macs_before)
    if len(report.aligned) < k - 1:
        why = "\n  ".join(f"{r.tensors} in {r.variant}: {r.reason}" for r in report.refusals[:20])
        raise AlignmentError(
            f"{family.path}: {len(report.aligned)} cut(s) are aligned across all variants, "
            f"{k} slots need {k - 1}. Refused:\n  {why}"
        )
    return choose_cuts(report.aligned, k)


def _write_blocks(partition: Partition, store: BlockStore, idx: GraphIndex, name: str,
                  final_outputs: list[str], precision: str) -> list[str]:
    """Extract variant ``name``'s block of every slot into ``store``; returns their ids."""
    out = partition.root.resolve()
    available = set(idx.graph_inputs)
    ids = []
    for s, nodes in enumerate(slot_nodes(idx, partition.cuts, name=name)):
        made = {o for i in nodes for o in idx.model.graph.node[i].output if o}
        reads = {x for i in nodes for x in _reads(idx, i)} - made - idx.static
        stray = sorted(reads - available)
        if stray:
            raise AlignmentError(f"{name}: slot {s} reads {stray}, which no earlier cut carries")
        wanted = partition.cuts[s] if s < len(partition.cuts) else final_outputs
        outputs = [t for t in wanted if t in made]
        bid, path = store.put_model(extract_block(idx, nodes, sorted(reads), outputs))
        if bid not in partition.blocks:
            partition.blocks[bid] = BlockInfo(
                id=bid, slot=s, file=os.path.relpath(path.resolve(), out), inputs=sorted(reads),
                outputs=outputs, macs=int(sum(idx.macs[i] for i in nodes)),
                size_bytes=path.stat().st_size, precision=precision,
            )
        partition.blocks[bid].variants.append(name)
        ids.append(bid)
        available |= set(wanted)
    return ids


def _reads(idx: GraphIndex, i: int) -> list[str]:
    return node_inputs(idx.model.graph.node[i])


def verify_chains(partition: Partition, family: Family, *, samples: int = 64) -> dict[str, dict[str, Any]]:
    """Max abs difference between each variant and its chain of blocks on evaluation inputs."""
    feeds, _ = family.eval_feeds(samples)
    out_name = family.manifest.output.name
    result: dict[str, dict[str, Any]] = {}
    for name in partition.variants:
        precision = family.variant(name).precision
        fusions = precision == "fp32"  # fp32 rounding barely depends on fusions; QDQ and casts do
        full = session(load_model(family.variant_path(name)), name=name, fusions=fusions)
        want = run_batched(full, feeds)[out_name]
        env = dict(feeds)
        for bid in partition.variants[name]:
            info = partition.blocks[bid]
            block = session(load_model(partition.block_path(bid), check=False), name=bid, fusions=fusions)
            env.update(run_batched(block, {n: env[n] for n in info.inputs}, info.outputs))
        got = env[out_name]
        diff = float(np.abs(want - got).max())
        rel = diff / max(float(np.abs(want).max()), 1e-12)
        agree = float((want.argmax(-1) == got.argmax(-1)).mean())
        tol = CHAIN_TOLERANCE[precision]
        floor = _noise_floor(family, name, feeds, want) if precision == "fp32" and diff > tol else 0.0
        # fp32: absolute for outputs within [-1, 1], relative beyond (logits of 20 carry
        # rounding differences of 1e-5 when a block boundary changes the kernels' fusions);
        # a deep network's own rounding noise (the variant against itself without fusions,
        # 7e-5 for PP-OCRv4) may set it higher: a wrong wiring differs by far more
        scale = max(1.0, float(np.abs(want).max()))
        tol = max(tol, NOISE_FACTOR * floor / scale) if precision == "fp32" else tol
        ok = diff <= tol * scale if precision == "fp32" else (rel <= tol and agree >= MIN_TOP1_AGREEMENT)
        result[name] = {
            "max_abs_diff": diff,
            "max_rel_diff": rel,
            "noise_floor": floor,
            "tolerance": tol,
            "tolerance_kind": "absolute x max(1, max |output|)" if precision == "fp32" else "relative to max |output|",
            "top1_agreement": agree,
            "graph_optimizations": "all" if fusions else "basic",
            "ok": bool(ok),
        }
    return result


def _noise_floor(family: Family, name: str, feeds: dict[str, np.ndarray], want: np.ndarray) -> float:
    """How far the variant's own outputs move between onnxruntime's full and basic graph
    optimizations: the rounding noise of this network, against which a chain is judged."""
    basic = session(load_model(family.variant_path(name)), name=name, fusions=False)
    return float(np.abs(run_batched(basic, feeds)[family.manifest.output.name] - want).max())
