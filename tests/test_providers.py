"""onnxruntime execution providers from a device profile: forms, aliases, availability,
fallback, and which provider runs which node (silent CPU fallback made visible)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto, helper

import backends
from backends.ort import (
    PROVIDER_ALIASES,
    OrtBackend,
    ProviderFallbackWarning,
    fallback_report,
    normalize_providers,
    provider_problems,
    resolve_provider_name,
)
from loom.core.errors import BackendUnavailableError, ConfigError
from loom.processors.device import parse_device_profile

AVAILABLE = onnxruntime.get_available_providers()
NO_CUDA = "CUDAExecutionProvider" not in AVAILABLE


def tiny_model():
    """x -> MatMul -> Add -> Relu: three nodes onnxruntime cannot fuse away on CPU at basic level."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.linspace(-1, 1, 12).tolist())
    b = helper.make_tensor("b", TensorProto.FLOAT, [3], [0.1, -0.2, 0.3])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "b"], ["z"], name="add"),
            helper.make_node("Relu", ["z"], ["y"], name="relu"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


# -- names and forms ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("cuda", "CUDAExecutionProvider"),
        ("tensorrt", "TensorrtExecutionProvider"),
        ("TensorRT", "TensorrtExecutionProvider"),
        ("openvino", "OpenVINOExecutionProvider"),
        ("qnn", "QNNExecutionProvider"),
        ("coreml", "CoreMLExecutionProvider"),
        ("xnnpack", "XnnpackExecutionProvider"),
        ("cpu", "CPUExecutionProvider"),
        ("CPUExecutionProvider", "CPUExecutionProvider"),
        ("cpuexecutionprovider", "CPUExecutionProvider"),
    ],
)
def test_aliases_resolve(alias, name):
    assert resolve_provider_name(alias) == name


def test_every_alias_names_a_provider_onnxruntime_knows():
    known = set(onnxruntime.get_all_providers())
    assert set(PROVIDER_ALIASES.values()) <= known


def test_the_three_yaml_forms_normalize_to_onnxruntimes():
    got = normalize_providers([
        {"name": "tensorrt", "options": {"trt_engine_cache_enable": True, "trt_engine_cache_path": "/c"}},
        ["cuda", {"device_id": 0}],
        "cpu",
    ])
    assert got == [
        ("TensorrtExecutionProvider", {"trt_engine_cache_enable": True, "trt_engine_cache_path": "/c"}),
        ("CUDAExecutionProvider", {"device_id": 0}),
        "CPUExecutionProvider",
    ]
    assert normalize_providers("cpu") == ["CPUExecutionProvider"]
    assert normalize_providers([{"name": "cpu"}]) == [("CPUExecutionProvider", {})]


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        (["cuda"], "providers[1]"),  # a one-item list
        (["cuda", 3], "providers[1]"),  # options not a mapping
        ({"nam": "cuda"}, "providers[1]"),  # a misspelt key
        ({"name": ""}, "providers[1]"),
        (42, "providers[1]"),
        ({"name": "cuda", "options": {"device_id": [0]}}, "providers[1].options.device_id"),
        ({"name": "cuda", "options": {"device_id": None}}, "providers[1].options.device_id"),
        ("CPUExecutionProvider", "providers[1]"),  # the same provider twice
    ],
)
def test_malformed_entries_are_named(entry, where):
    problems = provider_problems(["cpu", entry])
    assert problems and problems[0].startswith(where + ":"), problems
    with pytest.raises(ConfigError, match=re.escape(where)):
        backends.get_backend("onnxruntime", providers=["cpu", entry])


def test_empty_or_non_list_providers_are_config_errors():
    for bad in ([], {"name": "cpu"}, 7):
        with pytest.raises(ConfigError, match="providers"):
            backends.get_backend("onnxruntime", providers=bad)


def test_device_profile_names_a_bad_provider_entry_without_constructing():
    """Validation of a profile of another machine: forms are checked here, availability is not."""
    data = {
        "name": "t",
        "processors": [{
            "name": "gpu", "kind": "gpu", "backend": "onnxruntime",
            "options": {"providers": [{"name": "tensorrt", "options": {"trt_fp16_enable": True}},
                                      ["cuda", "device_id=0"], "cpu"]},
        }],
    }
    with pytest.raises(ConfigError, match=r"processors\[0\]\.options\.providers\[1\]"):
        parse_device_profile(data, source="t.yaml")
    data["processors"][0]["options"]["providers"][1] = ["cuda", {"device_id": 0}]
    profile = parse_device_profile(data, source="t.yaml")  # CUDA is not here: still a valid profile
    assert profile.processor("gpu").options["providers"][0]["name"] == "tensorrt"


# -- availability and fallback -------------------------------------------------------------------
@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDAExecutionProvider")
def test_unavailable_provider_names_it_and_the_package():
    with pytest.raises(BackendUnavailableError) as info:
        backends.get_backend("onnxruntime", providers=["cuda", "cpu"])
    message = str(info.value)
    assert "CUDAExecutionProvider" in message and "onnxruntime-gpu" in message and "fallback" in message


@pytest.mark.parametrize(
    ("alias", "package"),
    [("openvino", "onnxruntime-openvino"), ("qnn", "onnxruntime-qnn"), ("tensorrt", "onnxruntime-gpu")],
)
def test_install_hint_per_provider(alias, package):
    name = resolve_provider_name(alias)
    if name in AVAILABLE:
        pytest.skip(f"{name} is available here")
    with pytest.raises(BackendUnavailableError, match=package):
        backends.get_backend("onnxruntime", providers=[alias])


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDAExecutionProvider")
def test_fallback_drops_the_provider_loads_on_cpu_and_reports_it():
    with pytest.warns(ProviderFallbackWarning, match="CUDAExecutionProvider"):
        ort = backends.get_backend(
            "onnxruntime", providers=[["cuda", {"device_id": 0}], "cpu"], fallback=True
        )
    assert ort.providers == ["CPUExecutionProvider"]
    assert ort.dropped_providers == ["CUDAExecutionProvider"]
    assert ort.describe()["dropped_providers"] == ["CUDAExecutionProvider"]
    with pytest.warns(ProviderFallbackWarning, match="silent CPU fallback"):
        block = ort.load(tiny_model(), block_id="tiny")
    try:
        assert block.info["fallback"] is True
        assert "CUDAExecutionProvider" in block.info["fallback_reason"]
        assert block.info["providers"] == ["CPUExecutionProvider"]
        assert block.info["dropped_providers"] == ["CUDAExecutionProvider"]
        x = np.ones((1, 4), np.float32)
        assert ort.run(block, {"x": x})["y"].shape == (1, 3)
    finally:
        ort.release(block)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDAExecutionProvider")
def test_fallback_with_nothing_left_runs_on_cpu():
    with pytest.warns(ProviderFallbackWarning):
        ort = OrtBackend(providers=["cuda"], fallback=True)
    assert ort.providers == ["CPUExecutionProvider"]


# -- which provider runs which node --------------------------------------------------------------
def test_providers_used_reports_cpu_for_every_node():
    ort = OrtBackend(providers=["cpu"], graph_optimization_level="disable")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProviderFallbackWarning)  # a CPU-only request never falls back
        block = ort.load(tiny_model(), block_id="tiny")
    try:
        assert ort.providers_used(block) == {"CPUExecutionProvider": 3}
        assert block.info["providers_used"] == {"CPUExecutionProvider": 3}
        assert block.info["fallback"] is False and block.info["fallback_reason"] is None
    finally:
        ort.release(block)


def test_providers_used_counts_nodes_after_optimization():
    """With optimizations on, MatMul+Add fuse (Gemm/FusedMatMul): fewer nodes, all on CPU."""
    ort = OrtBackend(providers=["cpu"], graph_optimization_level="all")
    block = ort.load(tiny_model(), block_id="tiny")
    try:
        used = ort.providers_used(block)
        assert set(used) == {"CPUExecutionProvider"} and 1 <= used["CPUExecutionProvider"] <= 3
    finally:
        ort.release(block)


def test_fallback_report_cases():
    cpu, cuda, trt = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
    assert fallback_report([cpu], [cpu], {cpu: 5}) == (False, None)
    # registered and given nodes: no fallback, even if CPU runs some
    assert fallback_report([cuda, cpu], [cuda, cpu], {cuda: 4, cpu: 1}) == (False, None)
    # registered but handed nothing: the silent case
    fell, why = fallback_report([trt, cpu], [trt, cpu], {cpu: 5})
    assert fell and "TensorrtExecutionProvider runs none of the 5 nodes" in why and "5 of 5" in why
    # requested, not registered (libraries failed to load)
    fell, why = fallback_report([cuda, cpu], [cpu], None)
    assert fell and "did not register" in why
    # a block without nodes cannot fall back
    assert fallback_report([trt, cpu], [trt, cpu], {}) == (False, None)


# -- on a GPU machine ----------------------------------------------------------------------------
@pytest.mark.skipif(NO_CUDA, reason="needs CUDAExecutionProvider (onnxruntime-gpu and an NVIDIA GPU)")
def test_cuda_runs_the_nodes():
    ort = OrtBackend(providers=["cuda", "cpu"])
    block = ort.load(tiny_model(), block_id="tiny")
    try:
        used = ort.providers_used(block)
        assert used.get("CUDAExecutionProvider", 0) > 0 and block.info["fallback"] is False
        x = np.ones((1, 4), np.float32)
        assert ort.run(block, {"x": x})["y"].shape == (1, 3)
    finally:
        ort.release(block)
