"""A backend with no engine: schedulers, preloaders and runtimes are tested without hardware.

It honours the whole protocol with modelled numbers: ``run`` sleeps the modelled
latency and returns zeros of the declared output shapes, ``load`` reports a modelled
memory footprint, and chosen blocks fail on purpose (a backend crashing mid-request).
Nothing it returns is a real result, and ``describe()`` says so.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.base import (
    Backend,
    LoadedBlock,
    check_cores,
    check_resident,
    mark_released,
    op_label,
    output_dtypes,
    read_source,
    select_feeds,
)
from loom.core.errors import BackendError, ConfigError, UnsupportedOpsError

Dim = int | str | None


@dataclass
class _Shapes:
    """Declared output shapes; symbolic dims are resolved from the feeds at run time."""

    outputs: dict[str, tuple[list[Dim], np.dtype]]
    #: symbolic dim name -> (input name, axis) where a feed carries its value
    symbols: dict[str, tuple[str, int]]


class NullBackend(Backend):
    """Simulated processor.

    ``latency_ms`` is one figure for every block or a dict by block id, where the key
    ``"*"`` is the default for blocks not listed (0 without it). ``memory_bytes`` is
    likewise a figure or a dict; when not given, a block holds its weights' size, which
    is what a real engine's footprint mostly is. ``fail_on`` lists block ids whose runs
    raise ``BackendError``; ``unsupported`` lists op types it pretends it cannot run
    (an NPU refusing ops).
    """

    name = "null"

    def __init__(
        self,
        *,
        latency_ms: float | Mapping[str, float] = 0.0,
        fail_on: Collection[str] | None = None,
        load_ms: float = 0.0,
        memory_bytes: int | Mapping[str, int] | None = None,
        unsupported: Collection[str] = (),
        cores: list[int] | None = None,
    ) -> None:
        values = latency_ms.values() if isinstance(latency_ms, Mapping) else [latency_ms]
        if any(float(v) < 0 for v in values) or load_ms < 0:
            raise ConfigError(f"null backend: latencies must be >= 0, got {latency_ms!r}, load_ms={load_ms}")
        self.latency_ms = dict(latency_ms) if isinstance(latency_ms, Mapping) else float(latency_ms)
        self.fail_on = set(fail_on or ())
        self.load_ms = float(load_ms)
        self.memory = dict(memory_bytes) if isinstance(memory_bytes, Mapping) else memory_bytes
        self.unsupported = set(unsupported)
        self.cores = check_cores(cores)

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, "simulated backend: no engine, modelled latency, zero outputs"

    def unsupported_ops(self, model: onnx.ModelProto) -> list[str]:
        if not isinstance(model, onnx.ModelProto):
            model = read_source(model).proto
        ops = {op_label(n.domain, n.op_type) for n in model.graph.node}
        return sorted(ops & self.unsupported)

    def load(
        self, model: onnx.ModelProto | str | Path | bytes, *, block_id: str | None = None
    ) -> LoadedBlock:
        t0 = time.perf_counter()
        src = read_source(model, block_id)
        bad = self.unsupported_ops(src.proto)
        if bad:
            raise UnsupportedOpsError(self.name, src.name, bad)
        if self.load_ms:
            time.sleep(self.load_ms / 1e3)
        graph = src.proto.graph
        constants = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in constants]
        symbols: dict[str, tuple[str, int]] = {}
        for vi in inputs:
            for axis, d in enumerate(vi.type.tensor_type.shape.dim):
                if d.dim_param and d.dim_param not in symbols:
                    symbols[d.dim_param] = (vi.name, axis)
        dtypes = output_dtypes(src.proto)
        outputs = {o.name: (_dims(o), dtypes[o.name]) for o in graph.output}
        return LoadedBlock(
            block_id=src.name,
            backend=self.name,
            input_names=[i.name for i in inputs],
            output_names=list(outputs),
            handle=_Shapes(outputs, symbols),
            memory_bytes=self._memory(src.name, graph),
            load_seconds=time.perf_counter() - t0,
            info={"simulated": True},
        )

    def run(self, block: LoadedBlock, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        shapes: _Shapes = check_resident(block)
        inputs = select_feeds(block, feeds)
        # sleep to a deadline from entry, so the run as a whole takes the modelled time
        remaining = self.latency_for(block.block_id) / 1e3 - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
        if block.block_id in self.fail_on:
            # after the delay: a real crash happens part-way, once the processor is busy
            raise BackendError(f"block {block.block_id} on {self.name} failed (simulated failure)")
        first = next(iter(inputs.values()), None)
        batch = int(np.shape(first)[0]) if first is not None and np.ndim(first) > 0 else 1
        out: dict[str, np.ndarray] = {}
        for name, (dims, dtype) in shapes.outputs.items():
            shape = [self._resolve(d, i, shapes.symbols, inputs, batch) for i, d in enumerate(dims)]
            out[name] = np.zeros(shape, dtype=dtype)
        return out

    def release(self, block: LoadedBlock) -> None:
        mark_released(block)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "simulated": True,
            "note": "no engine: modelled latency, zero outputs",
            "latency_ms": self.latency_ms,
            "fail_on": sorted(self.fail_on),
            "cores": self.cores,
        }

    def latency_for(self, block_id: str) -> float:
        """Modelled latency of one run of ``block_id``, in milliseconds."""
        if isinstance(self.latency_ms, dict):
            return float(self.latency_ms.get(block_id, self.latency_ms.get("*", 0.0)))
        return float(self.latency_ms)

    def _memory(self, block_id: str, graph: onnx.GraphProto) -> int:
        if isinstance(self.memory, dict):
            if block_id in self.memory or "*" in self.memory:
                return int(self.memory.get(block_id, self.memory.get("*", 0)))
        elif self.memory is not None:
            return int(self.memory)
        return sum(_tensor_bytes(t) for t in graph.initializer)

    @staticmethod
    def _resolve(
        dim: Dim, axis: int, symbols: dict[str, tuple[str, int]], feeds: Mapping[str, np.ndarray], batch: int
    ) -> int:
        if isinstance(dim, int):
            return dim
        if isinstance(dim, str) and dim in symbols:
            name, at = symbols[dim]
            shape = np.shape(feeds[name])
            if at < len(shape):
                return int(shape[at])
        # an unnamed or unknown dim: the batch on the first axis, 1 elsewhere
        return batch if axis == 0 else 1


def _dims(vi: onnx.ValueInfoProto) -> list[Dim]:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return [None]  # unknown rank: model it as a vector over the batch
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return dims


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        itemsize = 4
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize if t.dims else itemsize
