"""Optional dependencies, checked in one place (the XGBoost ``compat`` pattern).

Nothing here imports an optional package at module import time: ``find_spec``
answers "is it installed?" without the import cost, and ``require`` imports lazily
and turns a missing package into an error that says what to pip install.

This module and ``loom.core.errors`` are leaves: every layer (backends, estimators,
placement, loom) may import them, and they import nothing of sparseloom.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from loom.core.errors import MissingDependencyError

#: import name -> (pip requirement, what needs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "openvino": ("openvino", "the OpenVINO backend (pip install 'sparseloom[openvino]')"),
    "xgboost": ("xgboost-cpu", "the learned latency and accuracy estimators"),
    "tvm": ("apache-tvm", "the TVM backend"),
    "tensorrt": ("tensorrt", "the TensorRT backend (NVIDIA GPUs only)"),
    "torch": ("'sparseloom[torch]'", "the PyTorch backend and the zoo builder"),
    "onnx2torch": ("'sparseloom[torch]'", "the PyTorch backend"),
    "mnist1d": ("mnist1d", "the zoo builder's MNIST-1D tasks"),
    "sklearn": ("scikit-learn", "the zoo builder's digits task"),
}


def is_installed(module: str) -> bool:
    """True when ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str) -> ModuleType:
    """Import an optional module, or raise ``MissingDependencyError`` saying what to install."""
    if not is_installed(module):
        pip_name, purpose = OPTIONAL.get(module, (module, "this feature"))
        raise MissingDependencyError(
            f"{module!r} is not installed; it is needed for {purpose}: pip install {pip_name}"
        )
    return importlib.import_module(module)
