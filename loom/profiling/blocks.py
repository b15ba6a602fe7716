"""Measuring one block on one processor, inside the processor's pinned worker thread.

A block is timed on its real input activations (``slot_inputs``: the dense chain run
up to its slot), after the backend was asked which ops it cannot run; a refusal is a
result (``status: unsupported``), not an error.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loom.core.errors import UnsupportedOpsError
from loom.model.family import Family
from loom.model.partition import Partition
from loom.processors.workers import Worker
from loom.profiling.measure import sample_stats, time_samples

if TYPE_CHECKING:
    from backends.base import Backend, LoadedBlock


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception as one short line: engine messages span lines, and a CSV row should not."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]


def _nbytes(arrays: Iterable[Any]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays))


def _timed_run(backend: Backend, loaded: LoadedBlock, feeds: dict[str, np.ndarray], load_ms: float, *,
               warmup: int, repeats: int) -> dict[str, Any]:
    """A loaded block's row cells: its latency figures, load time, memory and I/O sizes."""
    inputs = {n: feeds[n] for n in loaded.input_names}
    out = backend.run(loaded, inputs)
    stats = sample_stats(time_samples(lambda: backend.run(loaded, inputs), warmup=warmup, repeats=repeats))
    return {
        "status": "ok",
        "latency_ms_median": stats["median"],
        "latency_ms_p90": stats["p90"],
        "latency_ms_min": stats["min"],
        "latency_ms_std": stats["std"],
        "repeats": repeats,
        "warmup": warmup,
        "load_ms": load_ms,
        "memory_bytes": backend.memory_bytes(loaded),
        "input_bytes": _nbytes(inputs.values()),
        "output_bytes": _nbytes(out.values()),
    }


def measure_block(worker: Worker, path: Path, block_id: str, feeds: dict[str, np.ndarray], *,
                  warmup: int, repeats: int) -> dict[str, Any]:
    """One block on one processor, inside the processor's worker thread (the job below)."""

    def job() -> dict[str, Any]:
        backend = worker.backend
        bad = backend.unsupported_ops(path)
        if bad:
            return {"status": "unsupported", "unsupported_ops": ";".join(bad)}
        t0 = time.perf_counter()
        try:
            loaded = backend.load(path, block_id=block_id)
        except UnsupportedOpsError as exc:  # kernels missing for a type show only at load
            return {"status": "unsupported", "unsupported_ops": ";".join(exc.ops)}
        load_ms = (time.perf_counter() - t0) * 1e3
        try:
            return _timed_run(backend, loaded, feeds, load_ms, warmup=warmup, repeats=repeats)
        finally:
            backend.release(loaded)

    return worker.submit(job).result()


def warm_worker(worker: Worker) -> None:
    """Load, run and drop a one-op model: engine start-up is not charged to the first block."""
    from backends.base import warm_model

    def job() -> None:
        model = warm_model()
        loaded = worker.backend.load(model, block_id="warm-up")
        try:
            worker.backend.run(loaded, {"x": np.zeros((1, 4), np.float32)})
        finally:
            worker.backend.release(loaded)

    with contextlib.suppress(Exception):  # a backend refusing even this says so on the real blocks
        worker.submit(job).result()


def slot_inputs(partition: Partition, family: Family, *, samples: int = 1) -> list[dict[str, np.ndarray]]:
    """The tensors available before each slot on real data: the dense chain on the first
    ``samples`` evaluation inputs (graph inputs plus every earlier cut's tensors)."""
    from loom.core.onnxutil import load_model
    from loom.core.runref import session

    env: dict[str, np.ndarray] = dict(family.eval_feeds(samples)[0])
    dense = family.reference_variant().name
    result = []
    for s, bid in enumerate(partition.variants[dense]):
        result.append(dict(env))
        if s + 1 < partition.k:
            info = partition.blocks[bid]
            sess = session(load_model(partition.block_path(bid), check=False), name=bid)
            env.update(zip(info.outputs, sess.run(info.outputs, {n: env[n] for n in info.inputs}), strict=True))
    return result
