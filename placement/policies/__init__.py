"""The policies every benchmark compares, by name: ``get_policy("av-p")``, ``POLICY_NAMES``.

A lazy registry, like a plugin's: a policy's module is imported on first use.
``POLICY_NAMES`` lists them in the order of the comparison table; what each one
allows (adaptive, stitched, partitioned) is tabled in ``docs/placement.md``.
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
