"""sparseloom: serve several DNNs at once on a heterogeneous edge SoC by stitching variants.

The package is kept light to import: the public API lives in ``loom.api`` and is
re-exported lazily, so ``import loom.core.errors`` (which every layer does) costs nothing.
"""

from __future__ import annotations

from typing import Any

from loom.core.version import __version__  # noqa: F401  (re-exported)

_API = {
    "Family", "Partition", "StitchedModel", "align", "evaluate_config", "evaluate_configs",
    "init_family", "load_family", "load_partition", "make_variants", "merge_config",
    "partition_family", "run_demo",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        from loom import api

        return getattr(api, name)
    raise AttributeError(f"module 'loom' has no attribute {name!r}")
