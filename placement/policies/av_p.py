"""AV-P: any original variant per request, any placement of its slots (adaptive)."""

from __future__ import annotations

from placement.policies.base import AnyVariantPolicy


class AvP(AnyVariantPolicy):
    name = "av-p"
    partitioned = True
    one_processor = False
