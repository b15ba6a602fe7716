"""Learned estimators: block features from ONNX, latency and accuracy models, what to measure.

Instead of profiling every block on every processor and evaluating every stitched
config, sparseloom measures a small sample and predicts the rest:

- ``features``: ``block_features(model)`` and ``processor_features(kind, backend,
  options)``, dict rows with fixed, ordered schemas (``BLOCK_FEATURES``,
  ``PROCESSOR_FEATURES``, ``LATENCY_FEATURES``);
- ``latency``: ``LatencyEstimator`` (XGBoost on log latency over a roofline prior),
  ``LinkModel`` for hand-offs between processors, ``predict_plan``/``latency_table``
  /``plan_latency`` for plans;
- ``accuracy``: ``cut_compatibility`` (activations of each variant at the cuts ->
  how well each pair fits), ``config_features``, ``AccuracyEstimator``,
  ``min_accuracy_baseline``;
- ``sampling``: ``random_sample``, ``stratified_sample``, ``active_sample``;
- ``persist``: ``save_estimator``/``load_estimator`` (XGBoost JSON + metadata JSON).

Layering: this package imports only the leaf modules of ``loom`` (``errors``,
``compat``, ``onnxutil``), numpy and onnx; XGBoost is imported when a model is
fitted or loaded (``loom.core.compat.require``). The face (``loom``) imports estimators,
never the reverse.
"""

from __future__ import annotations

from estimators.accuracy import (
    AccuracyEstimator,
    config_feature_names,
    config_features,
    cut_compatibility,
    min_accuracy_baseline,
)
from estimators.features import (
    BLOCK_FEATURES,
    LATENCY_FEATURES,
    OP_VOCABULARY,
    PROCESSOR_FEATURES,
    FeatureSchemaError,
    block_features,
    latency_row,
    processor_features,
)
from estimators.latency import (
    LatencyEstimator,
    Link,
    LinkModel,
    PlanLatency,
    latency_table,
    plan_latency,
    predict_plan,
)
from estimators.persist import (
    EstimatorFileError,
    StaleEstimatorWarning,
    load_estimator,
    save_estimator,
)
from estimators.sampling import active_sample, config_space, random_sample, stratified_sample

__all__ = [
    "BLOCK_FEATURES", "LATENCY_FEATURES", "OP_VOCABULARY", "PROCESSOR_FEATURES",
    "AccuracyEstimator", "EstimatorFileError", "FeatureSchemaError", "LatencyEstimator", "Link",
    "LinkModel", "PlanLatency", "StaleEstimatorWarning",
    "active_sample", "block_features", "config_feature_names", "config_features", "config_space",
    "cut_compatibility", "latency_row", "latency_table", "load_estimator", "min_accuracy_baseline",
    "plan_latency", "predict_plan", "processor_features", "random_sample", "save_estimator",
    "stratified_sample",
]
