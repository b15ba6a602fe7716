"""Saving and loading estimators: XGBoost's own JSON plus a metadata JSON beside it. No pickle.

``save_estimator(est, "latency.json")`` writes

- ``latency.json``: the booster, in XGBoost's documented JSON model format
  (``Booster.save_model``), readable by any XGBoost of a compatible version and by
  a person;
- ``latency.meta.json``: what the booster alone does not say — the estimator class and
  its params, the feature schema (ordered names), learned state outside the booster
  (the latency estimator's roofline prior), library versions, the caller's training
  data fingerprint (e.g. the device profile's hardware fingerprint), the number of
  training rows, when it was made, and the booster file's SHA-256.

Pickle is out because a pickle runs code when loaded and breaks across library
versions silently; these two files are data. ``load_estimator`` warns
(``StaleEstimatorWarning``) when the versions it was saved with differ from the
running ones, or when the caller's fingerprint differs from the saved one: the
model still loads, because a slightly stale estimator is usually better than none,
but whoever plans with it should know.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from estimators.accuracy import AccuracyEstimator
from estimators.latency import BoosterEstimator, LatencyEstimator
from loom.core.compat import require
from loom.core.errors import LoomError

FORMAT = "sparseloom-estimator"
FORMAT_VERSION = 1

#: classes ``load_estimator`` may restore, by the name saved in the metadata
ESTIMATORS: dict[str, type[BoosterEstimator]] = {
    "LatencyEstimator": LatencyEstimator,
    "AccuracyEstimator": AccuracyEstimator,
}


class StaleEstimatorWarning(UserWarning):
    """A loaded estimator was saved with other library versions or for other training data."""


class EstimatorFileError(LoomError, ValueError):
    """An estimator's files are missing, malformed, or do not belong together."""


def library_versions() -> dict[str, str]:
    """Versions that change what a saved estimator means: xgboost, numpy, onnx, sparseloom."""
    import numpy
    import onnx

    from loom.core.version import __version__

    xgb = require("xgboost")
    return {"xgboost": xgb.__version__, "numpy": numpy.__version__, "onnx": onnx.__version__,
            "sparseloom": __version__}


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix != ".json":
        path = path.with_name(path.name + ".json")
    return path, path.with_name(path.name[: -len(".json")] + ".meta.json")


def metadata_path(path: str | Path) -> Path:
    """Where the metadata of the estimator saved at ``path`` lives."""
    return _paths(path)[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_estimator(
    estimator: BoosterEstimator,
    path: str | Path,
    *,
    fingerprint: Mapping[str, Any] | None = None,
    notes: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``estimator`` to ``path`` (XGBoost JSON) and its metadata beside it; returns ``path``.

    ``fingerprint``: what the training data was measured on (JSON-serializable);
    ``load_estimator`` compares it with the one it is given. ``notes``: anything else
    worth keeping (the sample strategy, the benchmark's figures).
    """
    name = type(estimator).__name__
    if name not in ESTIMATORS:
        raise TypeError(f"cannot save a {name}: only {sorted(ESTIMATORS)}")
    estimator._check_fitted()
    model_path, meta_path = _paths(path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    estimator.booster_.save_model(str(model_path))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "estimator": name,
        "params": estimator.get_params(),
        "feature_names": list(estimator.feature_names_),
        "state": estimator._extra_state(),
        "n_train_rows": int(getattr(estimator, "n_train_rows_", 0)),
        "fingerprint": dict(fingerprint) if fingerprint is not None else None,
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "booster_file": model_path.name,
        "booster_sha256": _sha256(model_path),
        "notes": dict(notes) if notes else {},
    }
    try:
        text = json.dumps(meta, indent=1, sort_keys=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        model_path.unlink(missing_ok=True)
        raise TypeError(f"the fingerprint, notes and params must be JSON data: {exc}") from exc
    meta_path.write_text(text + "\n")
    return model_path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of the estimator saved at ``path`` (without loading the booster)."""
    model_path, meta_path = _paths(path)
    if not meta_path.is_file():
        raise EstimatorFileError(f"{meta_path}: no such file (an estimator is saved as {model_path.name} "
                                 f"plus {meta_path.name})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise EstimatorFileError(f"{meta_path}: not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EstimatorFileError(f"{meta_path}: not a sparseloom estimator's metadata")
    if meta.get("format_version") != FORMAT_VERSION:
        raise EstimatorFileError(f"{meta_path}: format version {meta.get('format_version')}, "
                                 f"this sparseloom reads {FORMAT_VERSION}")
    return meta


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


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
    model_path, meta_path = _paths(path)
    meta = read_metadata(model_path)
    if not model_path.is_file():
        raise EstimatorFileError(f"{model_path}: no such file (its metadata {meta_path.name} exists)")
    if _sha256(model_path) != meta.get("booster_sha256"):
        raise EstimatorFileError(f"{model_path}: the booster file changed since {meta_path.name} was written")
    cls = ESTIMATORS.get(meta.get("estimator", ""))
    if cls is None:
        raise EstimatorFileError(f"{meta_path}: unknown estimator class {meta.get('estimator')!r}")
    accepted = set(cls._param_names())
    params = {k: v for k, v in (meta.get("params") or {}).items() if k in accepted}
    dropped = sorted(set(meta.get("params") or {}) - accepted)
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
    if problems:
        warnings.warn(f"{model_path}: " + "; ".join(problems), StaleEstimatorWarning, stacklevel=2)

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
    est = cls(**params)
    est.booster_ = booster
    est.feature_names_ = names
    est.n_features_in_ = len(names)
    est.n_train_rows_ = int(meta.get("n_train_rows", 0))
    est._set_extra_state(meta.get("state") or {})
    est.metadata_ = meta
    return est


__all__ = [
    "ESTIMATORS", "EstimatorFileError", "StaleEstimatorWarning", "library_versions", "load_estimator",
    "metadata_path", "read_metadata", "save_estimator",
]
