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
