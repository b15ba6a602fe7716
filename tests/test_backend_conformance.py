"""A fixed, seeded sample of onnx's node tests through each backend wrapper and its engine
(scripts/backend_conformance.py): the wrapper must lose no case its engine passes, never
crash, and ``unsupported_ops`` must answer on every case. The full run:
``python scripts/backend_conformance.py --out out/conformance.json``."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import ROOT

SEED = 20260
#: cases per backend: each case runs twice (wrapper and engine); TVM compiles take seconds
SIZES = {"onnxruntime": 60, "openvino": 60, "torch": 15, "tvm": 4}


def _script():
    spec = importlib.util.spec_from_file_location("backend_conformance", ROOT / "scripts" / "backend_conformance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("backend_conformance", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def conformance():
    pytest.importorskip("onnx.backend.test.case.node")
    module = _script()
    return module, module.sample_cases(module.collect_cases(), max(SIZES.values()), SEED)


def _check(conformance, backend: str, size: int) -> None:
    module, cases = conformance
    results = module.conformance([backend], cases[:size], timeout=120)
    summary = module.summarize(results)[backend]
    assert summary["cases"] == size
    assert summary["wrapper_losses"] == 0, (summary["losses_by_op"], summary["loss_cases"])
    assert summary["wrapper_crashes"] == [], summary["wrapper_crashes"]
    assert summary["unsupported_ops_raised"] == [], summary["unsupported_ops_raised"]
    assert summary["wrapper"].get("pass", 0) > 0  # the sample runs something


def test_compare_follows_onnx_runner():
    module = _script()
    import numpy as np

    ref = [np.array([1.0, 2.0], np.float32)]
    assert module.compare(ref, [np.array([1.0, 2.0005], np.float32)], 1e-3, 1e-7) is None
    assert "dtype" in module.compare(ref, [np.array([1.0, 2.0])], 1e-3, 1e-7)
    assert "shape" in module.compare(ref, [np.array([[1.0, 2.0]], np.float32)], 1e-3, 1e-7)
    assert "values" in module.compare(ref, [np.array([1.0, 2.1], np.float32)], 1e-3, 1e-7)


def test_onnxruntime_loses_nothing(conformance):
    pytest.importorskip("onnxruntime")
    _check(conformance, "onnxruntime", SIZES["onnxruntime"])


@pytest.mark.openvino
def test_openvino_loses_nothing(conformance):
    pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino)")
    _check(conformance, "openvino", SIZES["openvino"])


def test_torch_loses_nothing(conformance):
    from backends import _torch_convert as conv
    from loom.core.errors import MissingDependencyError

    try:
        conv.require()
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    _check(conformance, "torch", SIZES["torch"])


@pytest.mark.slow
def test_tvm_loses_nothing(conformance):
    pytest.importorskip("tvm", reason="tvm is not installed (pip install 'sparseloom[tvm]')")
    _check(conformance, "tvm", SIZES["tvm"])
