"""Backends: one small module per engine, found by name in a registry, imported lazily.

Importing this package imports no engine: ``REGISTRY`` maps a name to
``"module:Class"`` and the module is imported the first time the name is asked for,
so a machine without OpenVINO (or TensorRT, ...) still runs everything else, and
``available_backends()`` says what is missing and how to get it. Modules named ``_*``
are a backend's machinery, not backends. Design: docs/backends.md.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from typing import TYPE_CHECKING, Any

from loom.core.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    from backends.base import Backend

#: backend name -> "module:Class"; a device profile's processor names one of these
REGISTRY: dict[str, str] = {
    "onnxruntime": "backends.ort:OrtBackend",
    "openvino": "backends.openvino:OpenVinoBackend",
    "tvm": "backends.tvm:TvmBackend",
    "tensorrt": "backends.tensorrt:TensorRtBackend",
    "torch": "backends.torch:TorchBackend",
    "null": "backends.null:NullBackend",
}

_classes: dict[str, type[Backend]] = {}
_lock = threading.Lock()

__all__ = ["REGISTRY", "available_backends", "backend_class", "get_backend", "register"]


def register(name: str, target: str) -> None:
    """Add (or replace) a backend: ``target`` is ``"module:Class"``, imported on first ask."""
    if ":" not in target:
        raise ConfigError(f"backend {name!r}: target must be 'module:Class', got {target!r}")
    with _lock:
        REGISTRY[name] = target
        _classes.pop(name, None)


def backend_class(name: str) -> type[Backend]:
    """The class registered as ``name``, importing its module on the first ask.

    Unknown names raise ``ConfigError`` (a ``ValueError``) listing the known ones; a
    module whose dependency is missing raises ``MissingDependencyError`` (an
    ``ImportError``) saying what to pip install.
    """
    with _lock:
        cached = _classes.get(name)
        target = REGISTRY.get(name)
    if cached is not None:
        return cached
    if target is None:
        raise ConfigError(f"unknown backend {name!r}; known backends: {', '.join(sorted(REGISTRY))}")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except MissingDependencyError:
        raise
    except ImportError as exc:
        missing = exc.name or module_name
        raise MissingDependencyError(
            f"backend {name!r} cannot be imported ({exc}): pip install {missing}"
        ) from exc
    try:
        cls = getattr(module, class_name)
    except AttributeError as exc:
        raise ConfigError(f"backend {name!r}: {module_name} has no class {class_name}") from exc
    with _lock:
        _classes[name] = cls
    return cls


def get_backend(name: str, **options: Any) -> Backend:
    """A configured backend: ``options`` are its keyword-only constructor arguments.

    Options the backend does not take raise ``ConfigError`` naming the ones it does,
    so a typo in a device profile is reported as such and not as a ``TypeError``.
    """
    cls = backend_class(name)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        accepted = [
            p.name for p in inspect.signature(cls).parameters.values() if p.kind is p.KEYWORD_ONLY
        ]
        raise ConfigError(f"backend {name!r}: {exc}; it accepts {accepted}") from exc
    return cls(**options)


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every registered backend -> (can it run here?, why or why not). Never raises.

    Each answer comes from the backend itself (package importable, devices listed),
    so this imports every backend's module, and each engine it finds installed.
    """
    result: dict[str, tuple[bool, str]] = {}
    for name in list(REGISTRY):
        try:
            ok, why = backend_class(name).is_available()
            result[name] = (bool(ok), str(why))
        except Exception as exc:
            result[name] = (False, f"{type(exc).__name__}: {exc}")
    return result
