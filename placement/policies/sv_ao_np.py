"""SV-AO-NP: the most accurate original variant, whole model on one processor (static)."""

from __future__ import annotations

from placement.policies.base import SingleVariantPolicy


class SvAoNp(SingleVariantPolicy):
    name = "sv-ao-np"
    partitioned = False
    latency_optimal = False
