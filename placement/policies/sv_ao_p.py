"""SV-AO-P: the most accurate original variant, its slots on the processors of its fastest placement (static)."""

from __future__ import annotations

from placement.policies.base import SingleVariantPolicy


class SvAoP(SingleVariantPolicy):
    name = "sv-ao-p"
    partitioned = True
    latency_optimal = False
