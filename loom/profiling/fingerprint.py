"""The hardware fingerprint: what makes two profile measurements comparable.

The machine, kernel, frequency governor, engine versions and the processors' settings,
hashed into the short id every profile row carries; ``fingerprint_diff`` names what
differs when a dataset was measured elsewhere.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from loom.processors.device import DeviceProfile


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: instruction-set features that change which kernels the engines run (int8 and bf16 above all):
#: two CPUs can share a model name ("AMD EPYC") and differ here, and 3x per core
ISA_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "asimd",
                "asimddp", "sve")


def _cpu_features() -> list[str]:
    """The ``ISA_FEATURES`` this CPU has (from /proc/cpuinfo's flags; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                have = set(value.split())
                return [f for f in ISA_FEATURES if f in have]
    except OSError:
        pass
    return []


def _governor() -> str:
    """The frequency governor (``performance``, ``schedutil``...): it moves latencies a lot."""
    found: dict[str, str] = {}
    for path in sorted(glob.glob("/sys/devices/system/cpu/cpu*/cpufreq/scaling_governor")):
        try:
            found[Path(path).parent.parent.name] = Path(path).read_text().strip()
        except OSError:
            continue
    values = sorted(set(found.values()))
    if not values:
        return "unknown"
    return values[0] if len(values) == 1 else ",".join(f"{c}:{g}" for c, g in sorted(found.items()))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def hardware_fingerprint(device: DeviceProfile) -> dict[str, Any]:
    """What makes measurements comparable: machine, kernel, engines, and the processors' settings.

    Link figures, memory budgets and descriptions are left out: they are not settings
    of anything that is measured.
    """
    return {
        "cpu_model": _cpu_model(),
        "cpu_features": _cpu_features(),
        "logical_cores": os.cpu_count() or 0,
        "governor": _governor(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "packages": {
            "onnxruntime": _version("onnxruntime"),
            "openvino": _version("openvino"),
            "onnx": _version("onnx"),
            "numpy": _version("numpy"),
        },
        "device": {
            "name": device.name,
            "processors": [
                p.model_dump(mode="json", include={"name", "kind", "backend", "options", "cores", "device_id"})
                for p in device.processors
            ],
        },
    }


def fingerprint_id(fp: dict[str, Any]) -> str:
    """The short id rows carry: the first 12 hex digits of the fingerprint's SHA-256."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: dataset value -> this run's value`` for every field that differs."""
    a, b = _flatten(old), _flatten(new)
    return [
        f"{k}: {json.dumps(a.get(k))} (dataset) vs {json.dumps(b.get(k))} (here)"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


#: what must match for one machine's block latencies to rank plans on another
MACHINE_KEYS = ("cpu_model", "cpu_features", "logical_cores", "machine", "packages.onnxruntime", "packages.openvino")


def machine_mismatch(recorded: dict[str, Any], device: DeviceProfile) -> list[str]:
    """How the machine a dataset was measured on differs from this one, in what moves latencies.

    A field the dataset did not record (older datasets have no ``cpu_features``) is named
    too: the match cannot be confirmed. Empty: the same kind of machine.
    """
    a, b = _flatten(recorded), _flatten(hardware_fingerprint(device))
    out = []
    for k in MACHINE_KEYS:
        mine = b.get(k)
        if k not in a:
            out.append(f"{k}: not recorded in the dataset (here: {json.dumps(mine)})")
        elif (sorted(a[k]) if k == "cpu_features" else a[k]) != (sorted(mine) if k == "cpu_features" else mine):
            out.append(f"{k}: {json.dumps(a[k])} (dataset) vs {json.dumps(mine)} (here)")
    return out
