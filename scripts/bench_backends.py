"""Batch-1 latency of zoo variants on each real backend here: TVM, onnxruntime, OpenVINO.

For each task of the zoo and each of a few variants (dense, structured-50, int8 by
default), loads the variant's whole ONNX file through the repo's backends, each with
one compute thread, and times ``backend.run`` at batch 1 (median of ``--repeats``
runs after ``--warmup``). Backends:

- ``onnxruntime``: CPU provider, ``intra_op_threads=1``;
- ``openvino``: CPU plugin, ``precision=f32``, ``threads=1``;
- ``tvm``: llvm for this CPU, default schedules (no tuning), symbolic batch;
- ``tvm-sampled``: llvm, ``schedule="sampled"`` (one unmeasured MetaSchedule sample per
  kernel, seed 42), ``batch_size=1``; skipped with ``--no-sampled``.

TVM compiles into a fresh cache folder (``--cache-dir`` to keep one): its ``load_ms`` is
a compilation, and ``cached_load_ms`` a second load from the cache. A variant a backend
cannot run gets a row with an ``error`` (the reason), not a crash. Writes
``{"rows": [{"task", "variant", "backend", "median_ms", "load_ms", ...}]}`` and prints a
table. Not a test: run it by hand (a few minutes)::

    python scripts/bench_backends.py --out out/bench_backends.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends import get_backend  # noqa: E402
from backends.base import Backend  # noqa: E402
from loom.core.paths import default_zoo, zoo_tasks  # noqa: E402
from loom.model.family import load_family  # noqa: E402
from loom.profiling.measure import time_call  # noqa: E402

DEFAULT_VARIANTS = ["dense", "structured-50", "int8"]
BACKENDS = ["onnxruntime", "openvino", "tvm", "tvm-sampled"]


def make_backend(label: str, cache_dir: Path) -> Backend:
    """One backend per label, one compute thread each (as a pinned processor runs)."""
    if label == "onnxruntime":
        return get_backend("onnxruntime", intra_op_threads=1)
    if label == "openvino":
        return get_backend("openvino", precision="f32", threads=1)
    if label == "tvm":
        return get_backend("tvm", threads=1, cache_dir=str(cache_dir))
    if label == "tvm-sampled":
        return get_backend("tvm", threads=1, cache_dir=str(cache_dir), schedule="sampled", batch_size=1)
    raise ValueError(f"unknown backend label {label!r}; known: {BACKENDS}")


def bench_one(
    backend: Backend, path: Path, feeds: dict[str, np.ndarray], *, warmup: int, repeats: int
) -> dict[str, Any]:
    """Load, time, reload (TVM: from its cache), release; the figures of one row."""
    t0 = time.perf_counter()
    block = backend.load(path)
    load_ms = 1e3 * (time.perf_counter() - t0)
    try:
        timing = time_call(lambda: backend.run(block, feeds), warmup=warmup, repeats=repeats)
    finally:
        backend.release(block)
    row: dict[str, Any] = {
        "median_ms": round(timing.median_ms, 4),
        "p90_ms": round(timing.p90_ms, 4),
        "load_ms": round(load_ms, 2),
        "memory_kb": block.memory_bytes // 1024,
    }
    if backend.name == "tvm":
        row["compile_ms"] = round(1e3 * block.info["compile_seconds"], 2)
        t0 = time.perf_counter()
        again = backend.load(path)
        row["cached_load_ms"] = round(1e3 * (time.perf_counter() - t0), 2)
        row["cache_hit"] = bool(again.info["cache_hit"])
        backend.release(again)
    return row


def bench(
    zoo: Path, tasks: list[str], variants: list[str], labels: list[str], cache_dir: Path,
    *, warmup: int, repeats: int,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    made: dict[str, Backend | str] = {}
    for label in labels:
        try:
            made[label] = make_backend(label, cache_dir)
        except Exception as exc:  # not installed, no device: every row of it says why
            made[label] = f"{type(exc).__name__}: {exc}"
    for task in tasks:
        family = load_family(zoo / task)
        feeds = {k: np.ascontiguousarray(v) for k, v in family.eval_feeds(1)[0].items()}
        for variant in [v for v in variants if v in family.variant_names]:
            path = family.variant_path(variant)
            for label in labels:
                row: dict[str, Any] = {"task": task, "variant": variant, "backend": label}
                backend = made[label]
                if isinstance(backend, str):
                    row["error"] = backend
                else:
                    try:
                        row.update(bench_one(backend, path, feeds, warmup=warmup, repeats=repeats))
                    except Exception as exc:
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                rows.append(row)
                print(_line(row), flush=True)
    describe = {k: (v.describe() if not isinstance(v, str) else {"error": v}) for k, v in made.items()}
    return {
        "rows": rows,
        "meta": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "warmup": warmup,
            "repeats": repeats,
            "backends": describe,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    }


def _line(row: dict[str, Any]) -> str:
    head = f"{row['task']:<11}{row['variant']:<15}{row['backend']:<13}"
    if "error" in row:
        return head + f"error: {row['error'][:90]}"
    extra = f"  (cached load {row['cached_load_ms']:.1f} ms)" if "cached_load_ms" in row else ""
    return head + f"{row['median_ms']:>10.3f}{row['load_ms']:>12.1f}{extra}"


def table(result: dict[str, Any]) -> str:
    """Median ms per (task, variant) row and backend column, and load ms."""
    rows = result["rows"]
    labels = list(dict.fromkeys(r["backend"] for r in rows))
    keys = list(dict.fromkeys((r["task"], r["variant"]) for r in rows))
    by = {(r["task"], r["variant"], r["backend"]): r for r in rows}
    lines = [
        "bs1 median ms (load ms), one thread",
        f"{'task':<11}{'variant':<15}" + "".join(f"{lbl:>22}" for lbl in labels),
    ]
    for task, variant in keys:
        cells = []
        for lbl in labels:
            r = by.get((task, variant, lbl))
            if r is None:
                cells.append(f"{'-':>22}")
            elif "error" in r:
                cells.append(f"{'error':>22}")
            else:
                cells.append(f"{r['median_ms']:>10.3f} ({r['load_ms']:>8.1f})")
        lines.append(f"{task:<11}{variant:<15}" + "".join(cells))
    errors = [r for r in rows if "error" in r]
    for r in errors:
        lines.append(f"error {r['task']}/{r['variant']} on {r['backend']}: {r['error'][:200]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the repo's)")
    ap.add_argument("--tasks", nargs="*", default=None, help="tasks (default: all of the zoo)")
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS)
    ap.add_argument("--backends", nargs="*", default=BACKENDS, choices=BACKENDS)
    ap.add_argument("--no-sampled", action="store_true", help="skip tvm-sampled (saves ~30 s)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="TVM cache (default: a fresh temporary one)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    zoo = args.zoo or default_zoo()
    tasks = args.tasks or zoo_tasks(zoo)
    labels = [b for b in args.backends if not (args.no_sampled and b == "tvm-sampled")]
    with tempfile.TemporaryDirectory(prefix="bench-tvm-") as tmp:
        cache = args.cache_dir or Path(tmp)
        result = bench(zoo, tasks, args.variants, labels, cache, warmup=args.warmup, repeats=args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print()
    print(table(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
