"""``loom plan``, ``loom serve`` and ``loom bench`` as functions: a deployment run, with a report.

``describe_plans``: each task's candidate plans and predicted figures; ``serve``: one
policy on the config's trace; ``bench``: every policy on the same seeded trace, real
or simulated (``loom.app.simulate``), optionally at a multiple of the best static
plan's capacity. Each writes a JSON report and plots.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loom.app.config import POLICIES
from loom.app.deployment import Deployment
from loom.app.peers import PEERS, is_peer, run_peer
from loom.app.run import run_trace, summary_row, write_run
from loom.app.scenario import scenario, static_capacity
from loom.app.sim_latency import LatencyModel, on_device
from loom.app.simulate import simulate
from loom.core.errors import ConfigError
from loom.core.progress import say
from loom.processors.device import load_device_profile
from loom.profiling.dataset import load_profile_dataset
from loom.serving.metrics import RequestRecord
from placement.assignment import assign
from placement.policies import get_policy


def format_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """Report rows as a table: violations, goodput, throughput, p50, p99 and peak RSS per policy."""
    def f(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    w = max([11, *(len(str(r["policy"])) for r in rows)])
    lines = [f"{'policy':<{w}} {'violations':>10} {'goodput/s':>9} {'thru/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'RSS MB':>7}"]
    for r in rows:
        lines.append(f"{r['policy']:<{w}} {f(r['slo_violation_rate'], '>10.1%')} {f(r['goodput_rps'], '>9.1f')} "
                     f"{f(r['throughput_rps'], '>8.1f')} {f(r['p50_ms'], '>7.2f')} {f(r['p99_ms'], '>7.2f')} "
                     f"{f(r['peak_rss_mb'], '>7.0f')}")
    return "\n".join(lines)


def serve(config: str | Path, *, out_dir: str | Path = "out/serve", policy: str | None = None,
          duration_s: float | None = None) -> dict[str, Any]:
    """Run the config (its policy, or ``policy``: also a peer) for its duration; write the trace, plots and a report."""
    dep = Deployment.from_config(config)
    name = policy or dep.config.policy
    run = (run_peer if is_peer(name) else run_trace)(dep, name, duration_s=duration_s)
    out = Path(out_dir)
    row = write_run(run, out)
    report = {"config": str(dep.config.source), "device": dep.device.name, "policy": run.policy,
              "summary": run.summary, "result": row, "simulated": False}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def bench(config: str | Path, *, out_dir: str | Path = "out/bench", policies: Sequence[str] = POLICIES,
          duration_s: float | None = None, simulate: bool = False, device: str | None = None,
          load: float | None = None) -> dict[str, Any]:
    """Every policy on the same seeded trace, one after another in this process.

    ``policies`` may also name peers (``loom.app.peers.PEERS``: plain onnxruntime, OpenVINO
    THROUGHPUT), run on the same trace with real inference; a simulated bench skips them.
    ``simulate``: run ``loom.app.simulate`` instead of the real runtime, on this device
    (latencies from its profile dataset) or on ``device``, a profile that need not be
    here (latencies from its datasheet figures). ``load``: scale the config's rates to
    this multiple of the best static plan's capacity (its fluid bound) on that device.
    """
    from loom.serving.plots import plot_latency_cdf, plot_violations_by_policy

    _check_names(policies)
    dep = Deployment.from_config(config)
    out = Path(out_dir)
    latency: LatencyModel | None = None
    source = "real runtime"
    if simulate or device is not None:
        dep, latency = _simulated(dep, device)
        source = f"SIMULATED on {dep.device.name}: {latency.source}; nothing ran on its processors"
        say(source)
    if load is not None:
        _scale_to_load(dep, load, duration_s)
    rows, by_policy = [], {}
    for name in policies:
        if is_peer(name) and latency is not None:
            say(f"{name}: a peer (a plain engine outside the runtime) cannot be simulated: skipped")
            continue
        row, records = _bench_cell(dep, name, out, latency, duration_s)
        rows.append(row)
        by_policy[row["policy"]] = records
    if rows:
        plot_violations_by_policy(rows, out / "violations.png")
        plot_latency_cdf(by_policy, out / "latency_cdf.png")
    report = {"config": str(dep.config.source), "device": dep.device.name, "runs": rows,
              "simulated": latency is not None, "source": source}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def _check_names(policies: Sequence[str]) -> None:
    """Every name a policy of the runtime or a peer, else one ``ConfigError`` naming both lists."""
    for name in policies:
        if is_peer(name):
            continue
        try:
            get_policy(name)
        except ConfigError:
            raise ConfigError(f"unknown policy or peer {name!r}; policies: {', '.join(POLICIES)}; "
                              f"peers: {', '.join(PEERS)}") from None


def _simulated(dep: Deployment, device: str | None) -> tuple[Deployment, LatencyModel]:
    """The deployment to simulate and its latencies: this device's profile dataset, or
    ``device``'s datasheet figures (``on_device``) when it names another device."""
    target = load_device_profile(device) if device is not None else dep.device
    if target.name != dep.device.name:
        return on_device(dep, target)
    return dep, LatencyModel.from_dataset(load_profile_dataset(dep.dataset_dir()))


def _scale_to_load(dep: Deployment, load: float, duration_s: float | None) -> None:
    """Replace ``dep``'s config by one whose rates total ``load`` x the best static plan's capacity."""
    mix = dep.rates()
    capacity, who = static_capacity(dep, mix)
    if not math.isfinite(capacity) or capacity <= 0:
        raise ConfigError(f"{dep.config.source}: no static plan meets the SLOs on {dep.device.name}: "
                          "no capacity to scale the load to")
    dep.config = scenario(dep.config, total_rps=load * capacity, mix=mix, bound_scale=1.0,
                          duration_s=dep.config.run.duration_s if duration_s is None else duration_s,
                          seed=dep.config.run.seed, keep_slo_changes=True)
    say(f"load {load}x the capacity of the best static plan ({who}, {capacity:.0f} requests/s by the fluid bound)")


def _bench_cell(dep: Deployment, policy: str, out: Path, latency: LatencyModel | None,
                duration_s: float | None) -> tuple[dict[str, Any], list[RequestRecord]]:
    """One policy's run, real (``latency`` None: its trace and timeline written under ``out``) or
    simulated: its report row and records."""
    if latency is None:
        run = (run_peer if is_peer(policy) else run_trace)(dep, policy, duration_s=duration_s)
        return write_run(run, out), run.records
    res = simulate(dep, policy, latency, duration_s=duration_s)
    return {**summary_row(res.policy, res.summary, None), "simulated": True}, res.records


def describe_plans(config: str | Path, *, policy: str | None = None, limit: int = 8) -> dict[str, Any]:
    """``loom plan``: each task's candidate plans under the policy with their predicted figures."""
    dep = Deployment.from_config(config)
    name = policy or dep.config.policy
    plans = dep.candidates(name)
    slos = {t.name: dep.config.slo_at(t.name, 0.0) for t in dep.config.tasks}
    split = assign(dep.spaces, slos, dep.rates(), candidates=plans)
    out: dict[str, Any] = {"policy": name, "device": dep.device.name, "tasks": {},
                           "predicted_utilization": split.utilization}
    for task, cands in plans.items():
        shares = dict(((p.config, p.placement), s) for p, s in split.mixes.get(task, ()))
        out["tasks"][task] = {
            "latency_ms": slos[task][0], "accuracy_floor": slos[task][1], "n_candidates": len(cands),
            "plans": [{"config": list(p.config), "placement": list(p.placement), "latency_ms": p.latency_ms,
                       "accuracy": p.accuracy, "memory_mb": p.memory_bytes / 2**20,
                       "share": shares.get((p.config, p.placement), 0.0)} for p in cands[:limit]],
        }
    return out
