"""``BoosterEstimator``: an XGBoost booster behind scikit-learn's estimator contract.

The shared base of ``LatencyEstimator`` and ``AccuracyEstimator``: keyword-only
constructor storing params only, learned state in attributes ending in ``_``, ``fit``
returns ``self``, ``NotFittedError`` before ``fit``. Subclasses add a target encoding
and a per-row starting point for the trees (``docs/estimators.md``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from estimators.features import FeatureSchemaError, schema_of, to_matrix
from estimators.saving import save_estimator
from loom.core.compat import require
from loom.core.errors import NotFittedError

_XGB_BAD_NAME_CHARS = ("[", "]", "<")


def _xgb() -> Any:
    return require("xgboost")


class BoosterEstimator:
    """An XGBoost booster behind scikit-learn's estimator contract.

    Subclasses set ``_known_features`` (the canonical column order when the schema is
    learned from dict rows) and may override ``_encode_target``/``_decode`` and the
    ``_margin`` hook (a per-row starting point for the trees).
    """

    _known_features: tuple[str, ...] = ()

    # -- scikit-learn's params protocol -------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> BoosterEstimator:
        valid = set(self._param_names())
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"{type(self).__name__} has no parameter {key!r} (has {sorted(valid)})")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def __sklearn_tags__(self) -> Any:
        """Lets scikit-learn's model selection tools (clone, cross_val_score) use it.

        Only scikit-learn calls this, so importing it here adds no runtime dependency.
        """
        from sklearn.utils import RegressorTags, Tags, TargetTags

        return Tags(estimator_type="regressor", target_tags=TargetTags(required=True),
                    regressor_tags=RegressorTags())

    def score(self, X: Any, y: Any, *, sample_weight: Any = None) -> float:
        """R^2 of the predictions, scikit-learn's default score for regressors."""
        target = np.asarray(y, dtype=np.float64).ravel()
        w = np.ones(len(target)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        resid = np.sum(w * (target - self.predict(X)) ** 2)
        total = np.sum(w * (target - np.average(target, weights=w)) ** 2)
        return float(1.0 - resid / total) if total > 0 else 0.0

    def _xgb_params(self) -> dict[str, Any]:
        return {
            "objective": "reg:squarederror",
            "eta": float(self.learning_rate),
            "max_depth": int(self.max_depth),
            "min_child_weight": float(self.min_child_weight),
            "subsample": float(self.subsample),
            "colsample_bytree": float(self.colsample_bytree),
            "lambda": float(self.reg_lambda),
            "tree_method": "hist",
            "seed": int(self.random_state),
            "nthread": int(self.n_jobs),
            "verbosity": 0,
        }

    # -- hooks ----------------------------------------------------------------------------
    def _encode_target(self, y: np.ndarray) -> np.ndarray:
        return y

    def _decode(self, raw: np.ndarray) -> np.ndarray:
        return raw

    def _fit_margin(self, X: np.ndarray, y: np.ndarray) -> np.ndarray | None:
        """Fit whatever the trees start from; return its value on the training rows (None: 0)."""
        return None

    def _margin(self, X: np.ndarray) -> np.ndarray | None:
        return None

    def _extra_state(self) -> dict[str, Any]:
        """Learned state besides the booster, as JSON (saved in the metadata file)."""
        return {}

    def _set_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    # -- fit / predict ----------------------------------------------------------------------
    def _matrix_for_fit(self, X: Any, feature_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
        if isinstance(X, Sequence) and not isinstance(X, np.ndarray) and X and isinstance(X[0], Mapping):
            names = list(feature_names) if feature_names is not None else schema_of(X, known=self._known_features)
            return to_matrix(X, names), names
        if hasattr(X, "columns") and feature_names is None:
            feature_names = [str(c) for c in X.columns]
        arr = np.asarray(X, dtype=np.float64)
        if arr.ndim != 2:
            raise FeatureSchemaError(f"expected a 2-D feature matrix or a list of dict rows, got shape {arr.shape}")
        names = list(feature_names) if feature_names is not None else [f"f{i}" for i in range(arr.shape[1])]
        if len(names) != arr.shape[1]:
            raise FeatureSchemaError(f"{len(names)} feature names for a matrix of {arr.shape[1]} columns")
        if len(set(names)) != len(names):
            raise FeatureSchemaError(f"repeated feature names: {sorted({n for n in names if names.count(n) > 1})}")
        return arr, names

    def fit(
        self,
        X: Any,
        y: Any,
        *,
        feature_names: Sequence[str] | None = None,
        sample_weight: Any = None,
    ) -> BoosterEstimator:
        """Fit on ``X`` (dict rows, or a 2-D array whose columns are ``feature_names``)."""
        xgb = _xgb()
        arr, names = self._matrix_for_fit(X, feature_names)
        target = np.asarray(y, dtype=np.float64).ravel()
        if len(target) != len(arr):
            raise ValueError(f"X has {len(arr)} rows, y has {len(target)}")
        if len(target) == 0:
            raise ValueError("cannot fit on zero rows")
        if not np.all(np.isfinite(target)):
            raise ValueError("y has NaN or infinite values")
        weight = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).ravel()
        if weight is not None and len(weight) != len(target):
            raise ValueError(f"sample_weight has {len(weight)} values for {len(target)} rows")
        label = self._encode_target(target)  # validates y before anything is overwritten
        for attr in [a for a in vars(self) if a.endswith("_")]:
            delattr(self, attr)  # a refit that fails must not leave the old booster with a new schema
        self.feature_names_ = names
        self.n_features_in_ = len(names)
        self.n_train_rows_ = len(target)
        try:
            margin = self._fit_margin(arr, target)
            dtrain = xgb.DMatrix(arr, label=label, weight=weight, feature_names=self._xgb_names(),
                                 base_margin=margin, missing=np.nan)
            self.booster_ = xgb.train(self._xgb_params(), dtrain, num_boost_round=int(self.n_estimators))
        except BaseException:
            for attr in [a for a in vars(self) if a.endswith("_")]:
                delattr(self, attr)
            raise
        return self

    def _xgb_names(self) -> list[str] | None:
        names = self.feature_names_
        if any(any(c in n for c in _XGB_BAD_NAME_CHARS) for n in names):
            return None  # XGBoost refuses these characters; the schema is kept by us anyway
        return list(names)

    def _check_fitted(self) -> None:
        if not hasattr(self, "booster_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit() or load_estimator()")

    def transform_rows(self, X: Any, *, feature_names: Sequence[str] | None = None) -> np.ndarray:
        """``X`` as a matrix in this estimator's schema (``FeatureSchemaError`` names any mismatch)."""
        self._check_fitted()
        return to_matrix(X, self.feature_names_, given_names=feature_names)

    def predict(self, X: Any, *, feature_names: Sequence[str] | None = None) -> np.ndarray:
        """Predictions for dict rows, a DataFrame, or a 2-D array in schema order (or named by ``feature_names``)."""
        xgb = _xgb()
        arr = self.transform_rows(X, feature_names=feature_names)
        if len(arr) == 0:
            return np.zeros(0)
        dm = xgb.DMatrix(arr, feature_names=self._xgb_names(), base_margin=self._margin(arr), missing=np.nan)
        return self._decode(self.booster_.predict(dm))

    def feature_importances(self, importance_type: str = "gain") -> dict[str, float]:
        """Importance of each feature (XGBoost's ``gain`` by default), highest first."""
        self._check_fitted()
        score = self.booster_.get_score(importance_type=importance_type)
        names = self.feature_names_
        by_name = {(names[int(k[1:])] if k.startswith("f") and k[1:].isdigit() and k not in names else k): v
                   for k, v in score.items()}
        return dict(sorted(by_name.items(), key=lambda kv: -kv[1]))

    def save(self, path: str | Path, *, fingerprint: Mapping[str, Any] | None = None) -> Path:
        """Save as XGBoost JSON plus a metadata JSON beside it (see ``estimators.saving``)."""
        return save_estimator(self, path, fingerprint=fingerprint)


__all__ = ["BoosterEstimator"]
