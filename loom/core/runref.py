"""The reference engine for analysis: onnxruntime on the CPU, one thread, optimizations on.

Partitioning, cut checks and accuracy measurement need *some* engine to run full
variants and read intermediate tensors; this is it. Serving goes through ``backends``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from loom.core.errors import ModelError


def session(model: onnx.ModelProto | bytes, *, name: str, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"{name}: onnxruntime cannot load it: {exc}") from exc


def with_taps(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate tensors ``names``."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    have = {o.name for o in tapped.graph.output}
    for name in names:
        if name not in have:
            tapped.graph.output.append(onnx.ValueInfoProto(name=name))
    return tapped


def run_batched(
    sess: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    *,
    batch: int = 64,
) -> dict[str, np.ndarray]:
    """Run ``sess`` over the first axis of ``feeds`` in batches; concatenate the outputs."""
    n = len(next(iter(feeds.values())))
    names = list(outputs) if outputs else [o.name for o in sess.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for start in range(0, n, batch):
        chunk = {k: v[start : start + batch] for k, v in feeds.items()}
        for k, v in zip(names, sess.run(names, chunk), strict=True):
            parts[k].append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in parts.items()}


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=-1) == labels).mean())
