"""The policies every benchmark compares (DESIGN.md, "The comparison every benchmark makes").

A registry by name, imported lazily like a plugin registry: ``get_policy("av-p")``
imports ``placement.policies.av_p`` only then. ``POLICY_NAMES`` lists them in the
order of the comparison table.

| name | adaptive | stitched | partitioned | candidates |
| --- | --- | --- | --- | --- |
| sv-ao-np | no | no | no | most accurate variant, on each processor that runs it whole, fastest first |
| sv-ao-p | no | no | yes | most accurate variant, its fastest placement |
| sv-lo-np | no | no | no | fastest variant meeting the floor, on each processor, fastest first |
| sv-lo-p | no | no | yes | fastest (partitioned) variant meeting the floor, its fastest placement |
| av-np | yes | no | no | front of original variants x single processors |
| av-p | yes | no | yes | front of original variants x placements |
| sparseloom | yes | yes | yes | front of stitched configs x placements (preloader on) |
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from loom.core.errors import ConfigError

if TYPE_CHECKING:
    from placement.policies.base import Policy

#: name -> (module, class); the module is imported on first use
_REGISTRY: dict[str, tuple[str, str]] = {
    "sv-ao-np": ("placement.policies.sv_ao_np", "SvAoNp"),
    "sv-ao-p": ("placement.policies.sv_ao_p", "SvAoP"),
    "sv-lo-np": ("placement.policies.sv_lo_np", "SvLoNp"),
    "sv-lo-p": ("placement.policies.sv_lo_p", "SvLoP"),
    "av-np": ("placement.policies.av_np", "AvNp"),
    "av-p": ("placement.policies.av_p", "AvP"),
    "sparseloom": ("placement.policies.sparseloom", "Sparseloom"),
}

POLICY_NAMES: tuple[str, ...] = tuple(_REGISTRY)

__all__ = ["POLICY_NAMES", "get_policy"]


def get_policy(name: str, **options: Any) -> Policy:
    """The policy called ``name`` (case and ``_``/``-`` forgiven); ``options`` go to its constructor.

    Raises ``ConfigError`` (a ``ValueError``) naming the known policies for an unknown name.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ConfigError(f"unknown policy {name!r}; known policies: {', '.join(POLICY_NAMES)}")
    module, cls = _REGISTRY[key]
    return getattr(importlib.import_module(module), cls)(**options)
