"""Request arrival processes and the request trace of a run.

``arrival_times(spec, duration_s, seed)`` draws one task's arrival times (``poisson``,
``bursty``, ``periodic``, ``trace``); ``make_trace(config)`` merges every task's into one
time-ordered list of ``TraceItem``. Both are deterministic for a seed, and each task has
its own streams (seeding: ``docs/app.md``): every policy of a comparison replays the same trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from loom.app.config import (
    ArrivalSpec,
    BurstyArrival,
    PeriodicArrival,
    PoissonArrival,
    SloConfig,
    TraceArrival,
    read_trace_file,
)
from loom.core.errors import ConfigError

Seed = int | np.random.SeedSequence | np.random.Generator


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _poisson_window(rng: np.random.Generator, rate: float, start: float, end: float) -> np.ndarray:
    # A homogeneous Poisson process on a window: a Poisson count, then that many uniform
    # times (the order statistics of a Poisson process given its count). One vectorized
    # draw instead of a loop over exponential gaps.
    n = rng.poisson(rate * (end - start))
    return rng.uniform(start, end, n)


def arrival_times(spec: ArrivalSpec, duration_s: float, seed: Seed) -> np.ndarray:
    """Sorted arrival times in seconds, in ``[0, duration_s)``, of one arrival process.

    ``seed``: an int, a ``SeedSequence`` or a ``Generator`` (used, not copied). The same
    seed gives the same times. A ``trace`` ignores the seed.
    """
    if not duration_s > 0:
        raise ConfigError(f"duration_s must be > 0, got {duration_s}")
    rng = _rng(seed)
    if isinstance(spec, PoissonArrival):
        times = _poisson_window(rng, spec.rate_rps, 0.0, duration_s)
    elif isinstance(spec, BurstyArrival):
        times = _bursty(rng, spec, duration_s)
    elif isinstance(spec, PeriodicArrival):
        times = _periodic(rng, spec, duration_s)
    elif isinstance(spec, TraceArrival):
        times = np.asarray(read_trace_file(spec.file), dtype=np.float64)
    else:  # pragma: no cover - the schema admits nothing else
        raise ConfigError(f"unknown arrival process {spec!r}")
    times = times[(times >= 0.0) & (times < duration_s)]
    return np.sort(times).astype(np.float64, copy=False)


def _bursty(rng: np.random.Generator, spec: BurstyArrival, duration_s: float) -> np.ndarray:
    """Calm and burst periods alternate from t = 0 (calm first); Poisson within each."""
    parts: list[np.ndarray] = []
    t, burst = 0.0, False
    while t < duration_s:
        mean = spec.burst_s if burst else spec.calm_s
        length = rng.exponential(mean) if spec.periods == "exponential" else mean
        end = min(t + length, duration_s)
        parts.append(_poisson_window(rng, spec.burst_rate_rps if burst else spec.rate_rps, t, end))
        t, burst = end, not burst
    return np.concatenate(parts) if parts else np.empty(0)


def _periodic(rng: np.random.Generator, spec: PeriodicArrival, duration_s: float) -> np.ndarray:
    period, jitter = spec.period_ms / 1e3, spec.jitter_ms / 1e3
    phase = rng.uniform(0.0, period)
    # Ticks up to duration + jitter: a late tick may be jittered back inside the run.
    n = int(np.floor((duration_s + jitter - phase) / period)) + 1
    ticks = phase + period * np.arange(max(n, 0), dtype=np.float64)
    if jitter > 0:
        ticks = ticks + rng.uniform(-jitter, jitter, ticks.size)
    return ticks


def mean_rate_rps(spec: ArrivalSpec, duration_s: float | None = None) -> float:
    """The long-run mean arrival rate of a process (a trace: its count over ``duration_s``)."""
    if isinstance(spec, PoissonArrival):
        return spec.rate_rps
    if isinstance(spec, BurstyArrival):
        return spec.mean_rate_rps
    if isinstance(spec, PeriodicArrival):
        return 1e3 / spec.period_ms
    if duration_s is None or duration_s <= 0:
        raise ConfigError("a trace's mean rate needs the run's duration_s (> 0)")
    times = np.asarray(read_trace_file(spec.file))
    return float(np.count_nonzero((times >= 0) & (times < duration_s)) / duration_s)


# -- the trace of a run ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceItem:
    """One request of a run: when it arrives, for which task, its number within the task,
    and which evaluation input it carries (an index into the task's evaluation set)."""

    t_s: float
    task: str
    index: int
    sample: int


def make_trace(
    config: SloConfig,
    n_samples: Mapping[str, int] | None = None,
    *,
    duration_s: float | None = None,
    rate_scale: float = 1.0,
) -> list[TraceItem]:
    """Every task's requests over the run, merged and sorted by arrival time.

    ``rate_scale`` thickens (> 1) or thins the trace: the arrivals of
    ``duration_s * rate_scale`` seconds, time compressed into ``duration_s`` (same seed,
    same order of tasks, so runs at several loads share their arrivals' pattern).

    ``n_samples``: the size of each task's evaluation set; each request draws its
    ``sample`` uniformly (with replacement) from ``range(n)``. A task not in it (or
    with 0) carries sample 0. ``duration_s``: default ``config.run.duration_s``. The
    trace covers the whole run, warm-up included.
    """
    if not rate_scale > 0:
        raise ConfigError(f"rate_scale must be > 0, got {rate_scale}")
    duration = (config.run.duration_s if duration_s is None else duration_s) * rate_scale
    n_samples = n_samples or {}
    unknown = sorted(set(n_samples) - set(config.task_names))
    if unknown:
        raise ConfigError(f"n_samples names unknown task(s) {unknown}; tasks are {config.task_names}")
    root = np.random.SeedSequence(config.run.seed)
    items: list[tuple[float, int, int, TraceItem]] = []
    for order, (task, child) in enumerate(zip(config.tasks, root.spawn(len(config.tasks)), strict=True)):
        arrivals_seq, samples_seq = child.spawn(2)
        times = arrival_times(task.arrival, duration, arrivals_seq)
        n = int(n_samples.get(task.name, 0))
        if n < 0:
            raise ConfigError(f"n_samples[{task.name!r}] must be >= 0, got {n}")
        samples = (
            np.random.default_rng(samples_seq).integers(0, n, times.size)
            if n > 0
            else np.zeros(times.size, dtype=np.int64)
        )
        for i, (t, s) in enumerate(zip(times.tolist(), samples.tolist(), strict=True)):
            # Ties in time (a trace may have them) break by task order, then index: stable.
            items.append((t, order, i, TraceItem(t_s=t / rate_scale, task=task.name, index=i, sample=int(s))))
    items.sort(key=lambda x: (x[0], x[1], x[2]))
    return [item for *_, item in items]
