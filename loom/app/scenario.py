"""Load scenarios, the benchmarks' knobs: the best static plan's capacity, and configs scaled to a load.

``static_capacity`` is the largest total rate the best single-variant policy sustains
(its fluid bound); ``scenario`` is a config at a given total Poisson rate and SLO scale;
``with_bursts`` and ``with_slo_tightened`` turn such a config into a bursty one (same mean
rates) or one whose bounds tighten mid-run; ``measured_bound`` is the processors' closed-loop saturation throughput for a policy's
planned mix, measured on the real runtime.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

from loom.app.arrivals import make_trace, mean_rate_rps
from loom.app.config import BurstyArrival, SloChange, SloConfig
from loom.app.deployment import Deployment
from loom.core.errors import ConfigError
from loom.serving.metrics import MetricsCollector, utilization
from placement.assignment import fluid_goodput_bound
from placement.policies import get_policy

STATIC_POLICIES = ("sv-ao-np", "sv-ao-p", "sv-lo-np", "sv-lo-p")


def slos_of(cfg: SloConfig) -> dict[str, tuple[float, float]]:
    """Each task's (latency bound ms, accuracy floor) as configured at the start."""
    return {t.name: (t.latency_ms, t.accuracy_floor) for t in cfg.tasks}


def static_capacity(dep: Deployment, mix: Mapping[str, float]) -> tuple[float, str]:
    """Largest sustainable total rate of the best single-variant policy (fluid bound of its one plan per task)."""
    best, who = 0.0, ""
    for name in STATIC_POLICIES:
        cands = dep.candidates(name)
        bound = fluid_goodput_bound(dep.spaces, slos_of(dep.config), rate_mix=dict(mix),
                                    candidates={t: c[:1] if get_policy(name).partitioned else c for t, c in cands.items()})
        if math.isfinite(bound) and bound > best:
            best, who = bound, name
    return best, who


def scenario(base: SloConfig, *, total_rps: float, mix: Mapping[str, float], bound_scale: float,
             duration_s: float, seed: int, keep_slo_changes: bool = False) -> SloConfig:
    """``base`` at a total Poisson rate split as ``mix``, bounds scaled, for ``duration_s`` seconds."""
    cfg = copy.deepcopy(base)
    total_mix = sum(mix.values())
    for t in cfg.tasks:
        t.latency_ms = t.latency_ms * bound_scale
        if not keep_slo_changes:
            t.slo_changes = []
        if t.arrival.process == "poisson":
            t.arrival = type(t.arrival).model_validate({"process": "poisson", "rate_rps": total_rps * mix[t.name] / total_mix})
    cfg.run.warmup_s = min(cfg.run.warmup_s, duration_s / 4)  # first: validated against the duration
    cfg.run.duration_s = duration_s
    cfg.run.seed = seed
    return cfg


def with_bursts(base: SloConfig, *, factor: float, burst_s: float, calm_s: float) -> SloConfig:
    """``base`` with every task's arrivals bursty (``BurstyArrival``, fixed periods) at the same mean rate.

    During a burst a task's rate is ``factor`` x its calm rate; with fixed periods every
    task's bursts fall together (calm first, from t = 0), so the total load bursts too.
    """
    cfg = copy.deepcopy(base)
    for t in cfg.tasks:
        mean = mean_rate_rps(t.arrival, cfg.run.duration_s)
        calm = mean * (burst_s + calm_s) / (calm_s + factor * burst_s)
        t.arrival = BurstyArrival.model_validate({"process": "bursty", "rate_rps": calm, "burst_rate_rps": factor * calm,
                                                  "burst_s": burst_s, "calm_s": calm_s, "periods": "fixed"})
    return cfg


def with_slo_tightened(base: SloConfig, *, at_s: float, scale: float) -> SloConfig:
    """``base`` with one SLO change per task: from ``at_s`` on, its latency bound is ``scale`` x its first one.

    The config's own SLO changes are replaced.
    """
    cfg = copy.deepcopy(base)
    for t in cfg.tasks:
        t.slo_changes = [SloChange(at_s=at_s, latency_ms=t.latency_ms * scale)]
    return cfg


#: the latency bound of every request of a saturation run: no request is ever late, none shed
_NO_BOUND_MS = 1e6


def measured_bound(dep: Deployment, policy: str = "sparseloom", *, seconds: float = 3.0, warmup_s: float = 0.5,
                   clients_per_task: int = 2) -> dict[str, Any]:
    """MEASURED closed-loop saturation throughput of the processors for ``policy``'s planned mix.

    A ``Runtime`` bound to the policy's plans and planned mix (at the config's SLOs and
    rates, as ``run_trace`` builds it) serves ``clients_per_task`` x tasks client threads,
    each submitting its next request as soon as its previous one ends (closed loop), with
    no latency bound (a request is never late, never shed: every processor is kept busy,
    the scheduler follows the planned mix). The clients take their requests in turn from
    the config's seeded trace, so the tasks come in the config's rate mix, with its
    inputs. Returns completed requests per second over ``seconds`` after ``warmup_s``
    (``rps``), per task, the processors' utilization, and ``measured: True``. The figure
    includes the Python runtime's own cost on the host's cores (it is this runtime's
    bound, measured, not the fluid bound).
    """
    cfg = dep.config
    trace = make_trace(cfg, {t: dep.sample_count(t) for t in cfg.task_names}, duration_s=max(cfg.run.duration_s, 5.0))
    if not trace:
        raise ConfigError(f"{cfg.source}: the trace has no request: no mix to saturate the processors with")
    collector = MetricsCollector()
    rt = dep.runtime(policy, on_record=collector.record)
    turn = itertools.count()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            it = trace[next(turn) % len(trace)]
            fut = rt.submit(it.task, dep.request_inputs(it.task, it.sample), deadline_ms=_NO_BOUND_MS)
            with contextlib.suppress(Exception):  # a failed request is simply not counted
                fut.result()

    threads = [threading.Thread(target=client, name=f"saturate-{i}", daemon=True)
               for i in range(clients_per_task * len(cfg.tasks))]
    t0 = rt.now()
    for th in threads:
        th.start()
    time.sleep(warmup_s + seconds)
    stop.set()
    for th in threads:
        th.join()
    rt.close()
    lo, hi = t0 + warmup_s, t0 + warmup_s + seconds
    done = [r for r in collector.records if r.completed and r.end_s is not None and lo <= r.end_s < hi]
    return {"rps": len(done) / seconds, "measured": True, "policy": policy, "seconds": seconds,
            "clients": len(threads),
            "by_task_rps": {t: sum(r.task == t for r in done) / seconds for t in cfg.task_names},
            "utilization": utilization(collector.records, lo, hi)}
