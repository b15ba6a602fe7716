"""SV-LO-NP: the fastest original variant that meets the floor, whole model on one processor (static)."""

from __future__ import annotations

from placement.policies.base import SingleVariantPolicy


class SvLoNp(SingleVariantPolicy):
    name = "sv-lo-np"
    partitioned = False
    latency_optimal = True
