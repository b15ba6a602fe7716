"""TVM targets and the TVM backend's options: what to compile for, and whether it is here.

Targets are JSON dicts, as TVM 0.27 wants them (``{"kind": "llvm", "mcpu": "znver3"}``);
``option_problems`` checks their form, and every other option's, without TVM.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loom.core import compat
from loom.core.errors import ConfigError

SCHEDULES = ("default", "sampled")
#: target kind -> TVM device type, for the kinds this backend knows how to run
DEVICE_KINDS = {
    "llvm": "cpu",
    "cuda": "cuda",
    "opencl": "opencl",
    "vulkan": "vulkan",
    "metal": "metal",
    "rocm": "rocm",
}
#: the files of a MetaSchedule database folder (a tuning log)
MS_FILES = ("database_workload.json", "database_tuning_record.json")


def tvm_module() -> Any:
    """``tvm``, imported on first use; ``MissingDependencyError`` saying what to install."""
    return compat.require("tvm")


def option_problems(options: Mapping[str, Any]) -> list[str]:
    """Every malformed option, as ``name: why``; checks the form only (no TVM needed).

    Whether the target's device is here, and whether ``tuning_log`` exists, are questions
    for the machine that runs the block: the constructor asks them.
    """
    problems: list[str] = []

    def integer(name: str, low: int, high: int | None = None, *, optional: bool = False) -> None:
        if name not in options or (optional and options[name] is None):
            return
        value = options[name]
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        if ok and (high is None or value <= high):
            return
        span = f"{low}..{high}" if high is not None else f">= {low}"
        problems.append(f"{name}: an integer {span}{' or null' if optional else ''}, got {value!r}")

    # threads: 0 would mean "one per core" to TVM, which defeats pinning a processor
    integer("threads", 1)
    integer("opt_level", 0, 3)
    integer("batch_size", 1, optional=True)
    integer("seed", 0)
    integer("device_id", 0)
    schedule = options.get("schedule", "default")
    if schedule not in SCHEDULES:
        problems.append(f"schedule: {schedule!r} is not one of {list(SCHEDULES)}")
    target = options.get("target")
    if target is not None:
        problem = _target_problem(target)
        if problem:
            problems.append(f"target: {problem}")
    for name in ("cache_dir", "tuning_log"):
        value = options.get(name)
        if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
            problems.append(f"{name}: a folder path, got {value!r}")
    if "cache" in options and not isinstance(options["cache"], bool):
        problems.append(f"cache: true or false, got {options['cache']!r}")
    if options.get("batch_size") is None:
        if schedule == "sampled":
            problems.append("batch_size: schedule 'sampled' needs static shapes; set batch_size")
        if options.get("tuning_log") is not None:
            problems.append("batch_size: tuning_log needs static shapes (tuning records are); set batch_size")
    return problems


def _target_problem(target: Any) -> str | None:
    """Why ``target`` is not a target this backend takes (None when its form is right)."""
    form = "a dict such as {'kind': 'llvm', 'mcpu': 'znver3'}, or a bare kind name"
    if isinstance(target, str):
        text = target.strip()
        if not text or any(c.isspace() for c in text) or text.startswith("-"):
            return f"{target!r}: give {form} (TVM 0.27 refuses the 'llvm -mcpu=...' form)"
        kind = text
    elif isinstance(target, Mapping):
        kind = target.get("kind")
        if not isinstance(kind, str) or not kind:
            return f"{dict(target)!r} has no 'kind' ({form})"
    else:
        return f"expected {form}, got {target!r}"
    if kind not in DEVICE_KINDS:
        return f"kind {kind!r} is not one of {sorted(DEVICE_KINDS)}"
    return None


def available_targets() -> list[str]:
    """Target kinds this TVM can compile for *and* has a device for here, e.g. ``['llvm', 'cuda']``."""
    tvm = tvm_module()
    found: list[str] = []
    for kind, device in DEVICE_KINDS.items():
        try:
            enabled = tvm.runtime.enabled(kind)
            if enabled and device_exists(tvm.device(device, 0)):
                found.append(kind)
        except Exception:  # a runtime built without this device API
            continue
    return found


def targets_text() -> str:
    """What a missing-device error adds: the targets that are here."""
    try:
        return f"targets here: {available_targets()}"
    except Exception as exc:
        return f"targets unknown ({type(exc).__name__}: {exc})"


def host_cpu() -> str:
    """The CPU name LLVM detects here (``znver3``, ``skylake-avx512``, ``cortex-a78``...)."""
    return str(tvm_module().get_global_func("tvm.codegen.llvm.GetHostCPUName")())


def device_exists(device: Any) -> bool:
    try:
        return bool(device.exist)
    except Exception:
        return False


def target_spec(target: Mapping[str, Any] | str | None, threads: int) -> dict[str, Any]:
    """The target dict to hand TVM (its form checked by ``option_problems``): host
    defaults filled in for ``llvm``."""
    if target is None:
        spec: dict[str, Any] = {"kind": "llvm"}
    elif isinstance(target, str):
        spec = {"kind": target.strip()}
    else:
        spec = dict(target)
    if spec["kind"] == "llvm":
        if "mcpu" not in spec:
            with contextlib.suppress(Exception):
                spec["mcpu"] = host_cpu()
        spec.setdefault("num-cores", threads)
    return spec


def check_tuning_log(tuning_log: str | Path | None) -> tuple[Path | None, str | None]:
    """(the database folder, a hash of its records) or ``ConfigError`` naming what is wrong."""
    if tuning_log is None:
        return None, None
    folder = Path(tuning_log)
    missing = [f for f in MS_FILES if not (folder / f).is_file()]
    if missing:
        raise ConfigError(
            f"tvm: tuning_log {str(folder)!r} is not a MetaSchedule database folder (missing {missing})"
        )
    digest = hashlib.sha256()
    for f in MS_FILES:
        digest.update((folder / f).read_bytes())
    return folder, digest.hexdigest()[:16]
