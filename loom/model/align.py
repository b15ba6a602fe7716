"""Cuts every variant of a family shares: same tensor names, shapes and meaning.

``align`` checks each candidate cut (``loom.model.cuts``) in every variant and keeps the
ones no variant refuses; ``choose_cuts`` picks ``K - 1`` of them that balance MACs across
the slots. Why a cut is refused: ``docs/model.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from loom.core.errors import AlignmentError
from loom.core.onnxutil import load_model
from loom.core.runref import run_batched, session, with_taps
from loom.model.cuts import CutCandidate, GraphIndex, candidate_cuts
from loom.model.family import Family


# -- meaning of a cut ---------------------------------------------------------------------
@dataclass(frozen=True)
class CutTolerance:
    """When a variant's activations at a cut no longer mean what the dense variant's mean.

    Fine-tuned and quantized variants drift from the dense model, the more so the deeper
    the cut and the harder the compression, and stitching across such drift costs
    accuracy that the accuracy estimator has to learn, not a reason to forbid the cut.
    What the check refuses is a changed *meaning*:

    - values below zero where the dense model's are all >= 0 (PROBE.md: a quantizer
      fused the ReLU, leaving the pre-ReLU value at the cut);
    - activations that match the dense variant's on the same input no better than the
      dense variant's own activations on *other* inputs do (a permuted, transposed or
      simply different tensor under the same name): median per-sample Pearson
      correlation must exceed that baseline by ``min_correlation_margin``;
    - a scale off by more than ``max_norm_ratio``.
    """

    min_correlation_margin: float = 0.0
    max_norm_ratio: float = 2.0
    #: extra share of negative values allowed where the dense activations are all >= 0
    max_negative_share: float = 0.01


def _rowwise_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ac, bc = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    den = np.linalg.norm(ac, axis=1) * np.linalg.norm(bc, axis=1)
    return (ac * bc).sum(axis=1) / np.maximum(den, 1e-12)


def cut_drift(dense: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How ``other`` (a variant's activations at a cut) differs from ``dense``, per sample.

    ``baseline_correlation`` is the dense activations' correlation with themselves on a
    different input (samples rolled by one): what "unrelated" looks like at this cut.
    """
    d = dense.reshape(len(dense), -1).astype(np.float64)
    o = other.reshape(len(other), -1).astype(np.float64)
    dn = np.linalg.norm(d, axis=1)
    on = np.linalg.norm(o, axis=1)
    baseline = float(np.median(_rowwise_correlation(d, np.roll(d, 1, axis=0)))) if len(d) > 1 else -1.0
    return {
        "correlation": float(np.median(_rowwise_correlation(d, o))),
        "baseline_correlation": baseline,
        "cosine": float(np.median((d * o).sum(axis=1) / np.maximum(dn * on, 1e-12))),
        "norm_ratio": float(np.median(on / np.maximum(dn, 1e-12))),
        "dense_negative_share": float((d < 0).mean()),
        "negative_share": float((o < 0).mean()),
    }


def meaning_problem(drift: dict[str, float], tol: CutTolerance) -> str | None:
    """Why a cut tensor no longer means what it means in the dense variant (None if it does)."""
    if drift["dense_negative_share"] == 0.0 and drift["negative_share"] > tol.max_negative_share:
        return (
            f"the dense variant's values are all >= 0 here (after a ReLU) but "
            f"{drift['negative_share']:.0%} of this variant's are negative: an activation "
            f"was fused or moved across the cut"
        )
    if drift["correlation"] <= drift["baseline_correlation"] + tol.min_correlation_margin:
        return (
            f"activations match the dense variant's on the same input (correlation "
            f"{drift['correlation']:.3f}) no better than the dense variant's own activations on "
            f"other inputs do ({drift['baseline_correlation']:.3f}): not the same tensor"
        )
    ratio = drift["norm_ratio"]
    if not (1 / tol.max_norm_ratio <= ratio <= tol.max_norm_ratio):
        return f"activation scale differs from the dense variant's by x{ratio:.2f}"
    return None


# -- alignment -----------------------------------------------------------------------------
@dataclass
class Refusal:
    tensors: list[str]
    variant: str
    reason: str


@dataclass
class AlignmentReport:
    task: str
    candidates: list[CutCandidate]
    aligned: list[CutCandidate]
    refusals: list[Refusal]
    #: (cut tensors as a tuple, variant) -> drift measures
    drift: dict[tuple[tuple[str, ...], str], dict[str, float]] = field(default_factory=dict)

    def reasons_for(self, tensors: Sequence[str]) -> list[str]:
        key = list(tensors)
        return [f"{r.variant}: {r.reason}" for r in self.refusals if r.tensors == key]


def _norm_shape(shape: list) -> list:
    return [d if isinstance(d, int) and d > 0 else "?" for d in shape]


def _check_io(family: Family, indexes: dict[str, GraphIndex]) -> None:
    ref = family.reference_variant().name
    ri = indexes[ref]
    problems = []
    for name, idx in indexes.items():
        for kind, mine, theirs in (
            ("inputs", idx.graph_inputs, ri.graph_inputs),
            ("outputs", idx.graph_outputs, ri.graph_outputs),
        ):
            if mine != theirs:
                problems.append(f"{name}: graph {kind} {mine} differ from {ref}'s {theirs}")
                continue
            for t in mine:
                if _norm_shape(idx.shapes.get(t, ([], 0))[0]) != _norm_shape(ri.shapes.get(t, ([], 0))[0]):
                    problems.append(f"{name}: {kind[:-1]} {t!r} has shape {idx.shapes[t][0]}, {ref} has {ri.shapes[t][0]}")
    if problems:
        raise AlignmentError(
            f"{family.path}: the variants do not share inputs and outputs:\n  " + "\n  ".join(problems)
        )


def load_indexes(family: Family) -> dict[str, GraphIndex]:
    return {v.name: GraphIndex.build(load_model(family.variant_path(v.name))) for v in family}


def align(
    family: Family,
    *,
    indexes: dict[str, GraphIndex] | None = None,
    max_tensors: int = 2,
    tolerance: CutTolerance = CutTolerance(),
    calib_samples: int = 32,
    only: Sequence[Sequence[str]] | None = None,
) -> AlignmentReport:
    """Cuts that exist in every variant with the same shape and meaning, and why others fail.

    ``only`` restricts the check to user-given cuts (each a list of tensor names).
    """
    indexes = indexes or load_indexes(family)
    _check_io(family, indexes)
    ref = family.reference_variant().name
    ri = indexes[ref]
    candidates = _given_cuts(family, ri, only) if only is not None else candidate_cuts(ri, max_tensors=max_tensors)
    refusals: list[Refusal] = []
    structural_ok: list[CutCandidate] = []
    for cand in candidates:
        bad = False
        for name, idx in indexes.items():
            reason = _structural_problem(cand, idx, ri)
            if reason:
                refusals.append(Refusal(list(cand.tensors), name, reason))
                bad = True
        if not bad:
            structural_ok.append(cand)
    report = AlignmentReport(family.task, candidates, [], refusals)
    if structural_ok:
        _check_meaning(family, indexes, structural_ok, tolerance, calib_samples, report)
    return report


def _given_cuts(family: Family, ri: GraphIndex, only: Sequence[Sequence[str]]) -> list[CutCandidate]:
    """User-given cuts as candidates, each tensor checked to exist in the reference variant."""
    ref = family.reference_variant().name
    candidates = []
    for cut in only:
        before: set[int] = set()
        for t in cut:
            if t not in ri.producer and t not in ri.graph_inputs:
                raise AlignmentError(f"{family.path}: cut {list(cut)}: {ref} has no tensor {t!r}")
            before |= ri.ancestors(t)
        share = sum(ri.macs[j] for j in before) / ri.total_macs
        candidates.append(CutCandidate(tuple(sorted(cut)), cut[0], share, len(cut)))
    return candidates


def _check_meaning(family: Family, indexes: dict[str, GraphIndex], cuts: list[CutCandidate],
                   tolerance: CutTolerance, calib_samples: int, report: AlignmentReport) -> None:
    """Activations at each cut, every variant against the dense one; fills ``report``."""
    ref = family.reference_variant().name
    ri = indexes[ref]
    feeds = family.calib_feeds(calib_samples)
    taps = sorted({t for c in cuts for t in c.tensors if t not in ri.graph_inputs})
    acts: dict[str, dict[str, np.ndarray]] = {}
    for name, idx in indexes.items():
        sess = session(with_taps(idx.model, taps), name=str(family.variant_path(name)))
        acts[name] = run_batched(sess, feeds, taps)
    failed: set[tuple[str, ...]] = set()
    for cand in cuts:
        for name in indexes:
            if name == ref:
                continue
            for t in cand.tensors:
                if t in ri.graph_inputs:
                    continue
                drift = cut_drift(acts[ref][t], acts[name][t])
                report.drift[(cand.tensors, name)] = drift
                problem = meaning_problem(drift, tolerance)
                if problem:
                    report.refusals.append(Refusal(list(cand.tensors), name, f"{t!r}: {problem}"))
                    failed.add(cand.tensors)
    report.aligned = [c for c in cuts if c.tensors not in failed]


def _structural_problem(cand: CutCandidate, idx: GraphIndex, ref: GraphIndex) -> str | None:
    for t in cand.tensors:
        if t not in idx.producer and t not in idx.graph_inputs:
            return f"has no tensor {t!r}"
        mine, theirs = _norm_shape(idx.shapes.get(t, ([], 0))[0]), _norm_shape(ref.shapes.get(t, ([], 0))[0])
        if mine != theirs:
            return f"tensor {t!r} has shape {mine}, the dense variant has {theirs}"
        mine_t, theirs_t = idx.shapes.get(t, ([], 0))[1], ref.shapes.get(t, ([], 0))[1]
        if mine_t != theirs_t:
            return (f"tensor {t!r} is {onnx.TensorProto.DataType.Name(mine_t)} here, "
                    f"{onnx.TensorProto.DataType.Name(theirs_t)} in the dense variant")
    before: set[int] = set()
    for t in cand.tensors:
        before |= idx.ancestors(t)
    crossing = idx.crossing(before)
    if crossing != list(cand.tensors):
        return f"the cut does not separate this variant the same way (crossing here: {crossing})"
    return None


# -- choosing K - 1 cuts --------------------------------------------------------------------
def choose_cuts(aligned: Sequence[CutCandidate], k: int) -> list[CutCandidate]:
    """Pick ``k - 1`` nested cuts that balance MACs across the ``k`` slots.

    Minimizes the largest slot's share of MACs (compared in steps of 2%, so that near
    ties go to the cuts with fewer tensors, which cost less to hand between processors).
    Exact dynamic program over the candidates in MACs order.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cands = sorted(aligned, key=lambda c: c.macs_before)
    if k == 1:
        return []
    if len(cands) < k - 1:
        raise AlignmentError(f"need {k - 1} aligned cuts for {k} slots, found {len(cands)}")
    shares = [c.macs_before for c in cands]

    def cost(prev: float, cur: float) -> float:
        return np.ceil(round((cur - prev) / 0.02, 6)) * 0.02

    inf = (float("inf"), float("inf"))
    # best[j][m]: (max slot share, tensors) choosing m cuts, the last being cands[j]
    best = [[inf] * k for _ in cands]
    back = [[-1] * k for _ in cands]
    for j, c in enumerate(cands):
        best[j][1] = (cost(0.0, shares[j]), c.produced)
        for m in range(2, k):
            for i in range(j):
                if best[i][m - 1] == inf or shares[i] >= shares[j]:
                    continue
                mx, tn = best[i][m - 1]
                cand = (max(mx, cost(shares[i], shares[j])), tn + c.produced)
                if cand < best[j][m]:
                    best[j][m] = cand
                    back[j][m] = i
    final = [
        ((max(best[j][k - 1][0], cost(shares[j], 1.0)), best[j][k - 1][1]), j)
        for j in range(len(cands))
        if best[j][k - 1] != inf
    ]
    if not final:
        raise AlignmentError(f"no chain of {k - 1} distinct cuts for {k} slots")
    _, j = min(final)
    chosen = [j]
    m = k - 1
    while m > 1:
        j = back[j][m]
        chosen.append(j)
        m -= 1
    return [cands[i] for i in reversed(chosen)]
