"""The public Python API: the one door to both halves of sparseloom. The ``loom`` CLI is a thin shell over it.

Making models (variants, partitions, stitched configs, profiles, fitted estimators) and
serving them (plans, runtimes, serve/bench runs, the simulator, the demo). Names load
lazily (PEP 562): ``import loom.api`` is cheap and ``loom.api.X`` imports only X's
module, so the CLI starts fast. ``_EXPORTS`` and the ``TYPE_CHECKING`` block list the
same names: change both.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

# ruff: noqa: F401  (the names imported for type checkers below are re-exported by __getattr__)
if TYPE_CHECKING:
    from backends import available_backends, get_backend
    from loom.app.config import POLICIES, SloConfig, load_slo_config
    from loom.app.demo import run_demo
    from loom.app.deployment import Deployment
    from loom.app.peers import PEERS, peer_server, run_peer
    from loom.app.scenario import measured_bound, scenario, static_capacity
    from loom.app.serve import bench, describe_plans, format_rows, serve
    from loom.app.sim_latency import LatencyModel, on_device
    from loom.app.sim_overhead import HostOverhead
    from loom.app.sim_runtime import Slowdown
    from loom.app.simulate import SimResult, simulate
    from loom.core.errors import ConfigError, LoomError
    from loom.core.onnxutil import save_model
    from loom.core.paths import default_zoo, resolve_zoo, zoo_name, zoo_tasks
    from loom.core.progress import say
    from loom.model.align import AlignmentReport, CutTolerance, align, choose_cuts
    from loom.model.cutting import partition_family
    from loom.model.family import Family, Manifest, Variant, load_family
    from loom.model.partition import Partition, load_partition
    from loom.model.stitch import StitchedModel, evaluate_config, evaluate_configs, merge_config
    from loom.model.variants import (
        convert_fp16,
        init_family,
        make_variants,
        prune_structured,
        prune_unstructured,
        quantize_int8,
    )
    from loom.model.wanda import Calibration, calibrate, prune_wanda
    from loom.processors.device import DeviceProfile, load_device_profile
    from loom.profiling.dataset import ProfileDataset, load_profile_dataset
    from loom.profiling.fitting import Estimates, fit_estimates
    from loom.profiling.partitions import ensure_partitions
    from loom.profiling.profile import profile_device
    from loom.profiling.remote import remote_profile
    from loom.serving.metrics import RequestRecord
    from loom.serving.runtime import Runtime
    from placement.policies import get_policy

#: module -> the public names it provides, in the order of the pipeline
_EXPORTS: dict[str, tuple[str, ...]] = {
    # errors, progress, paths, files
    "loom.core.errors": ("LoomError", "ConfigError"),
    "loom.core.progress": ("say",),
    "loom.core.paths": ("default_zoo", "resolve_zoo", "zoo_name", "zoo_tasks"),
    "loom.core.onnxutil": ("save_model",),
    # engines and devices
    "backends": ("available_backends", "get_backend"),
    "loom.processors.device": ("DeviceProfile", "load_device_profile"),
    # families and their variants
    "loom.model.family": ("Family", "Manifest", "Variant", "load_family"),
    "loom.model.variants": ("convert_fp16", "init_family", "make_variants", "prune_structured",
                            "prune_unstructured", "quantize_int8"),
    "loom.model.wanda": ("Calibration", "calibrate", "prune_wanda"),
    # partitioning and stitching
    "loom.model.align": ("AlignmentReport", "CutTolerance", "align", "choose_cuts"),
    "loom.model.cutting": ("partition_family",),
    "loom.model.partition": ("Partition", "load_partition"),
    "loom.model.stitch": ("StitchedModel", "evaluate_config", "evaluate_configs", "merge_config"),
    # profiling and fitting the estimators
    "loom.profiling.dataset": ("ProfileDataset", "load_profile_dataset"),
    "loom.profiling.partitions": ("ensure_partitions",),
    "loom.profiling.profile": ("profile_device",),
    "loom.profiling.remote": ("remote_profile",),
    "loom.profiling.fitting": ("Estimates", "fit_estimates"),
    # planning and serving
    "loom.app.config": ("POLICIES", "SloConfig", "load_slo_config"),
    "placement.policies": ("get_policy",),
    "loom.app.deployment": ("Deployment",),
    "loom.serving.runtime": ("Runtime",),
    "loom.serving.metrics": ("RequestRecord",),
    "loom.app.serve": ("bench", "describe_plans", "format_rows", "serve"),
    "loom.app.scenario": ("measured_bound", "scenario", "static_capacity"),
    "loom.app.peers": ("PEERS", "peer_server", "run_peer"),
    # simulating, and the demo
    "loom.app.simulate": ("SimResult", "simulate"),
    "loom.app.sim_latency": ("LatencyModel", "on_device"),
    "loom.app.sim_overhead": ("HostOverhead",),
    "loom.app.sim_runtime": ("Slowdown",),
    "loom.app.demo": ("run_demo",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [*_WHERE, "profile_summary", "runtime_from_yaml"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'loom.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # from now on a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def runtime_from_yaml(path: str | Path, *, policy: str | None = None,
                      on_record: Callable[[RequestRecord], None] | None = None) -> Runtime:
    """A started runtime for an SLO config file: its device, tasks, estimators and policy."""
    from loom.app.deployment import Deployment

    dep = Deployment.from_config(path)
    return dep.runtime(policy or dep.config.policy, on_record=on_record)


def profile_summary(data: ProfileDataset) -> str:
    """A profile dataset's summary as ``loom profile`` prints it: rows, processors, failures."""
    from loom.profiling.summary import format_summary, summarize

    return format_summary(summarize(data))
