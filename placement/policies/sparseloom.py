"""sparseloom: any stitched config on any placement (adaptive), hot-block preloader on.

Candidates are ``pareto_plans`` restricted to the floor and bound: exact for config
spaces up to ``placement.pareto.CONFIG_LIMIT`` configs, the label DP beyond.
"""

from __future__ import annotations

from placement.policies.base import AnyVariantPolicy


class Sparseloom(AnyVariantPolicy):
    name = "sparseloom"
    stitched = True
    partitioned = True
    preload = True
    one_processor = False
