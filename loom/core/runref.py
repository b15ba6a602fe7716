"""The reference engine for analysis: onnxruntime on the CPU, one thread unless asked.

Partitioning, cut checks and accuracy measurement need *some* engine to run full
variants and read intermediate tensors; this is it. Serving goes through ``backends``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

from loom.core.errors import ModelError

#: what scoring does with NaN/inf outputs: refuse the model, or count those samples wrong
NonFinite = Literal["raise", "wrong"]


_THREADS = [1]


@contextlib.contextmanager
def evaluation_threads(n: int) -> Iterator[None]:
    """Sessions made inside (without ``threads``) use ``n`` intra-op threads: for accuracy
    passes of a process that has the machine to itself (the demo, the zoo builder)."""
    _THREADS.append(max(1, n))
    try:
        yield
    finally:
        _THREADS.pop()


def session(model: onnx.ModelProto | bytes, *, name: str, threads: int | None = None,
            fusions: bool = True) -> ort.InferenceSession:
    """A CPU session (``threads``: default 1, or ``evaluation_threads``); ``fusions=False``
    keeps to the basic graph optimizations, whose results do not depend on where a graph
    ends (no QDQ -> QLinear* fusions)."""
    threads = _THREADS[-1] if threads is None else threads
    opts = ort.SessionOptions()
    if not fusions:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
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


#: The batch of accuracy passes. Small on purpose: past a few samples the activations of a
#: real network leave the caches and every sample gets slower (measured on a 2-core
#: Zen 3 EPYC VM, AVX2 only, 2 threads: PP-OCRv4 18 ms/sample at 8, 35 at 64; MobileNetV2 at 192 px
#: 5.2 against 6.0; MiniLM 5.7 against 6.3), and each session's arena keeps its peak.
EVAL_BATCH = 8


def run_batched(
    sess: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    *,
    batch: int = EVAL_BATCH,
) -> dict[str, np.ndarray]:
    """Run ``sess`` over the first axis of ``feeds`` in batches; concatenate the outputs."""
    names = list(outputs) if outputs else [o.name for o in sess.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for got in iter_batches(sess, feeds, names, batch=batch):
        for k, v in got.items():
            parts[k].append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def iter_batches(
    sess: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    *,
    batch: int = EVAL_BATCH,
) -> Iterator[dict[str, np.ndarray]]:
    """Run ``sess`` over the first axis of ``feeds`` in batches and yield each batch's outputs
    (for statistics that should not hold every batch's tensors at once)."""
    n = len(next(iter(feeds.values())))
    names = list(outputs) if outputs else [o.name for o in sess.get_outputs()]
    for start in range(0, n, batch):
        chunk = {k: v[start : start + batch] for k, v in feeds.items()}
        yield {k: np.asarray(v) for k, v in zip(names, sess.run(names, chunk), strict=True)}


def predicted_classes(outputs: np.ndarray, *, name: str = "outputs", nonfinite: NonFinite = "raise") -> np.ndarray:
    """One class per sample: top-1 over the last axis of logits or probabilities, or the
    output itself when it is integer (class ids, one per sample).

    A float output with NaN/inf is refused (``nonfinite="raise"``: ``ModelError`` naming
    ``name``) or its samples predict class -1, which no label matches (``"wrong"``).
    """
    out = np.asarray(outputs)
    if out.ndim == 0:
        raise ModelError(f"{name}: a scalar output, not one prediction per sample")
    n = len(out)
    if np.issubdtype(out.dtype, np.integer) or out.dtype == np.bool_:
        if out[0].size != 1:
            raise ModelError(f"{name}: integer output of shape {list(out.shape)} is read as class ids, "
                             "which needs one id per sample")
        return out.reshape(n).astype(np.int64)
    if not np.issubdtype(out.dtype, np.floating):
        raise ModelError(f"{name}: output of dtype {out.dtype} is neither scores nor class ids")
    bad = ~np.isfinite(out).reshape(n, -1).all(axis=1)
    if bad.any() and nonfinite == "raise":
        raise ModelError(
            f"{name}: {int((~np.isfinite(out)).sum())} non-finite value(s) (NaN/inf) in {int(bad.sum())} of {n} "
            "evaluation sample(s); a model that outputs NaN/inf (an fp16 overflow, say) is not scored"
        )
    pred = out.argmax(axis=-1).reshape(n, -1)
    if pred.shape[1] != 1:
        raise ModelError(f"{name}: output of shape {list(out.shape)} gives {pred.shape[1]} predictions per sample, not one")
    pred = pred[:, 0].astype(np.int64)
    pred[bad] = -1
    return pred


def top1_accuracy(
    outputs: np.ndarray, labels: np.ndarray, *, name: str = "outputs", nonfinite: NonFinite = "raise"
) -> float:
    """Share of samples whose predicted class (``predicted_classes``) equals the label.

    The one scoring function: variants, stitched configs and the demo all score with it.
    """
    pred = predicted_classes(outputs, name=name, nonfinite=nonfinite)
    y = np.asarray(labels)
    if y.ndim == 0 or len(y) != len(pred) or y[0].size != 1:
        raise ModelError(f"{name}: {len(pred)} prediction(s) against labels of shape {list(y.shape)}")
    return float((pred == y.reshape(len(y))).mean())
