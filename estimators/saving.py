"""Writing an estimator to disk, and the file format that loading shares: no pickle, two JSON files.

``save_estimator(est, "latency.json")`` writes the booster in XGBoost's own JSON model
format and ``latency.meta.json`` beside it (class, params, feature schema, learned
state, library versions, training fingerprint, the booster's SHA-256). This module
imports no estimator class; restoring one is ``estimators.persist.load_estimator``.
Why two data files and not a pickle: ``docs/estimators.md``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from loom.core.compat import require
from loom.core.errors import LoomError
from loom.core.schema import check_fields, read_json

FORMAT = "sparseloom-estimator"
FORMAT_VERSION = 1

#: the estimator classes ``load_estimator`` can restore, by the name saved in the metadata
SAVABLE: tuple[str, ...] = ("LatencyEstimator", "AccuracyEstimator")
#: the metadata's fields that loading reads, and their JSON types
METADATA_FIELDS: dict[str, type | tuple[type, ...]] = {
    "estimator": str, "params": dict, "feature_names": list, "state": dict, "n_train_rows": int,
    "fingerprint": (dict, type(None)), "versions": dict, "booster_sha256": str, "notes": dict,
}


class StaleEstimatorWarning(UserWarning):
    """A loaded estimator was saved with other library versions or for other training data."""


class EstimatorFileError(LoomError, ValueError):
    """An estimator's files are missing, malformed, or do not belong together."""


class Savable(Protocol):
    """What ``save_estimator`` reads of an estimator (``BoosterEstimator`` has all of it)."""

    booster_: Any
    feature_names_: list[str]

    def get_params(self, deep: bool = True) -> dict[str, Any]: ...

    def _check_fitted(self) -> None: ...

    def _extra_state(self) -> dict[str, Any]: ...


def library_versions() -> dict[str, str]:
    """Versions that change what a saved estimator means: xgboost, numpy, onnx, sparseloom."""
    import numpy
    import onnx

    from loom.core.version import __version__

    xgb = require("xgboost")
    return {"xgboost": xgb.__version__, "numpy": numpy.__version__, "onnx": onnx.__version__,
            "sparseloom": __version__}


def estimator_paths(path: str | Path) -> tuple[Path, Path]:
    """The booster file and the metadata file of the estimator saved at ``path``."""
    path = Path(path)
    if path.suffix != ".json":
        path = path.with_name(path.name + ".json")
    return path, path.with_name(path.name[: -len(".json")] + ".meta.json")


def metadata_path(path: str | Path) -> Path:
    """Where the metadata of the estimator saved at ``path`` lives."""
    return estimator_paths(path)[1]


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_estimator(
    estimator: Savable,
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
    if name not in SAVABLE:
        raise TypeError(f"cannot save a {name}: only {sorted(SAVABLE)}")
    estimator._check_fitted()
    model_path, meta_path = estimator_paths(path)
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
        "booster_sha256": sha256(model_path),
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
    model_path, meta_path = estimator_paths(path)
    if not meta_path.is_file():
        raise EstimatorFileError(f"{meta_path}: no such file (an estimator is saved as {model_path.name} "
                                 f"plus {meta_path.name})")
    meta = read_json(meta_path, EstimatorFileError)
    if meta.get("format") != FORMAT:
        raise EstimatorFileError(f"{meta_path}: not a sparseloom estimator's metadata")
    if meta.get("format_version") != FORMAT_VERSION:
        raise EstimatorFileError(f"{meta_path}: format version {meta.get('format_version')}, "
                                 f"this sparseloom reads {FORMAT_VERSION}")
    check_fields(meta, METADATA_FIELDS, source=str(meta_path), error=EstimatorFileError,
                 required=("estimator", "feature_names", "booster_sha256"))
    names = meta["feature_names"]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise EstimatorFileError(f"{meta_path}: feature_names: expected distinct strings")
    return meta


__all__ = [
    "FORMAT", "FORMAT_VERSION", "SAVABLE", "EstimatorFileError", "Savable", "StaleEstimatorWarning",
    "estimator_paths", "library_versions", "metadata_path", "read_metadata", "save_estimator", "sha256",
]
