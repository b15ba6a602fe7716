"""A family's metric: what a variant's or a stitched config's outputs are scored against.

``targets`` gives what the outputs are compared with (the labels, or the dense
variant's own predictions for metric ``agreement``); ``score`` compares them. Every
place that measures accuracy (variants, stitched configs, the demo) goes through these
two, so a metric is defined once.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from loom.core.errors import ManifestError, ModelError
from loom.core.onnxutil import load_model
from loom.core.runref import NonFinite, predicted_classes, run_batched, session, top1_accuracy
from loom.model.family import Family


def ctc_decode(outputs: np.ndarray, *, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of ``[N, T, C]`` scores: best class per step, repeats collapsed,
    blanks dropped. A sample with NaN/inf decodes to ``None`` (never equal to a label)."""
    out = np.asarray(outputs)
    if out.ndim != 3:
        raise ModelError(f"CTC decoding needs [N, T, C] scores, got shape {list(out.shape)}")
    best = out.argmax(axis=-1)
    finite = np.isfinite(out).reshape(len(out), -1).all(axis=1)
    decoded: list = []
    for row, ok in zip(best, finite, strict=True):
        if not ok:
            decoded.append(None)
            continue
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        decoded.append(tuple(int(c) for c in row[keep] if c != blank))
    return decoded


def label_sequences(labels: np.ndarray) -> list[tuple[int, ...]]:
    """Rows of class ids padded with negative values, as tuples without the padding."""
    y = np.asarray(labels)
    if y.ndim != 2:
        raise ModelError(f"CTC labels must be [N, L] class ids padded with -1, got shape {list(y.shape)}")
    return [tuple(int(c) for c in row if c >= 0) for row in y]


def _edit_distance(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ctc_accuracy(outputs: np.ndarray, labels: np.ndarray, *, blank: int = 0, name: str = "outputs",
                 nonfinite: NonFinite = "raise") -> tuple[float, float]:
    """(exact-match sequence accuracy, character accuracy) of greedy-decoded ``outputs``.

    Character accuracy is ``1 - edit distance / label length`` per sample, floored at 0.
    """
    decoded = ctc_decode(outputs, blank=blank)
    want = label_sequences(labels)
    if len(want) != len(decoded):
        raise ModelError(f"{name}: {len(decoded)} prediction(s) against {len(want)} label row(s)")
    bad = sum(d is None for d in decoded)
    if bad and nonfinite == "raise":
        raise ModelError(f"{name}: non-finite values (NaN/inf) in {bad} of {len(decoded)} evaluation sample(s); "
                         "a model that outputs NaN/inf is not scored")
    exact = sum(d == w for d, w in zip(decoded, want, strict=True)) / max(1, len(want))
    chars = [0.0 if d is None else max(0.0, 1 - _edit_distance(d, w) / max(1, len(w)))
             for d, w in zip(decoded, want, strict=True)]
    return float(exact), float(np.mean(chars)) if chars else 0.0


def targets(family: Family, feeds: Mapping[str, np.ndarray], labels: np.ndarray | None) -> np.ndarray:
    """What outputs on ``feeds`` are scored against: the labels, or (metric ``agreement``)
    the dense variant's predicted classes on the same inputs."""
    metric = family.manifest.metric.name
    if metric in ("top1", "ctc"):
        if labels is None:
            raise ManifestError(f"{family.path}: metric {metric} needs labels (eval_data.y)")
        return labels
    dense = family.reference_variant().name
    out_name = family.manifest.output.name
    ref = run_batched(session(load_model(family.variant_path(dense)), name=dense), feeds, [out_name])
    return predicted_classes(ref[out_name], name=f"{dense}: output {out_name!r}")


def score(family: Family, outputs: np.ndarray, target: np.ndarray, *, name: str = "outputs",
          nonfinite: NonFinite = "raise") -> float:
    """The family's metric of ``outputs`` against ``target`` (from ``targets``).

    ``nonfinite="wrong"`` counts samples with NaN/inf as wrong; ``"raise"`` refuses them.
    """
    metric = family.manifest.metric
    if metric.name == "ctc":
        return ctc_accuracy(outputs, target, blank=metric.blank, name=name, nonfinite=nonfinite)[0]
    return top1_accuracy(outputs, target, name=name, nonfinite=nonfinite)
