"""Latency of a block on a processor, and of a plan (blocks on processors plus hand-offs).

Profiling every block on every processor is what the paper's 468 minutes were spent
on; here a sample is profiled and ``LatencyEstimator`` predicts the rest from
features of the ONNX block and of the processor (``estimators.features``), so that
blocks, configs and whole tasks that were never measured still get a latency.

Two choices make that extrapolation hold up:

- the target is log latency (``target="log"``): errors that matter are
  multiplicative (a 0.05 ms block off by 0.05 ms is off by 2x), and trees on the
  log scale treat a small and a large block alike;
- a *roofline prior* (``prior="auto"``): per processor, a non-negative fit
  ``ms ~ c0 + c1 * float MACs + c2 * int8 MACs + c3 * bytes written`` (relative
  error), whose log is the trees' starting point (XGBoost's ``base_margin``). Trees
  alone cannot extrapolate past the largest block they saw; the prior does, and the
  trees learn the corrections (op mix, precision, sparsity, per-call overhead). On
  the embedded zoo's 72 blocks on 2 processors (onnxruntime and OpenVINO, one core
  each), leaving a whole task out of training cut the error on its blocks from
  72-180% to 21-38% MAPE; with blocks of every task in training (5-fold) it is 9%.
  Trained on 25% of ``loom profile``'s block rows, plans (blocks + ``LinkModel``)
  predict its 73 measured placed configs to 10% MAPE, against 9% from all blocks
  measured.

The shared contract of both estimators (scikit-learn's: keyword-only constructor
storing params only, learned state in attributes ending in ``_``, ``fit`` returns
``self``, ``NotFittedError`` before ``fit``) lives in ``BoosterEstimator``.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from estimators.features import (
    LATENCY_FEATURES,
    PROCESSOR_FEATURES,
    FeatureSchemaError,
    latency_row,
    schema_of,
    to_matrix,
)
from loom.core.compat import require
from loom.core.errors import ConfigError, NotFittedError

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
        """Save as XGBoost JSON plus a metadata JSON beside it (see ``estimators.persist``)."""
        from estimators.persist import save_estimator

        return save_estimator(self, path, fingerprint=fingerprint)


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


# -- links between processors -------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """A hand-off's cost: a fixed latency plus bytes over a bandwidth (GB/s = 1e9 bytes/s)."""

    latency_ms: float
    bandwidth_gbps: float

    def transfer_ms(self, nbytes: float) -> float:
        return self.latency_ms + float(nbytes) / (self.bandwidth_gbps * 1e9) * 1e3


@dataclass
class LinkModel:
    """Transfer cost between processors: per ordered pair, fixed ms + bytes / bandwidth.

    The SparseLoom paper ignores transfers; on an SoC where the NPU sits behind a
    slower bus they decide whether splitting a model pays. Pairs not listed use
    ``default`` (or raise, naming the pair, when there is none); a processor to
    itself is free. ``symmetric`` links serve both directions. ``dispatch_ms`` is a
    fixed cost per request on the processor that runs its first slot (handing the
    request to a worker and back), which block latencies measured one block at a
    time do not contain; ``loom profile`` calibrates it (``from_calibration``).
    """

    links: dict[tuple[str, str], Link] = field(default_factory=dict)
    default: Link | None = None
    symmetric: bool = True
    dispatch_ms: dict[str, float] = field(default_factory=dict)

    def link(self, src: str, dst: str) -> Link | None:
        if src == dst:
            return None
        found = self.links.get((src, dst))
        if found is None and self.symmetric:
            found = self.links.get((dst, src))
        if found is None:
            found = self.default
        if found is None:
            raise ConfigError(f"no link between processors {src!r} and {dst!r} and no default link")
        return found

    def transfer_ms(self, src: str, dst: str, nbytes: float) -> float:
        link = self.link(src, dst)
        return 0.0 if link is None else link.transfer_ms(nbytes)

    @classmethod
    def from_profile(cls, profile: Any) -> LinkModel:
        """From a device profile's links (objects or dicts with ``between``, ``bandwidth_gbps``, ``latency_us``)."""
        links: dict[tuple[str, str], Link] = {}
        for entry in getattr(profile, "links", None) or (profile.get("links", []) if isinstance(profile, Mapping) else []):
            get = entry.get if isinstance(entry, Mapping) else (lambda k, e=entry: getattr(e, k))
            a, b = get("between")
            links[(a, b)] = Link(latency_ms=float(get("latency_us")) / 1e3, bandwidth_gbps=float(get("bandwidth_gbps")))
        return cls(links=links, symmetric=True)

    @classmethod
    def from_calibration(cls, calibration: Mapping[str, Any]) -> LinkModel:
        """From ``loom profile``'s link calibration (``meta.json``'s ``link_calibration``).

        Reads ``links.*.{between, latency_us, bandwidth_gbps}`` and
        ``processors.*.dispatch_us``; a link without a measurable per-byte cost has an
        infinite bandwidth.
        """
        links: dict[tuple[str, str], Link] = {}
        for entry in (calibration.get("links") or {}).values():
            a, b = entry["between"]
            bw = entry.get("bandwidth_gbps")
            links[(a, b)] = Link(latency_ms=float(entry.get("latency_us") or 0.0) / 1e3,
                                 bandwidth_gbps=float(bw) if bw else math.inf)
        dispatch = {name: float(p.get("dispatch_us") or 0.0) / 1e3
                    for name, p in (calibration.get("processors") or {}).items()}
        return cls(links=links, symmetric=True, dispatch_ms=dispatch)

    @classmethod
    def fit(cls, samples: Iterable[tuple[str, str, float, float]], *, symmetric: bool = True) -> LinkModel:
        """Fit each pair from measured hand-offs ``(src, dst, nbytes, ms)``: least squares, non-negative.

        A pair measured at one size only gets its mean as fixed cost and infinite bandwidth.
        """
        by_pair: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for src, dst, nbytes, ms in samples:
            key = tuple(sorted((src, dst))) if symmetric else (src, dst)
            by_pair.setdefault(key, []).append((float(nbytes), float(ms)))  # type: ignore[arg-type]
        links = {}
        for key, pts in by_pair.items():
            arr = np.array(pts)
            design = np.column_stack([np.ones(len(arr)), arr[:, 0]])
            if len(np.unique(arr[:, 0])) < 2:
                links[key] = Link(latency_ms=float(arr[:, 1].mean()), bandwidth_gbps=math.inf)
                continue
            fixed, per_byte = nnls(design, arr[:, 1])
            bw = math.inf if per_byte <= 0 else 1e-6 / per_byte  # ms/byte -> GB/s
            links[key] = Link(latency_ms=float(fixed), bandwidth_gbps=float(bw))
        return cls(links=links, symmetric=symmetric)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        def enc(link: Link) -> dict[str, float | str]:
            bw: float | str = link.bandwidth_gbps if math.isfinite(link.bandwidth_gbps) else "inf"
            return {"latency_ms": link.latency_ms, "bandwidth_gbps": bw}

        return {
            "symmetric": self.symmetric,
            "default": enc(self.default) if self.default else None,
            "links": [{"between": list(k), **enc(v)} for k, v in self.links.items()],
            "dispatch_ms": dict(self.dispatch_ms),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LinkModel:
        def dec(d: Mapping[str, Any]) -> Link:
            return Link(latency_ms=float(d["latency_ms"]), bandwidth_gbps=float(d["bandwidth_gbps"]))

        return cls(
            links={tuple(d["between"]): dec(d) for d in data.get("links", [])},  # type: ignore[misc]
            default=dec(data["default"]) if data.get("default") else None,
            symmetric=bool(data.get("symmetric", True)),
            dispatch_ms={k: float(v) for k, v in (data.get("dispatch_ms") or {}).items()},
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


# -- plans ------------------------------------------------------------------------------------------
@dataclass
class PlanLatency:
    """A plan's predicted latency and where it goes."""

    total_ms: float
    block_ms: list[float]
    #: hand-off after slot s (0 where slots s and s+1 share a processor)
    transfer_ms: list[float]
    #: the first processor's fixed cost per request (0 without a link model)
    dispatch_ms: float = 0.0


def latency_table(
    estimator: LatencyEstimator,
    blocks: Mapping[str, Mapping[str, float]],
    processors: Mapping[str, Mapping[str, float]],
) -> dict[tuple[str, str], float]:
    """Predicted ms of every block on every processor, in one batched prediction.

    The optimizer looks up thousands of plans; they share a few dozen blocks, so
    predicting each (block, processor) pair once and summing is what makes it cheap.
    """
    keys = [(b, p) for b in blocks for p in processors]
    if not keys:
        return {}
    rows = [latency_row(blocks[b], processors[p]) for b, p in keys]
    return dict(zip(keys, (float(v) for v in estimator.predict(rows)), strict=True))


def plan_latency(
    block_ids: Sequence[str],
    processors: Sequence[str],
    table: Mapping[tuple[str, str], float],
    out_bytes: Mapping[str, float],
    link_model: LinkModel | None = None,
) -> PlanLatency:
    """Sum of block latencies plus hand-offs between consecutive slots on different processors.

    The bytes handed from slot s to s+1 are block s's output activations
    (``act_out_bytes``); tensors the next block reads straight from the request (a
    transformer's mask) are not counted. The link model's ``dispatch_ms`` of the first
    processor is added once.
    """
    if len(block_ids) != len(processors):
        raise ValueError(f"{len(block_ids)} blocks but {len(processors)} processors: one processor per slot")
    block_ms = [table[(b, p)] for b, p in zip(block_ids, processors, strict=True)]
    transfers = []
    for s in range(len(block_ids) - 1):
        src, dst = processors[s], processors[s + 1]
        if src == dst:
            transfers.append(0.0)
            continue
        if link_model is None:
            raise ConfigError(f"slots {s} and {s + 1} run on {src!r} and {dst!r}: a link model is needed")
        transfers.append(link_model.transfer_ms(src, dst, out_bytes[block_ids[s]]))
    dispatch = link_model.dispatch_ms.get(processors[0], 0.0) if link_model is not None and processors else 0.0
    total = float(sum(block_ms) + sum(transfers) + dispatch)
    return PlanLatency(total_ms=total, block_ms=block_ms, transfer_ms=transfers, dispatch_ms=dispatch)


def predict_plan(
    estimator: LatencyEstimator,
    block_rows: Sequence[Mapping[str, float]],
    processors: Sequence[str],
    processor_rows: Mapping[str, Mapping[str, float]],
    link_model: LinkModel | None = None,
) -> PlanLatency:
    """Latency of one plan: ``block_rows[s]`` (``block_features``) runs on ``processors[s]``.

    ``processor_rows`` maps each processor name to its ``processor_features``. Nothing
    here needs the block or the task to have been measured.
    """
    ids = [str(i) for i in range(len(block_rows))]
    blocks = dict(zip(ids, block_rows, strict=True))
    table = latency_table(estimator, blocks, {p: processor_rows[p] for p in dict.fromkeys(processors)})
    out_bytes = {i: float(row["act_out_bytes"]) for i, row in blocks.items()}
    return plan_latency(ids, processors, table, out_bytes, link_model)


__all__ = [
    "PRIOR_TERMS", "BoosterEstimator", "LatencyEstimator", "Link", "LinkModel", "PlanLatency",
    "latency_table", "nnls", "plan_latency", "predict_plan",
]
