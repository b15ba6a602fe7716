"""AV-NP: any original variant per request, whole model on one processor (adaptive)."""

from __future__ import annotations

from placement.policies.base import AnyVariantPolicy


class AvNp(AnyVariantPolicy):
    name = "av-np"
    partitioned = False
    one_processor = True
