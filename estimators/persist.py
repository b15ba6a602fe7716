"""Loading estimators saved by ``save_estimator``, and the registry of classes it may restore.

Writing and the file format are ``estimators.saving`` (which imports no estimator class);
their public names are re-exported here, so ``estimators.persist`` is the one place to
save and load from. A stale estimator (other library versions, other training data)
still loads, with a ``StaleEstimatorWarning``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from estimators.accuracy import AccuracyEstimator
from estimators.booster import BoosterEstimator
from estimators.latency import LatencyEstimator
from estimators.saving import (
    SAVABLE,
    EstimatorFileError,
    StaleEstimatorWarning,
    estimator_paths,
    library_versions,
    metadata_path,
    read_metadata,
    save_estimator,
    sha256,
)
from loom.core.compat import require

#: classes ``load_estimator`` may restore, by the name saved in the metadata
ESTIMATORS: dict[str, type[BoosterEstimator]] = {
    "LatencyEstimator": LatencyEstimator,
    "AccuracyEstimator": AccuracyEstimator,
}
if set(ESTIMATORS) != set(SAVABLE):  # pragma: no cover - a programming error, caught at import
    raise ImportError(f"estimators.saving.SAVABLE {sorted(SAVABLE)} and ESTIMATORS {sorted(ESTIMATORS)} differ")


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def _staleness(meta: Mapping[str, Any], dropped: list[str], fingerprint: Mapping[str, Any] | None) -> list[str]:
    """Why a loaded estimator may not fit this setting: unknown params, versions, training data."""
    problems = []
    if dropped:
        problems.append(f"params this version does not know were ignored: {', '.join(dropped)}")
    versions = _differences(meta.get("versions") or {}, library_versions())
    if versions:
        problems.append("saved with other library versions (" + "; ".join(versions) + ")")
    if fingerprint is not None:
        saved = meta.get("fingerprint")
        if saved is None:
            problems.append("no training fingerprint was saved with it")
        else:
            diff = _differences(saved, dict(fingerprint))
            if diff:
                problems.append("trained on other data or hardware (" + "; ".join(diff) + ")")
    return problems


def _read_booster(model_path: Path, meta: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """The XGBoost booster in ``model_path`` and its feature names, checked against each other."""
    xgb = require("xgboost")
    booster = xgb.Booster()
    try:
        booster.load_model(str(model_path))
    except xgb.core.XGBoostError as exc:
        raise EstimatorFileError(f"{model_path}: XGBoost cannot read it: {exc}") from exc
    names = list(meta["feature_names"])
    if booster.num_features() != len(names):
        raise EstimatorFileError(f"{model_path}: the booster has {booster.num_features()} features, "
                                 f"the metadata lists {len(names)}")
    return booster, names


def load_estimator(
    path: str | Path,
    *,
    fingerprint: Mapping[str, Any] | None = None,
) -> BoosterEstimator:
    """Restore an estimator saved by ``save_estimator``.

    Warns (``StaleEstimatorWarning``) when the library versions differ from the saved
    ones, or when ``fingerprint`` is given and differs from the saved one (naming each
    differing key). Raises ``EstimatorFileError`` when a file is missing, malformed, or
    the booster file is not the one the metadata was written with.
    """
    model_path, meta_path = estimator_paths(path)
    meta = read_metadata(model_path)
    if not model_path.is_file():
        raise EstimatorFileError(f"{model_path}: no such file (its metadata {meta_path.name} exists)")
    if sha256(model_path) != meta.get("booster_sha256"):
        raise EstimatorFileError(f"{model_path}: the booster file changed since {meta_path.name} was written")
    cls = ESTIMATORS.get(meta.get("estimator", ""))
    if cls is None:
        raise EstimatorFileError(f"{meta_path}: unknown estimator class {meta.get('estimator')!r}")
    accepted = set(cls._param_names())
    params = {k: v for k, v in (meta.get("params") or {}).items() if k in accepted}
    problems = _staleness(meta, sorted(set(meta.get("params") or {}) - accepted), fingerprint)
    if problems:
        warnings.warn(f"{model_path}: " + "; ".join(problems), StaleEstimatorWarning, stacklevel=2)
    booster, names = _read_booster(model_path, meta)
    try:
        est = cls(**params)
        est.booster_ = booster
        est.feature_names_ = names
        est.n_features_in_ = len(names)
        est.n_train_rows_ = int(meta.get("n_train_rows", 0))
        est._set_extra_state(meta.get("state") or {})
        est._encode_target(np.ones(1))  # an unknown target is refused here, not decoded silently
        est.predict(np.zeros((1, len(names))))  # a malformed params or state fails here, not later
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise EstimatorFileError(f"{meta_path}: params or state do not restore a {cls.__name__}: {exc!r}") from exc
    est.metadata_ = meta
    return est


__all__ = [
    "ESTIMATORS", "EstimatorFileError", "StaleEstimatorWarning", "library_versions", "load_estimator",
    "metadata_path", "read_metadata", "save_estimator",
]
