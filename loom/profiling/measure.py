"""Timing and memory measurement used by the demo, the benchmarks and the profiler.

Latency is the median of repeated single-request runs after a warm-up; the spread
(p90, min) is kept because a shared machine is noisy and a median alone hides it.
The garbage collector is off while timing: a collection inside a sub-millisecond run
would be its whole p90.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import psutil


@dataclass
class Timing:
    median_ms: float
    p90_ms: float
    min_ms: float
    repeats: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def time_call(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20, min_seconds: float = 0.0) -> Timing:
    """Median wall time of ``fn()``, after ``warmup`` calls; runs at least ``repeats`` times."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    gc_was = gc.isenabled()
    gc.disable()  # a collection inside a sub-millisecond run would be its whole p90
    try:
        while len(samples) < repeats or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    finally:
        if gc_was:
            gc.enable()
    samples.sort()
    n = len(samples)
    return Timing(
        median_ms=1e3 * samples[n // 2] if n % 2 else 1e3 * (samples[n // 2 - 1] + samples[n // 2]) / 2,
        p90_ms=1e3 * samples[min(n - 1, int(0.9 * n))],
        min_ms=1e3 * samples[0],
        repeats=n,
    )


def time_samples(fn: Callable[[], object], *, warmup: int, repeats: int) -> list[float]:
    """Wall times (ms) of ``repeats`` calls (at least one) after ``warmup``, the GC off."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_was:
            gc.enable()
    return samples


def sample_stats(samples: Sequence[float]) -> dict[str, float]:
    """Median, p90 (the same order statistic as ``time_call``), min and std of samples."""
    s = sorted(samples)
    n = len(s)
    return {
        "median": float(np.median(s)),
        "p90": s[min(n - 1, int(0.9 * n))],
        "min": s[0],
        "std": float(np.std(s, ddof=1)) if n > 1 else 0.0,
    }


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return psutil.Process(os.getpid()).memory_info().rss
