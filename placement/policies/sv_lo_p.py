"""SV-LO-P: the fastest original variant (partitioned) that meets the floor, on its fastest placement (static).

"Fastest" is judged with partitioning allowed, so this may pick another variant than
SV-LO-NP where splitting helps one variant more than another.
"""

from __future__ import annotations

from placement.policies.base import SingleVariantPolicy


class SvLoP(SingleVariantPolicy):
    name = "sv-lo-p"
    partitioned = True
    latency_optimal = True
