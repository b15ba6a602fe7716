"""The trace runner: one policy serves an SLO config's seeded trace, open loop, with real inference.

``run_trace`` submits each request at its arrival time (a real input from the task's
evaluation data), applies the run's control events when they fall due, and returns a
``RunResult``: one ``RequestRecord`` per request on the trace's clock, their summary,
peak RSS and errors. ``write_run`` writes a run's trace and timeline plot.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loom.app.arrivals import TraceItem, make_trace
from loom.app.control import control_events
from loom.app.deployment import Deployment
from loom.core.progress import say
from loom.serving.metrics import MetricsCollector, RequestRecord, RssSampler, summarize
from loom.serving.overhead import OverheadMeter
from loom.serving.runtime import Runtime
from placement.policies import get_policy

if TYPE_CHECKING:
    from backends.base import Backend

Timeline = Sequence[tuple[float, Callable[[], None]]]


@dataclass
class RunResult:
    policy: str
    records: list[RequestRecord]
    summary: dict[str, Any]
    peak_rss_mb: float
    rss_series: list[tuple[float, float]]
    wall_s: float
    #: requests whose future ended in an exception (rejected, backend errors), by type
    errors: dict[str, int]


def run_trace(
    dep: Deployment,
    policy_name: str,
    *,
    duration_s: float | None = None,
    correction: bool | None = None,
    rate_scale: float = 1.0,
    events: Timeline = (),
    replan_s: float = 1.0,
    progress: bool = True,
    backends: Mapping[str, Backend] | None = None,
    meter: OverheadMeter | None = None,
) -> RunResult:
    """Serve the config's seeded trace with one policy, open loop, and measure it.

    ``rate_scale`` thins or thickens the trace (same seed, same order of tasks);
    ``events``: extra actions at given seconds (a competing process starting, ...);
    ``backends`` and ``meter``: as ``Deployment.runtime`` takes them.
    """
    duration, trace = trace_of(dep, duration_s, rate_scale)
    collector = MetricsCollector()
    policy = get_policy(policy_name)
    rt = dep.runtime(policy_name, correction=correction, on_record=collector.record, backends=backends, meter=meter)
    changes = control_events(dep, policy.name, rt, duration_s=duration, correction=correction, replan_s=replan_s,
                             clock=lambda: time.perf_counter() - start)
    timeline = sorted([*changes, *events], key=lambda e: e[0])
    start = time.perf_counter()  # the trace's time 0; the control events read their clock from it
    return replay(dep, rt, trace, timeline, name=policy.name, start=start, duration_s=duration,
                  collector=collector, progress=progress)


def trace_of(dep: Deployment, duration_s: float | None, rate_scale: float) -> tuple[float, list[TraceItem]]:
    """The run's duration and the config's seeded trace for it (the same for every policy and peer)."""
    cfg = dep.config
    duration = cfg.run.duration_s if duration_s is None else duration_s
    n_samples = {t: dep.sample_count(t) for t in cfg.task_names}
    return duration, make_trace(cfg, n_samples, duration_s=duration, rate_scale=rate_scale)


def replay(dep: Deployment, server: Any, trace: Sequence[TraceItem], timeline: Timeline, *, name: str,
           start: float, duration_s: float, collector: MetricsCollector, progress: bool) -> RunResult:
    """Replay ``trace`` and ``timeline`` on ``server`` (a ``Runtime`` or a peer) from ``start``, close it,
    and summarize what ``collector`` recorded, on the trace's clock."""
    offset = server.now()  # the server's clock started when it was built (after preloading)
    with RssSampler() as rss:
        futures = _replay(dep, server, trace, timeline, start=start, duration_s=duration_s,
                          label=f"serve {name}" if progress else None)
        server.close()
        errors = _errors(futures)
    wall = time.perf_counter() - start
    records = _on_trace_clock(sorted(collector.records, key=lambda r: r.id), offset)
    summary = summarize(records, duration_s, warmup_s=min(dep.config.run.warmup_s, duration_s / 2))
    return RunResult(name, records, summary, rss.peak_mb, list(rss.series), wall, errors)


def _replay(dep: Deployment, rt: Runtime, trace: Sequence[TraceItem], timeline: Timeline, *, start: float,
            duration_s: float, label: str | None) -> list[Future]:
    """Submit every request at its arrival time (``start``: the trace's 0 on ``perf_counter``), running
    the timeline's actions as they fall due and the rest after the last arrival; ``label``: report progress."""
    futures: list[Future] = []
    next_report = 0.0
    ei = 0
    for it in trace:
        while ei < len(timeline) and timeline[ei][0] <= it.t_s:
            timeline[ei][1]()
            ei += 1
        delay = it.t_s - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        futures.append(rt.submit(it.task, dep.request_inputs(it.task, it.sample)))
        if label is not None and it.t_s >= next_report:
            say(f"{label}: {it.t_s:5.1f}/{duration_s:.0f} s, {len(futures)} requests, {rt.stats()['in_flight']} in flight")
            next_report += max(1.0, duration_s / 10)
    for _, fn in timeline[ei:]:
        fn()
    return futures


def _errors(futures: Sequence[Future]) -> dict[str, int]:
    """How many requests ended in each type of exception."""
    errors: dict[str, int] = {}
    for f in futures:
        exc = f.exception()
        if exc is not None:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
    return errors


def _on_trace_clock(records: list[RequestRecord], offset: float) -> list[RequestRecord]:
    """Records' times are on the runtime's clock: shift them (in place) onto the trace's."""
    for r in records:
        r.arrival_s -= offset
        if r.start_s is not None:
            r.start_s -= offset
        if r.end_s is not None:
            r.end_s -= offset
        r.spans = [(p, b, s - offset, e - offset) for p, b, s, e in r.spans]
    return records


def summary_row(policy: str, summary: dict[str, Any], peak_rss_mb: float | None) -> dict[str, Any]:
    """A run's line in a report: its policy, the overall figures of its summary, peak RSS and utilization."""
    o = summary["overall"]
    return {"policy": policy, "slo_violation_rate": o["slo_violation_rate"], "goodput_rps": o["goodput_rps"],
            "throughput_rps": o["throughput_rps"], "p50_ms": o["p50_ms"], "p95_ms": o["p95_ms"], "p99_ms": o["p99_ms"],
            "peak_rss_mb": peak_rss_mb, "n": o["n"], "utilization": summary["utilization"]}


def write_run(run: RunResult, out_dir: Path) -> dict[str, Any]:
    """Write the run's trace (JSON lines) and timeline plot under ``out_dir``; return its report row."""
    from loom.serving.metrics import write_jsonl
    from loom.serving.plots import plot_timeline

    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(run.records, out_dir / f"trace-{run.policy}.jsonl")
    plot_timeline(run.records, out_dir / f"timeline-{run.policy}.png")
    return {**summary_row(run.policy, run.summary, run.peak_rss_mb), "errors": run.errors}
