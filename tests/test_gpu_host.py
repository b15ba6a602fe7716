"""profiles/gpu-host.yaml (a CPU + CUDA machine) and the device check's wheel set."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from loom.core.errors import BackendUnavailableError, ConfigError
from loom.processors.device import load_device_profile

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_host_profile_validates_and_cites_its_figures():
    p = load_device_profile("gpu-host")
    assert p.processor_names == ["cpu-ort", "gpu-torch"]
    gpu = p.processor("gpu-torch")
    assert (gpu.kind, gpu.backend, gpu.options["device"]) == ("gpu", "torch", "cuda")
    assert not set(gpu.cores) & set(p.processor("cpu-ort").cores)  # own cores; the runtime's are others
    text = (ROOT / "profiles" / "gpu-host.yaml").read_text()
    # every figure line carries a source tag or says it is an estimate
    for line in text.splitlines():
        m = re.match(r"\s+(dispatch_us|memory_mb|latency_us|bandwidth_gbps|mem_gbps|launch_us|power_w|fp32|tf32|fp16|bf16|int8): ", line)
        if m:
            assert "#" in line and ("[" in line or "estimate" in line), line


def test_gpu_processor_without_a_gpu_is_a_typed_error():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: gpu-host's GPU processor runs")
    p = load_device_profile("gpu-host")
    with pytest.raises(BackendUnavailableError, match=r"processor 'gpu-torch'.*sees no CUDA GPU"):
        p.make_backend("gpu-torch")


def test_host_profile_still_loads():
    assert "cpu0-ort" in load_device_profile("host").processor_names


def test_device_check_fits_the_profile_to_a_cpu_machine(tmp_path):
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "scripts" / "device_check.py")
    dc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dc)
    path, changes = dc.profile_for({"mode": "cpu", "cpus": 2, "gpus": []}, tmp_path)
    p = load_device_profile(path)
    assert p.processor("gpu-torch").options["device"] == "cpu" and p.processor("gpu-torch").kind == "cpu"
    assert p.processor("cpu-ort").cores == [0] and p.processor("gpu-torch").cores == [1]
    assert len(changes) == 2 and p.name == "gpu-host-cpu-mode"
    same, none = dc.profile_for({"mode": "gpu", "cpus": 16, "gpus": ["H200"]}, tmp_path)
    assert none == [] and load_device_profile(same).processor("gpu-torch").options["device"] == "cuda"
    with pytest.raises(ConfigError):
        load_device_profile(tmp_path / "missing.yaml")
