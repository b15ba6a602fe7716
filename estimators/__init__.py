"""Learned estimators: predict block latency and config accuracy from a small measured sample.

``features`` (block and processor rows), ``booster`` (the shared XGBoost estimator),
``latency`` (``LatencyEstimator``), ``plans`` (hand-offs and plan latency),
``accuracy`` (cut compatibility, ``AccuracyEstimator``), ``sampling`` (which configs to
measure), ``saving``/``persist`` (JSON files, no pickle). Imports from ``loom`` only
``loom.core``. Design and measured figures: ``docs/estimators.md``.
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
from estimators.latency import LatencyEstimator
from estimators.persist import (
    EstimatorFileError,
    StaleEstimatorWarning,
    load_estimator,
    save_estimator,
)
from estimators.plans import Link, LinkModel, PlanLatency, latency_table, plan_latency, predict_plan
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
