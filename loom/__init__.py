"""sparseloom: serve several DNNs at once on a heterogeneous edge SoC by stitching variants.

The package is kept light to import: the public API lives in ``loom.api`` and is
re-exported lazily (every name of ``loom.api.__all__`` is also ``loom.<name>``), so
``import loom.core.errors`` (which every layer does) costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

from loom.core.version import __version__  # noqa: F401  (re-exported)


def __getattr__(name: str) -> Any:
    if not name.startswith("__"):
        # loom.api is itself lazy: importing it to look a name up costs a few milliseconds
        api = importlib.import_module("loom.api")
        if name in api.__all__:
            return getattr(api, name)
    raise AttributeError(f"module 'loom' has no attribute {name!r}")
