"""A discrete-event simulator that runs the real scheduling code against latency tables.

``simulate`` is ``run_trace``'s run, simulated: the same seeded trace, the same plans,
mix and control events (``Deployment``, ``control_events``), served by a ``SimRuntime``
whose block times come from a ``LatencyModel``. Nothing is inferred. Results say that
they are simulated and where their latencies came from. Design notes: ``docs/app.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loom.app.arrivals import TraceItem
from loom.app.control import control_events
from loom.app.deployment import Deployment
from loom.app.run import trace_of
from loom.app.sim_latency import LatencyModel
from loom.app.sim_overhead import HostOverhead
from loom.app.sim_runtime import SimRuntime, Slowdown
from loom.serving.metrics import RequestRecord, summarize
from placement.policies import get_policy


@dataclass
class SimResult:
    policy: str
    records: list[RequestRecord]
    summary: dict[str, Any]
    #: seconds the simulation itself took (wall clock)
    wall_s: float
    requests: int
    latency_source: str
    peak_resident_mb: float | None = None
    resident_series: list[tuple[float, int]] = field(default_factory=list)
    simulated: bool = True

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else math.inf


def simulate(
    dep: Deployment,
    policy_name: str,
    latency: LatencyModel,
    *,
    duration_s: float | None = None,
    rate_scale: float = 1.0,
    correction: bool | None = None,
    slowdowns: Sequence[Slowdown] = (),
    replan_s: float = 1.0,
    seed: int | None = None,
    trace: Sequence[TraceItem] | None = None,
    overhead: HostOverhead | None = None,
) -> SimResult:
    """``run_trace``'s run, simulated: the config's seeded trace under one policy.

    Same trace as the real run for the same config, seed, duration and ``rate_scale``.
    ``seed`` seeds the latency draws (default: the config's run seed).
    """
    cfg = dep.config
    if trace is None:
        duration, trace = trace_of(dep, duration_s, rate_scale)  # the trace run_trace replays
    else:
        duration = cfg.run.duration_s if duration_s is None else duration_s
    policy = get_policy(policy_name)
    bindings = dep.bindings(policy.name)
    mix = dep.mixes({b.task: b.candidates for b in bindings}) if policy.adaptive else {}
    sim = SimRuntime(
        tasks=bindings, processors=list(dep.device.processor_names), latency=latency, policy_name=policy.name,
        adaptive=policy.adaptive, on_unservable=cfg.on_unservable, correction=dep.corrector(correction),
        memory_budget_mb=cfg.memory_budget_mb, slowdowns=slowdowns,
        seed=cfg.run.seed if seed is None else seed, rates=dep.rates(), mix=mix, overhead=overhead,
    )
    dep.steer(sim.scheduler, policy.name, bindings, mix)
    timeline = control_events(dep, policy.name, sim, duration_s=duration, correction=correction,
                              replan_s=replan_s, clock=sim.now)
    t0 = time.perf_counter()
    sim.run(trace, sorted(timeline, key=lambda e: e[0]))
    wall = time.perf_counter() - t0
    records = sorted(sim.records, key=lambda r: r.id)
    summary = summarize(records, duration, warmup_s=min(cfg.run.warmup_s, duration / 2))
    peak = sim.peak_resident_bytes / 2**20 if sim.preloader is not None else None
    return SimResult(policy.name, records, summary, wall, len(trace), latency.source, peak, sim.resident_series)
