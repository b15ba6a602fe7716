"""The public Python API. The ``loom`` CLI is a thin shell over these functions."""

from __future__ import annotations

from loom.app.demo import run_demo
from loom.model.family import Family, Manifest, Variant, load_family
from loom.model.partition import (
    AlignmentReport,
    CutTolerance,
    Partition,
    align,
    choose_cuts,
    load_partition,
    partition_family,
)
from loom.model.stitch import StitchedModel, evaluate_config, evaluate_configs, merge_config
from loom.model.variants import (
    convert_fp16,
    init_family,
    make_variants,
    prune_structured,
    prune_unstructured,
    quantize_int8,
)

__all__ = [
    "AlignmentReport", "CutTolerance", "Family", "Manifest", "Partition", "StitchedModel", "Variant",
    "align", "choose_cuts", "convert_fp16", "evaluate_config", "evaluate_configs", "init_family",
    "load_family", "load_partition", "make_variants", "merge_config", "partition_family",
    "prune_structured", "prune_unstructured", "quantize_int8", "run_demo",
]
