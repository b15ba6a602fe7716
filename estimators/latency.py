"""Latency (ms) of one block on one processor, predicted from features: ``LatencyEstimator``.

XGBoost on log latency, starting from a per-processor *roofline prior* (a non-negative
fit of ms on MACs and bytes written) that lets it extrapolate past the largest block
it saw. Why, and what it reaches on the embedded zoo: ``docs/estimators.md``.
Plans (blocks plus hand-offs) are ``estimators.plans``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from estimators.booster import BoosterEstimator
from estimators.features import LATENCY_FEATURES, PROCESSOR_FEATURES, FeatureSchemaError

# -- the roofline prior -------------------------------------------------------------------------
#: the features the prior reads: MACs (split by the share of int8 weights, since integer
#: kernels run at another rate per MAC than float ones) and bytes written
PRIOR_TERMS: tuple[str, ...] = ("macs_total", "prec_int8", "act_total_bytes")
#: its columns: fixed cost per call, float MACs, int8 MACs, bytes written
_PRIOR_COLUMNS = ("const", "macs_float", "macs_int8", "bytes")


def nnls(A: np.ndarray, b: np.ndarray, *, max_iter: int = 200) -> np.ndarray:
    """Non-negative least squares (Lawson-Hanson): argmin ||Ax - b|| subject to x >= 0.

    Here instead of scipy's because the runtime does not depend on scipy.
    """
    n = A.shape[1]
    passive = np.zeros(n, dtype=bool)
    x = np.zeros(n)
    for _ in range(max_iter):
        w = A.T @ (b - A @ x)
        if passive.all() or (w[~passive] <= 1e-12).all():
            break
        passive[int(np.argmax(np.where(~passive, w, -np.inf)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
    return x


def _fit_roofline(design: np.ndarray, y: np.ndarray) -> list[float]:
    # Relative error (rows divided by y): a 0.05 ms block matters as much as a 2 ms one.
    scale = np.maximum(np.abs(design).max(axis=0), 1e-12)
    coef = nnls(design / scale / y[:, None], np.ones(len(y))) / scale
    if not np.any(coef > 0):  # degenerate: fall back to the median latency as a constant
        coef = np.zeros(design.shape[1])
        coef[0] = float(np.median(y))
    # A precision this processor was never measured at costs what the other one does per
    # MAC (a guess, but a 0 would predict its MACs as free).
    seen = np.abs(design).sum(axis=0) > 0
    f, i = _PRIOR_COLUMNS.index("macs_float"), _PRIOR_COLUMNS.index("macs_int8")
    if not seen[i]:
        coef[i] = coef[f]
    elif not seen[f]:
        coef[f] = coef[i]
    return [float(c) for c in coef]


class LatencyEstimator(BoosterEstimator):
    """Latency (ms) of a block on a processor from ``LATENCY_FEATURES`` rows.

    ``target``: ``"log"`` fits log latency (multiplicative errors), ``"linear"`` fits ms.
    ``prior``: ``"auto"`` uses the roofline prior when the schema has the features it
    needs (``PRIOR_TERMS``; processor features, when present, give each processor its
    own fit), ``"roofline"`` requires it,
    ``"none"`` lets the trees do everything (they cannot extrapolate).
    """

    _known_features = LATENCY_FEATURES

    def __init__(
        self,
        *,
        n_estimators: int = 400,
        max_depth: int = 4,
        learning_rate: float = 0.05,
        min_child_weight: float = 1.0,
        subsample: float = 0.8,
        colsample_bytree: float = 0.8,
        reg_lambda: float = 1.0,
        target: str = "log",
        prior: str = "auto",
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
        self.target = target
        self.prior = prior
        self.random_state = random_state
        self.n_jobs = n_jobs

    # -- target -------------------------------------------------------------------------------
    def _encode_target(self, y: np.ndarray) -> np.ndarray:
        if self.target == "log":
            if np.any(y <= 0):
                raise ValueError("latencies must be > 0 ms to fit their log")
            return np.log(y)
        if self.target == "linear":
            return y
        raise ValueError(f"target must be 'log' or 'linear', got {self.target!r}")

    def _decode(self, raw: np.ndarray) -> np.ndarray:
        return np.exp(raw) if self.target == "log" else np.maximum(raw, 0.0)

    # -- prior --------------------------------------------------------------------------------
    def _prior_columns(self) -> tuple[list[int], list[int]] | None:
        names = self.feature_names_
        if not all(t in names for t in PRIOR_TERMS):
            return None
        proc = [names.index(p) for p in PROCESSOR_FEATURES if p in names]
        return [names.index(t) for t in PRIOR_TERMS], proc

    def _design(self, X: np.ndarray, work: list[int]) -> np.ndarray:
        macs, int8, nbytes = (np.nan_to_num(X[:, j]) for j in work)
        return np.column_stack([np.ones(len(X)), macs * (1 - int8), macs * int8, nbytes])

    @staticmethod
    def _group_key(row: np.ndarray) -> str:
        return ",".join(f"{v:g}" for v in np.nan_to_num(row))

    def _fit_margin(self, X: np.ndarray, y: np.ndarray) -> np.ndarray | None:
        if self.prior not in ("auto", "roofline", "none"):
            raise ValueError(f"prior must be 'auto', 'roofline' or 'none', got {self.prior!r}")
        self.prior_ = None
        if self.prior == "none":
            return None
        cols = self._prior_columns()
        if cols is None:
            if self.prior == "roofline":
                raise FeatureSchemaError("the roofline prior needs these features (or pass prior='none')",
                                         missing=[t for t in PRIOR_TERMS if t not in self.feature_names_])
            return None
        if np.any(y <= 0):
            raise ValueError("latencies must be > 0 ms")
        work, proc = cols
        design = self._design(X, work)
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(X[:, proc]):
            groups.setdefault(self._group_key(row), []).append(i)
        self.prior_ = {
            "terms": list(PRIOR_TERMS),
            "group_features": [self.feature_names_[j] for j in proc],
            # per processor (identified by its features); "pooled" serves processors never seen
            "groups": {key: _fit_roofline(design[idx], y[idx]) for key, idx in groups.items()},
            "pooled": _fit_roofline(design, y),
        }
        return self._margin(X)

    def _prior_ms(self, X: np.ndarray) -> np.ndarray | None:
        if not getattr(self, "prior_", None):
            return None
        names = self.feature_names_
        work = [names.index(t) for t in self.prior_["terms"]]
        proc = [names.index(p) for p in self.prior_["group_features"]]
        design = self._design(X, work)
        out = np.empty(len(X))
        # one lookup per distinct processor, not per row: latency tables have thousands
        uniq, inverse = np.unique(np.nan_to_num(X[:, proc]), axis=0, return_inverse=True)
        for g, row in enumerate(uniq):
            coef = self.prior_["groups"].get(self._group_key(row), self.prior_["pooled"])
            rows = inverse.reshape(-1) == g
            out[rows] = design[rows] @ np.asarray(coef)
        return np.maximum(out, 1e-6)

    def _margin(self, X: np.ndarray) -> np.ndarray | None:
        prior = self._prior_ms(X)
        if prior is None:
            return None
        return np.log(prior) if self.target == "log" else prior

    def prior_ms(self, X: Any) -> np.ndarray:
        """The roofline prior alone (ms): what the trees start from. NaN-free; raises when there is none."""
        self._check_fitted()
        out = self._prior_ms(self.transform_rows(X))
        if out is None:
            raise ValueError("this estimator was fitted without a prior")
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {"prior": getattr(self, "prior_", None)}

    def _set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.prior_ = state.get("prior")


__all__ = ["PRIOR_TERMS", "LatencyEstimator", "nnls"]
