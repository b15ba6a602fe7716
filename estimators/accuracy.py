"""Accuracy of a stitched config, learned from a few measured configs and cheap signals.

``AccuracyEstimator`` is trained on a few dozen measured configs and predicts the rest
from ``config_features``, which cost no config evaluation: per-slot variant facts,
aggregates, and ``cut_compatibility`` (how well one variant's activations at a cut
fit what the next variant expects). ``min_accuracy_baseline`` is the reference it
beats. Measured figures: ``docs/estimators.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from estimators.booster import BoosterEstimator

#: variant kinds, in one-hot order (``loom.model.family.VariantKind``); others count as "other"
VARIANT_KINDS: tuple[str, ...] = ("dense", "unstructured", "structured", "int8", "fp16")
_BITS = {"fp32": 32.0, "fp16": 16.0, "bf16": 16.0, "int8": 8.0, "int4": 4.0}

#: the per-pair measures ``cut_compatibility`` returns, best first for each
COMPAT_MEASURES: tuple[str, ...] = ("correlation", "cosine", "norm_ratio", "rel_error")

Compatibility = dict[tuple[str, str, int], dict[str, float]]


# -- cut compatibility -------------------------------------------------------------------------------
def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(len(a), 1)


def _tensor_measures(rows: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """All-pairs measures at one tensor: ``rows[v][i]`` is variant v's sample i (flattened).

    Returns V x V arrays (row: upstream, what arrives; column: downstream, what it
    expects), each the median over samples. Everything comes from one Gram matrix per
    sample (one BLAS call on V rows), never from V*V passes over the activations, and
    only one sample is ever widened to float64 at a time: cut tensors of CNNs hold
    100k+ values per sample.
    """
    n_samples, size = rows[0].shape
    gram = np.empty((n_samples, len(rows), len(rows)))
    means = np.empty((n_samples, len(rows)))
    for i in range(n_samples):
        m = np.stack([r[i] for r in rows]).astype(np.float64)
        gram[i] = m @ m.T
        means[i] = m.mean(axis=1)
    # centered Gram from the raw one: sum (a - mean a)(b - mean b) = a.b - n mean_a mean_b
    gram_c = gram - size * means[:, :, None] * means[:, None, :]
    norm_c = np.sqrt(np.maximum(np.einsum("ivv->iv", gram_c), 0.0))
    norm = np.sqrt(np.maximum(np.einsum("ivv->iv", gram), 0.0))
    dist = np.sqrt(np.maximum(norm[:, :, None] ** 2 + norm[:, None, :] ** 2 - 2 * gram, 0.0))
    # "the same tensor" within rounding: a constant mask of ones in every variant
    same = dist <= 1e-6 * (norm[:, :, None] + norm[:, None, :]) + 1e-12
    eps = 1e-9 * (norm[:, :, None] + norm[:, None, :]) + 1e-12
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = gram_c / (norm_c[:, :, None] * norm_c[:, None, :])
        cos = gram / (norm[:, :, None] * norm[:, None, :])
        ratio = norm[:, :, None] / norm[:, None, :]
        rel = dist / norm[:, None, :]
    # A constant row has no correlation: 1 when both sides carry the same values, else 0.
    flat = (norm_c[:, :, None] <= eps) | (norm_c[:, None, :] <= eps)
    corr = np.where(flat, np.where(same, 1.0, 0.0), corr)
    zero = (norm[:, :, None] < 1e-12) | (norm[:, None, :] < 1e-12)
    cos = np.where(zero, np.where(same, 1.0, 0.0), cos)
    ratio = np.where(zero, np.where(same, 1.0, np.inf), ratio)
    rel = np.where(norm[:, None, :] < 1e-12, np.where(same, 0.0, np.inf), rel)
    return {
        "correlation": np.median(np.clip(corr, -1.0, 1.0), axis=0),
        "cosine": np.median(np.clip(cos, -1.0, 1.0), axis=0),
        "norm_ratio": np.median(ratio, axis=0),
        "rel_error": np.median(rel, axis=0),
    }


def _worst(per_tensor: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A multi-tensor cut is as compatible as its least compatible tensor."""
    ratios = np.stack([m["norm_ratio"] for m in per_tensor])
    far = np.argmax(np.abs(np.log(np.maximum(ratios, 1e-12))), axis=0)
    return {
        "correlation": np.min([m["correlation"] for m in per_tensor], axis=0),
        "cosine": np.min([m["cosine"] for m in per_tensor], axis=0),
        "norm_ratio": np.take_along_axis(ratios, far[None], axis=0)[0],
        "rel_error": np.max([m["rel_error"] for m in per_tensor], axis=0),
    }


def cut_compatibility(
    activations: Mapping[str, Mapping[str, np.ndarray]],
    cuts: Sequence[Sequence[str]] | None = None,
) -> Compatibility:
    """How well each variant's activations fit each other variant's at each cut.

    ``activations[variant][tensor]`` is the variant's value of a cut tensor on the
    same calibration inputs (first axis: samples; ~32 are enough) — one run of each
    *whole* variant with the cut tensors as extra outputs. ``cuts`` lists the tensors
    of each cut in order (a partition's ``cuts``); without it every tensor of the
    first variant's mapping is a cut of its own, in mapping order.

    Returns ``{(upstream, downstream, cut_index): measures}`` for every ordered pair
    (the pair of a variant with itself included): the median over samples of the
    Pearson ``correlation`` and ``cosine`` between the upstream variant's and the
    downstream variant's activations, the ``norm_ratio`` ``|up| / |down|`` and the
    ``rel_error`` ``|up - down| / |down|``. For a cut of several tensors (a
    transformer's hidden state and mask) each measure is the worst over its tensors;
    a tensor of ``cuts`` that no variant's mapping has (a graph input such as the mask,
    the same in every variant) is skipped, so ``partition.cuts`` can be passed as is. Pure function of its inputs; it costs one Gram matrix of the
    V variants per sample and cut tensor (0.1 s for the zoo's CNN, 131k values a sample).
    """
    variants = list(activations)
    if not variants:
        return {}
    if cuts is None:
        cuts = [[t] for t in activations[variants[0]]]
    # A tensor no variant has is a graph input riding along with the cut (a transformer's
    # mask: the same in every variant, so nothing to compare); it is skipped as long as
    # the cut keeps another tensor. One that only some variants lack is an error.
    cuts = [[t for t in cut if any(t in activations[v] for v in variants)] or list(cut) for cut in cuts]
    missing = sorted({f"{v}:{t}" for v in variants for cut in cuts for t in cut if t not in activations[v]})
    if missing:
        raise KeyError(f"activations lack cut tensors: {', '.join(missing)}")
    per_tensor: dict[str, dict[str, np.ndarray]] = {}
    for t in dict.fromkeys(t for cut in cuts for t in cut):
        arrays = [_rows(activations[v][t]) for v in variants]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"cut tensor {t!r} has different shapes across variants: {sorted(shapes)}")
        per_tensor[t] = _tensor_measures(arrays)
    out: Compatibility = {}
    for c, cut in enumerate(cuts):
        m = _worst([per_tensor[t] for t in cut])
        for i, up in enumerate(variants):
            for j, down in enumerate(variants):
                out[(up, down, c)] = {name: float(m[name][i, j]) for name in COMPAT_MEASURES}
    return out


def compatibility_to_json(compat: Compatibility) -> list[dict[str, Any]]:
    """JSON-friendly form (a list of records) of ``cut_compatibility``'s result."""
    return [{"upstream": a, "downstream": b, "cut": c, **m} for (a, b, c), m in compat.items()]


def compatibility_from_json(records: Sequence[Mapping[str, Any]]) -> Compatibility:
    return {
        (r["upstream"], r["downstream"], int(r["cut"])): {m: float(r[m]) for m in COMPAT_MEASURES}
        for r in records
    }


# -- config features ---------------------------------------------------------------------------------
def _info(variant_info: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A variant's kind, sparsity, precision and accuracy, from a dict or a ``loom.model.family.Variant``."""
    try:
        v = variant_info[name]
    except KeyError:
        raise KeyError(f"no information on variant {name!r} (have {sorted(variant_info)})") from None
    get = v.get if isinstance(v, Mapping) else (lambda k, d=None, v=v: getattr(v, k, d))
    acc = get("accuracy")
    if acc is None:
        raise ValueError(f"variant {name!r} has no standalone accuracy (measure it first)")
    return {
        "kind": str(get("kind", "dense")),
        "sparsity": float(get("sparsity", 0.0) or 0.0),
        "bits": _BITS.get(str(get("precision", "fp32")), 32.0),
        "accuracy": float(acc),
    }


def config_feature_names(k: int) -> list[str]:
    """The schema of ``config_features`` for ``k`` slots (in order)."""
    names: list[str] = []
    for s in range(k):
        names += [f"slot{s}_kind_{kind}" for kind in (*VARIANT_KINDS, "other")]
        names += [f"slot{s}_sparsity", f"slot{s}_bits", f"slot{s}_accuracy"]
    names += ["acc_min", "acc_mean", "acc_max", "n_distinct", "n_switches"]
    for c in range(k - 1):
        names += [f"cut{c}_correlation", f"cut{c}_cosine", f"cut{c}_norm_ratio", f"cut{c}_rel_error",
                  f"cut{c}_upstream_drift"]
    names += ["compat_min", "compat_prod", "mismatch_sum"]
    return names


def _reference(variant_info: Mapping[str, Any]) -> str | None:
    for name in variant_info:
        v = variant_info[name]
        kind = v.get("kind") if isinstance(v, Mapping) else getattr(v, "kind", None)
        if kind == "dense":
            return name
    return None


def config_features(
    config: Sequence[str],
    variant_info: Mapping[str, Any],
    pair_drift: Compatibility,
    *,
    reference: str | None = None,
) -> dict[str, float]:
    """Features of one config, keys in ``config_feature_names(len(config))`` order.

    ``variant_info[name]``: ``kind``, ``sparsity``, ``precision`` and standalone
    ``accuracy`` (a dict, or the family's ``Variant``). ``pair_drift``: the result of
    ``cut_compatibility`` (its cut indices are the config's cuts: cut c sits between
    slots c and c+1). ``cut{c}_upstream_drift`` is the upstream variant's correlation
    with the ``reference`` (default: the first dense variant) at that cut — how far the
    pieces before the cut have moved from the base model. The schema depends only on
    the number of slots, so rows of different tasks with equal K stack into one matrix.
    """
    k = len(config)
    info = [_info(variant_info, v) for v in config]
    ref = reference if reference is not None else _reference(variant_info)
    f: dict[str, float] = {}
    for s, vi in enumerate(info):
        kind = vi["kind"] if vi["kind"] in VARIANT_KINDS else "other"
        for kk in (*VARIANT_KINDS, "other"):
            f[f"slot{s}_kind_{kk}"] = float(kind == kk)
        f[f"slot{s}_sparsity"] = vi["sparsity"]
        f[f"slot{s}_bits"] = vi["bits"]
        f[f"slot{s}_accuracy"] = vi["accuracy"]
    accs = [vi["accuracy"] for vi in info]
    f["acc_min"], f["acc_mean"], f["acc_max"] = min(accs), float(np.mean(accs)), max(accs)
    f["n_distinct"] = float(len(set(config)))
    f["n_switches"] = float(sum(a != b for a, b in zip(config, config[1:], strict=False)))
    corrs = []
    for c in range(k - 1):
        key = (config[c], config[c + 1], c)
        if key not in pair_drift:
            raise KeyError(f"no compatibility for {config[c]!r} -> {config[c + 1]!r} at cut {c}")
        m = pair_drift[key]
        f[f"cut{c}_correlation"] = m["correlation"]
        f[f"cut{c}_cosine"] = m["cosine"]
        f[f"cut{c}_norm_ratio"] = m["norm_ratio"]
        f[f"cut{c}_rel_error"] = m["rel_error"]
        drift = pair_drift.get((config[c], ref, c)) if ref is not None else None
        f[f"cut{c}_upstream_drift"] = drift["correlation"] if drift else float("nan")
        corrs.append(m["correlation"])
    f["compat_min"] = min(corrs) if corrs else 1.0
    f["compat_prod"] = float(np.prod(corrs)) if corrs else 1.0
    f["mismatch_sum"] = float(sum(1.0 - x for x in corrs))
    return f


# -- baselines -----------------------------------------------------------------------------------------
def min_accuracy_baseline(config: Sequence[str], variant_info: Mapping[str, Any]) -> float:
    """A stitched config is as accurate as its least accurate source variant.

    The model-free baseline to beat. On the embedded zoo: MAE 4.3-6.7 points, Spearman
    0.82-0.94. (Scaling it by the cut compatibilities, min * prod(corr)^a, does worse
    for every a tried: correlations of 0.4-0.7 at late cuts cost little accuracy.)
    """
    return min(_info(variant_info, v)["accuracy"] for v in config)


# -- the estimator ---------------------------------------------------------------------------------------
class AccuracyEstimator(BoosterEstimator):
    """Accuracy (0-1) of a config from ``config_features`` rows, clipped to [0, 1].

    Defaults are tuned for tens of training rows: shallow trees, a small learning
    rate, and row and column subsampling (on the embedded zoo at 25 training configs
    the subsampling cut the error by about half a point: with 30-odd correlated
    features and 25 rows, an unrandomized booster latches onto a few of them). Rows
    of several tasks with the same K can be stacked (a feature schema without task
    ids), with ``sample_weight`` to favour the task at hand.
    """

    def __init__(
        self,
        *,
        n_estimators: int = 300,
        max_depth: int = 3,
        learning_rate: float = 0.05,
        min_child_weight: float = 1.0,
        subsample: float = 0.8,
        colsample_bytree: float = 0.5,
        reg_lambda: float = 1.0,
        random_state: int = 0,
        n_jobs: int = 1,
    ) -> None:
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.min_child_weight = min_child_weight
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _encode_target(self, y: np.ndarray) -> np.ndarray:
        if np.any((y < 0) | (y > 1)):
            raise ValueError("accuracies must be in [0, 1]")
        return y

    def _decode(self, raw: np.ndarray) -> np.ndarray:
        return np.clip(raw, 0.0, 1.0)


__all__ = [
    "COMPAT_MEASURES", "VARIANT_KINDS", "AccuracyEstimator", "compatibility_from_json",
    "compatibility_to_json", "config_feature_names", "config_features", "cut_compatibility",
    "min_accuracy_baseline",
]
