"""Load scenarios, the benchmarks' knobs: the best static plan's capacity, and configs scaled to a load.

``static_capacity`` is the largest total rate the best single-variant policy sustains
(its fluid bound); ``scenario`` is a config at a given total Poisson rate and SLO scale.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

from loom.app.config import SloConfig
from loom.app.deployment import Deployment
from placement.assignment import fluid_goodput_bound
from placement.policies import get_policy

STATIC_POLICIES = ("sv-ao-np", "sv-ao-p", "sv-lo-np", "sv-lo-p")


def slos_of(cfg: SloConfig) -> dict[str, tuple[float, float]]:
    """Each task's (latency bound ms, accuracy floor) as configured at the start."""
    return {t.name: (t.latency_ms, t.accuracy_floor) for t in cfg.tasks}


def static_capacity(dep: Deployment, mix: Mapping[str, float]) -> tuple[float, str]:
    """Largest sustainable total rate of the best single-variant policy (fluid bound of its one plan per task)."""
    best, who = 0.0, ""
    for name in STATIC_POLICIES:
        cands = dep.candidates(name)
        bound = fluid_goodput_bound(dep.spaces, slos_of(dep.config), rate_mix=dict(mix),
                                    candidates={t: c[:1] if get_policy(name).partitioned else c for t, c in cands.items()})
        if math.isfinite(bound) and bound > best:
            best, who = bound, name
    return best, who


def scenario(base: SloConfig, *, total_rps: float, mix: Mapping[str, float], bound_scale: float,
             duration_s: float, seed: int, keep_slo_changes: bool = False) -> SloConfig:
    """``base`` at a total Poisson rate split as ``mix``, bounds scaled, for ``duration_s`` seconds."""
    cfg = copy.deepcopy(base)
    total_mix = sum(mix.values())
    for t in cfg.tasks:
        t.latency_ms = t.latency_ms * bound_scale
        if not keep_slo_changes:
            t.slo_changes = []
        if t.arrival.process == "poisson":
            t.arrival = type(t.arrival).model_validate({"process": "poisson", "rate_rps": total_rps * mix[t.name] / total_mix})
    cfg.run.warmup_s = min(cfg.run.warmup_s, duration_s / 4)  # first: validated against the duration
    cfg.run.duration_s = duration_s
    cfg.run.seed = seed
    return cfg
