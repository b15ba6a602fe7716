"""The simulator's block latencies: a ``LatencyModel`` per (block, processor) pair.

From a profile dataset (measured medians with a log-normal spread), from the
estimators' predictions, or from a roofline over a device profile's datasheet figures
(``roofline_ms``, ``on_device``) for a device that is not here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from loom.app.deployment import Deployment
from loom.core.errors import ConfigError
from loom.processors.device import DeviceProfile
from loom.profiling.dataset import ProfileDataset
from loom.profiling.fitting import link_model, partition_features
from loom.serving.preload import Key

#: z of the 90th percentile of a standard normal: sigma of a log-normal from median and p90
_Z90 = 1.2815515655446004


@dataclass
class LatencyModel:
    """Run times of (block, processor) pairs: a median and a log-normal spread (sigma of ln ms)."""

    median_ms: dict[Key, float]
    sigma: dict[Key, float] = field(default_factory=dict)
    #: ms to load a block on a processor (absent: ``default_load_ms``)
    load_ms: dict[Key, float] = field(default_factory=dict)
    #: bytes a loaded block holds (absent: the plan's block size)
    memory_bytes: dict[Key, int] = field(default_factory=dict)
    default_load_ms: float = 5.0
    #: where the numbers come from, for reports
    source: str = ""

    def sample(self, key: Key, rng: np.random.Generator) -> float:
        m = self.median_ms.get(key)
        if m is None:
            raise ConfigError(f"simulator: no latency for block {key[0]} on processor {key[1]!r} ({self.source})")
        s = self.sigma.get(key, 0.0)
        return m * math.exp(s * rng.standard_normal()) if s > 0 else m

    def load(self, key: Key) -> float:
        return self.load_ms.get(key, self.default_load_ms)

    @classmethod
    def from_dataset(cls, data: ProfileDataset, *, max_sigma: float = 1.0) -> LatencyModel:
        """Measured medians, spread from each pair's p90, load times and resident bytes."""
        med, sig, load, mem = {}, {}, {}, {}
        for r in data.blocks:
            if r["status"] != "ok" or not r["latency_ms_median"]:
                continue
            key = (r["block_id"], r["processor"])
            m = float(r["latency_ms_median"])
            med[key] = m
            p90 = r.get("latency_ms_p90")
            if p90 and p90 > m:
                sig[key] = min(max_sigma, math.log(float(p90) / m) / _Z90)
            if r.get("load_ms"):
                load[key] = float(r["load_ms"])
            if r.get("memory_bytes"):
                mem[key] = int(r["memory_bytes"])
        if not med:
            raise ConfigError(f"{data.root}: no measured block rows to simulate from")
        loads = list(load.values())
        return cls(med, sig, load, mem, default_load_ms=float(np.median(loads)) if loads else 5.0,
                   source=f"profile dataset {data.root}")

    @classmethod
    def from_plans(cls, spaces: Mapping[str, Any], *, sigma: float = 0.0, source: str = "estimators") -> LatencyModel:
        """The task spaces' (predicted) block latencies, with an optional uniform spread."""
        med = {k: float(v) for space in spaces.values() for k, v in space.block_ms.items()}
        return cls(med, {k: sigma for k in med} if sigma > 0 else {}, source=source)


#: Share of a processor's datasheet peak that one batch-1 block reaches (an estimate: small
#: blocks at batch 1 leave wide units idle; on the 2-core host, onnxruntime's fp32 convs
#: of the zoo's CNN run near an AVX2 core's peak, but its transformer blocks at ~20%).
COMPUTE_EFFICIENCY = {"cpu": 0.35, "gpu": 0.10, "npu": 0.15}
#: Share of the memory bandwidth a block's weights and activations stream at (estimate).
MEMORY_EFFICIENCY = {"cpu": 0.5, "gpu": 0.4, "npu": 0.4}


def roofline_ms(features: Mapping[str, float], processor: Any) -> float | None:
    """A block's batch-1 latency on a processor from its datasheet figures, or None when it cannot run it.

    ``launch + max(ops / (peak x efficiency), bytes / (bandwidth x efficiency))``, at the
    block's precision (int8 / fp16 / fp32: whichever holds most of its MACs). A
    processor without a peak for that precision runs a float block at fp16 when it has
    one (GPUs and NPUs behind TensorRT with its fp16 flag do) and cannot run it
    otherwise (an NPU without float units).
    """
    c = processor.characteristics
    if c is None or not c.peak_gops:
        return None
    prec = max(("int8", "fp16", "fp32"), key=lambda p: features.get(f"prec_{p}", 0.0))
    peak = c.peak_gops.get(prec)
    if peak is None and prec in ("fp32", "fp16"):
        peak = c.peak_gops.get("fp16") or c.peak_gops.get("tf32")
    if peak is None and prec == "int8":
        peak = c.peak_gops.get("fp16")
    if not peak:
        return None
    kind = processor.kind
    ops = 2.0 * float(features.get("macs_total", 0.0))
    nbytes = float(features.get("weight_bytes", 0.0)) + float(features.get("act_total_bytes", 0.0))
    compute_s = ops / (peak * 1e9 * COMPUTE_EFFICIENCY.get(kind, 0.2))
    memory_s = nbytes / (c.mem_gbps * 1e9 * MEMORY_EFFICIENCY.get(kind, 0.4)) if c.mem_gbps else 0.0
    launch_ms = (c.launch_us or 0.0) / 1e3
    return launch_ms + max(compute_s, memory_s) * 1e3


def on_device(dep: Deployment, device: DeviceProfile, *, sigma: float = 0.1) -> tuple[Deployment, LatencyModel]:
    """``dep`` moved onto a device that is not here: block latencies from ``roofline_ms``.

    Accuracy is the device-independent part and stays the estimators'; links and
    dispatch costs are the profile's. Returns the new deployment and its latency model
    (with a log-normal spread ``sigma``: datasheets give no variance).
    """
    links = link_model(None, device)
    spaces, med = {}, {}
    for task, space in dep.spaces.items():
        feats = partition_features(dep.partitions[task])
        table = {}
        for b in {space.blocks[k] for k in space.blocks}:
            for p in device.processors:
                ms = roofline_ms(feats[b], p)
                if ms is not None:
                    table[(b, p.name)] = ms
        if not table:
            raise ConfigError(f"device {device.name!r}: no processor has datasheet figures (characteristics) "
                              "to simulate from")
        med.update(table)
        spaces[task] = replace(space, processors=list(device.processor_names), block_ms=table, link_model=links)
    moved = Deployment(dep.config, device, dep.estimates, dep.partitions, dep.families, spaces, dep.store)
    model = LatencyModel(med, {k: sigma for k in med}, source=f"roofline over {device.name}'s datasheet figures")
    return moved, model
