"""Cheap signals for the estimators, computed with loom's own engine.

The accuracy estimator's strongest feature is how well one variant's activations at a
cut fit what another variant's next block expects there. Getting them costs one run
of each variant on a few calibration inputs with the cut tensors as extra outputs: no
stitched config has to be evaluated.
"""

from __future__ import annotations

import numpy as np

from loom.core.onnxutil import load_model
from loom.core.runref import run_batched, session, with_taps
from loom.model.family import Family
from loom.model.partition import Partition


def cut_activations(
    partition: Partition, family: Family, *, samples: int = 32
) -> dict[str, dict[str, np.ndarray]]:
    """``{variant: {cut tensor: activations on the first calibration samples}}``."""
    feeds = family.calib_feeds(samples)
    taps = sorted({t for cut in partition.cuts for t in cut if t not in feeds})
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in partition.variants:
        model = with_taps(load_model(family.variant_path(name)), taps)
        out[name] = run_batched(session(model, name=name), feeds, taps)
    return out
