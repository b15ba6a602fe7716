"""The shipped device profiles (profiles/*.yaml) and the processors' ``characteristics``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from loom.core.errors import ConfigError
from loom.core.paths import REPO_ROOT
from loom.processors.device import PEAK_PRECISIONS, load_device_profile, parse_device_profile

PROFILES = sorted((REPO_ROOT / "profiles").glob("*.yaml"))
SHIPPED = ["host", "jetson-agx-orin", "jetson-orin-nano", "snapdragon-8gen3", "intel-core-ultra"]


def test_the_shipped_profiles_are_there():
    assert {p.stem for p in PROFILES} >= set(SHIPPED)


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_profile_loads(path: Path):
    profile = load_device_profile(path)
    assert profile.name == path.stem  # the file name is the profile's name: `--device NAME` finds it
    names = profile.processor_names
    for i, a in enumerate(names):  # every pair of processors can hand off: placements may split anywhere
        for b in names[i + 1 :]:
            link = profile.link(a, b)
            assert link.bandwidth_gbps > 0 and link.latency_us >= 0


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_processor_says_where_its_figures_come_from(path: Path):
    for proc in load_device_profile(path).processors:
        assert proc.source.strip(), f"{path.name}: processor {proc.name} has no source"


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "host"])
def test_other_machines_carry_characteristics(name: str):
    profile = load_device_profile(name)
    for proc in profile.processors:
        c = proc.characteristics
        assert c is not None, f"{name}: {proc.name} has no characteristics"
        assert c.peak_gops and set(c.peak_gops) <= set(PEAK_PRECISIONS)
        assert c.mem_gbps and c.mem_gbps > 0 and c.launch_us is not None
        assert proc.memory_mb and proc.dispatch_us > 0
    for link in profile.links:
        assert link.source.strip()


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "host"])
def test_every_number_has_a_comment(name: str):
    """Each line of the YAML that sets a figure says where it comes from, in a comment on
    the line (a datasheet tag, a derivation, or "estimate: why")."""
    text = (REPO_ROOT / "profiles" / f"{name}.yaml").read_text()
    number = re.compile(r":\s*-?\d+(\.\d+)?\s*(#|$)")
    bare = [
        line for line in text.splitlines()
        if not line.lstrip().startswith("#") and number.search(line) and "#" not in line
        # ids and switches, not figures: device ids, DLA core, threads, schema version, arch
        and not re.search(r"(device_id|trt_dla_core|schema_version|htp_arch|enable_htp_fp16_precision)\s*:", line)
    ]
    assert not bare, f"{name}: numbers without a source comment:\n" + "\n".join(bare)


def test_the_gpu_profiles_use_registered_backends():
    from backends import REGISTRY

    for name in SHIPPED:
        for proc in load_device_profile(name).processors:
            assert proc.backend in REGISTRY


def test_jetson_gpu_asks_tensorrt_with_an_engine_cache():
    from backends.ort import normalize_providers

    gpu = load_device_profile("jetson-agx-orin").processor("gpu")
    providers = normalize_providers(gpu.options["providers"])
    assert providers[0][0] == "TensorrtExecutionProvider"
    assert providers[0][1]["trt_engine_cache_enable"] is True
    assert [p if isinstance(p, str) else p[0] for p in providers][1:] == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    dla = load_device_profile("jetson-agx-orin").processor("dla1")
    assert normalize_providers(dla.options["providers"])[0][1]["trt_dla_core"] == 1


# -- characteristics ---------------------------------------------------------------------------
def _with(characteristics: dict) -> dict:
    return {
        "name": "t",
        "processors": [
            {"name": "cpu", "kind": "cpu", "backend": "null"},
            {"name": "npu", "kind": "npu", "backend": "null", "characteristics": characteristics},
        ],
        "links": [{"between": ["cpu", "npu"], "bandwidth_gbps": 1, "latency_us": 1}],
    }


@pytest.mark.parametrize(
    ("characteristics", "path"),
    [
        ({"peak_gops": {"fp16": -1}}, "processors[1].characteristics.peak_gops.fp16"),
        ({"peak_gops": {"int8": float("nan")}}, "processors[1].characteristics.peak_gops.int8"),
        ({"peak_gops": {"fp64": 3}}, "processors[1].characteristics.peak_gops"),
        ({"sparse_peak_gops": {"int8": "lots"}}, "processors[1].characteristics.sparse_peak_gops.int8"),
        ({"mem_gbps": -0.5}, "processors[1].characteristics.mem_gbps"),
        ({"launch_us": float("inf")}, "processors[1].characteristics.launch_us"),
        ({"power_w": -3}, "processors[1].characteristics.power_w"),
        ({"peak_gopss": {"fp16": 1}}, "processors[1].characteristics.peak_gopss"),
    ],
)
def test_a_malformed_characteristic_names_its_field(characteristics, path):
    with pytest.raises(ConfigError) as info:
        parse_device_profile(_with(characteristics), source="t.yaml")
    assert re.search(re.escape(path) + r"\b", str(info.value)), str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError, match="3 problem") as info:
        parse_device_profile(_with({"peak_gops": {"fp16": -1}, "mem_gbps": -1, "launch_us": -1}), source="t")
    assert "mem_gbps" in str(info.value) and "launch_us" in str(info.value)


def test_characteristics_are_optional_and_feed_the_estimator_options(tmp_path):
    data = _with({"peak_gops": {"fp32": 100, "fp16": 200}, "mem_gbps": 50, "launch_us": 0})
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    profile = load_device_profile(path)
    assert profile.processor("cpu").characteristics is None
    assert profile.processor("cpu").estimator_options() == {}
    npu = profile.processor("npu")
    assert npu.estimator_options("fp16") == {"peak_gops": 200, "mem_gbps": 50}
    assert npu.estimator_options("int8") == {"mem_gbps": 50}  # no figure at that precision: missing, not guessed
    from estimators.features import processor_features

    f = processor_features(npu.kind, npu.backend, npu.estimator_options("fp32"))
    assert f["proc_peak_gops"] == 100 and f["proc_mem_gbps"] == 50


def test_characteristics_are_not_part_of_the_fingerprint():
    """Datasheet figures are not settings of anything measured: editing them must not
    invalidate a profile dataset."""
    from loom.profiling.fingerprint import fingerprint_id, hardware_fingerprint

    a = parse_device_profile(_with({"peak_gops": {"fp16": 1}}), source="a")
    b = parse_device_profile(_with({"peak_gops": {"fp16": 2}}), source="b")
    assert fingerprint_id(hardware_fingerprint(a)) == fingerprint_id(hardware_fingerprint(b))
