"""From an SLO config to a running system: plan, serve, and compare policies on one trace.

The wiring of the parts, top down:

- ``Deployment.from_config``: the device profile, every task's partition, the
  estimators (a ``loom fit`` folder, or fitted now from the device's profile dataset
  and saved under ``out/estimates/<device>``), and each task's ``TaskSpace`` — the
  optimizer's view: predicted block latencies on every processor, hand-off costs,
  block sizes, and predicted accuracy of any config;
- ``Deployment.candidates``: a policy's plans for each task under its SLO at a time;
  static single-variant policies get their processor per task from the joint
  ``assign`` (so that two tasks do not pile onto one processor while another idles);
- ``Deployment.runtime``: a ``Runtime`` bound to those plans;
- ``run_trace``: an open-loop driver that submits the seeded trace at its arrival
  times (real inputs from each task's evaluation data), applies the SLO changes when
  they fall due, and collects one ``RequestRecord`` per request;
- ``serve`` and ``bench``: one policy, or every policy on the same trace, with a report
  (JSON + plots).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from loom.app.arrivals import make_trace, mean_rate_rps
from loom.app.config import POLICIES, SloConfig, load_slo_config
from loom.core.errors import ConfigError, LoomError
from loom.core.paths import REPO_ROOT
from loom.core.progress import say
from loom.model.blockstore import BlockStore
from loom.model.family import Family, load_family
from loom.model.partition import Partition
from loom.processors.device import DeviceProfile, load_device_profile
from loom.profiling.fitting import Estimates, dataset_digest, fit_estimates, partition_features
from loom.profiling.profile import ensure_partitions, load_profile_dataset
from loom.serving.correction import LatencyCorrector
from loom.serving.metrics import MetricsCollector, RequestRecord, RssSampler, summarize
from loom.serving.runtime import Runtime, TaskBinding
from loom.serving.scheduler import Scheduler
from placement.optimizer import assign, fluid_goodput_bound
from placement.plan import Plan, TaskSpace
from placement.policies import get_policy
from placement.queueing import latency_aware_mix


# -- the optimizer's view of a task ---------------------------------------------------------------
def task_space(estimates: Estimates, task: str) -> TaskSpace:
    """A task's choices with predicted numbers: block latency on every processor, hand-offs, accuracy."""
    te = estimates.task(task)
    part = te.partition
    feats = partition_features(part)
    names = list(part.variants)
    return TaskSpace(
        task=task,
        variants=names,
        k=part.k,
        processors=list(estimates.processors),
        blocks={(v, s): part.variants[v][s] for v in names for s in range(part.k)},
        # a pair the profiler could not run (an op the engine refuses) is left out: the
        # optimizer never places the block there
        block_ms={k: v for k, v in estimates.block_table(task).items() if te.can_run(*k)},
        out_bytes={b: float(f["act_out_bytes"]) for b, f in feats.items()},
        # what a loaded block holds is mostly its weights: the file's size
        memory_bytes={b: int(info.size_bytes) for b, info in part.blocks.items()},
        accuracy=lambda configs: te.predict_accuracy(configs),
        link_model=estimates.links,
        variant_accuracy={v: float(te.variants[v]["accuracy"]) for v in names},
    )


def load_or_fit_estimates(
    cfg: SloConfig, device: DeviceProfile, partitions: Sequence[Partition], *, refit: bool = False
) -> Estimates:
    """The config's estimators folder; else ``out/estimates/<device>`` when it covers every task; else fit now."""
    if cfg.estimators is not None and not refit:
        est = Estimates.load(cfg.estimators)
        missing = [p.task for p in partitions if p.task not in est.tasks]
        if missing:
            raise ConfigError(f"{cfg.source}: estimators: {cfg.estimators} has no estimates for tasks {missing}")
        return est
    folder = REPO_ROOT / "out" / "estimates" / device.name
    data_dir = REPO_ROOT / "profiles" / "data" / device.name
    if (folder / "estimates.json").is_file() and not refit:
        est = Estimates.load(folder)
        same = all(p.task in est.tasks and est.tasks[p.task].partition.root.resolve() == p.root.resolve()
                   and set(est.tasks[p.task].partition.blocks) == set(p.blocks) for p in partitions)
        # fitted on the dataset as it is now (a re-profile makes them stale)
        fresh = est.notes.get("latency", {}).get("dataset_sha256") == dataset_digest(data_dir)
        if same and fresh and est.device == device.name:
            return est
    say(f"fitting estimators for {device.name} from {data_dir} (once; saved to {folder})")
    data = load_profile_dataset(data_dir)
    est = fit_estimates(partitions, data, device, progress=say)
    est.save(folder)
    return est


@dataclass
class Deployment:
    """Everything a run needs that does not change between policies."""

    config: SloConfig
    device: DeviceProfile
    estimates: Estimates
    partitions: dict[str, Partition]
    families: dict[str, Family]
    spaces: dict[str, TaskSpace]
    #: every task's blocks, once each, checked against their sha256 on first load
    store: BlockStore | None = None
    _inputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _block_bytes: dict[tuple[str, str], int] | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: SloConfig | str | Path, *, refit: bool = False) -> Deployment:
        cfg = cfg if isinstance(cfg, SloConfig) else load_slo_config(cfg)
        device = load_device_profile(cfg.device)
        families = {t.name: load_family(t.family) for t in cfg.tasks}
        for name, fam in families.items():
            if fam.task != name:
                raise ConfigError(f"{cfg.source}: tasks[{cfg.task_names.index(name)}]: task {name!r} names "
                                  f"family {fam.path}, whose task is {fam.task!r}")
        parts = ensure_partitions(list(families.values()), cfg.partitions, k=cfg.k)
        est = load_or_fit_estimates(cfg, device, parts, refit=refit)
        spaces = {p.task: task_space(est, p.task) for p in parts}
        # beside the partitions; copies, not links: a store file edited or corrupted is
        # then caught on load without the partition's own file being touched
        store = BlockStore(Path(cfg.partitions).parent / "blockstore")
        for part in parts:
            store.add_partition(part, link=False)
        return cls(cfg, device, est, {p.task: p for p in parts}, families, spaces, store)

    # -- plans -------------------------------------------------------------------------------
    def rates(self) -> dict[str, float]:
        return {t.name: mean_rate_rps(t.arrival, self.config.run.duration_s) for t in self.config.tasks}

    def candidates(self, policy_name: str, *, t_s: float = 0.0) -> dict[str, list[Plan]]:
        """Each task's plans under ``policy_name`` for its SLO at ``t_s``, the runtime's first choice first."""
        policy = get_policy(policy_name)
        slos = {t.name: self.config.slo_at(t.name, t_s) for t in self.config.tasks}
        plans = {task: policy.candidates(self.spaces[task], latency_ms=lat, accuracy_floor=floor)
                 for task, (lat, floor) in slos.items()}
        if not policy.adaptive and not policy.partitioned and len(self.device.processors) > 1:
            # A static policy runs one plan per task; which processor each task gets is
            # chosen jointly, balancing load at the tasks' rates, not "the fastest for all".
            split = assign(self.spaces, slos, self.rates(), candidates=plans)
            for task in plans:
                if split.mixes.get(task):
                    first = split.mixes[task][0][0]
                    plans[task] = [first] + [p for p in plans[task] if p != first]
        return plans

    def mixes(self, plans: Mapping[str, list[Plan]], *, t_s: float = 0.0,
              corrector: LatencyCorrector | None = None, now_s: float | None = None,
              scheduler: Scheduler | None = None) -> dict[str, dict]:
        """The planned share of each candidate, per task, at the configured rates (``latency_aware_mix``).

        With a ``corrector``, block latencies are first scaled by what it has learned
        (a processor that slowed down gets less of the load; when it recovers its
        factor relaxes and the load comes back), and with the runtime's ``scheduler``
        each plan's latency also carries what requests on its processors took beyond
        their prediction (``Scheduler.residual_ms``).
        """
        bounds = {t.name: self.config.slo_at(t.name, t_s)[0] for t in self.config.tasks}
        if corrector is not None and corrector.enabled:
            view = corrector.view(now_s)
            plans = {task: [self._corrected(p, view, scheduler) for p in ps] for task, ps in plans.items()}
        return latency_aware_mix(plans, self.rates(), bounds)

    def _corrected(self, plan: Plan, view: Any, scheduler: Scheduler | None = None) -> Plan:
        block_ms = tuple(ms * view.multiplier(b, p) for b, p, ms in zip(plan.block_ids, plan.placement,
                                                                           plan.block_ms, strict=True))
        # capped at the plan's own latency: the residual also holds queueing under
        # overload, which the mix's queueing model counts already; uncapped, a loaded
        # processor looked so slow that every task left it at once (and came back)
        extra = min(scheduler.residual_ms(plan), plan.latency_ms) if scheduler is not None else 0.0
        return replace(plan, block_ms=block_ms,
                       latency_ms=plan.latency_ms - sum(plan.block_ms) + sum(block_ms) + extra)

    def block_bytes(self) -> dict[tuple[str, str], int]:
        """(block, processor) -> resident bytes the profile dataset measured (empty without one)."""
        if self._block_bytes is None:
            try:
                data = load_profile_dataset(self.dataset_dir())
            except LoomError:
                data = None
            self._block_bytes = {} if data is None else {
                (r["block_id"], r["processor"]): int(r["memory_bytes"])
                for r in data.blocks if r["status"] == "ok" and r.get("memory_bytes")}
        return self._block_bytes

    def dataset_dir(self) -> Path:
        """The profile dataset the estimators were fitted on (else the device's default one)."""
        given = self.estimates.notes.get("latency", {}).get("dataset")
        if given and Path(given).is_dir():
            return Path(given)
        return REPO_ROOT / "profiles" / "data" / self.device.name

    def block_paths(self, task: str) -> dict[str, Path]:
        part = self.partitions[task]
        return {b: part.block_path(b) for b in part.blocks}

    def bindings(self, policy_name: str) -> list[TaskBinding]:
        """Each task as a runtime (real or simulated) serves it under ``policy_name`` at time 0."""
        plans = self.candidates(policy_name)
        out = []
        for t in self.config.tasks:
            lat, floor = self.config.slo_at(t.name, 0.0)
            out.append(TaskBinding(task=t.name, candidates=plans[t.name], block_paths=self.block_paths(t.name),
                                   latency_ms=lat, accuracy_floor=floor, priority=t.priority,
                                   output_name=self.families[t.name].manifest.output.name))
        return out

    def corrector(self, correction: bool | None = None) -> LatencyCorrector:
        enabled = self.config.correction.enabled if correction is None else correction
        return LatencyCorrector(enabled=enabled, decay=self.config.correction.decay)

    def steer(self, scheduler: Scheduler, policy_name: str, bindings: Sequence[TaskBinding],
              mix: Mapping[str, dict] | None = None) -> dict[str, dict]:
        """Every adaptive policy is steered by the same joint assignment over its own candidates,
        so that a comparison isolates what each may choose. Returns the mix set (empty for fixed plans)."""
        if not get_policy(policy_name).adaptive:
            return {}
        mix = dict(mix) if mix is not None else self.mixes({b.task: b.candidates for b in bindings})
        for task, shares in mix.items():
            scheduler.set_mix(task, shares)
        return mix

    def runtime(self, policy_name: str, *, correction: bool | None = None,
                on_record: Callable[[RequestRecord], None] | None = None) -> Runtime:
        policy = get_policy(policy_name)
        bindings = self.bindings(policy_name)
        mix = self.mixes({b.task: b.candidates for b in bindings}) if policy.adaptive else {}
        rt = Runtime(device=self.device, tasks=bindings, policy_name=policy.name, adaptive=policy.adaptive,
                     on_unservable=self.config.on_unservable, correction=self.corrector(correction),
                     on_record=on_record, memory_budget_mb=self.config.memory_budget_mb,
                     block_store=self.store, block_bytes=self.block_bytes(), rates=self.rates(), mix=mix)
        self.steer(rt.scheduler, policy.name, bindings, mix)
        return rt

    def inputs(self, task: str) -> np.ndarray:
        if task not in self._inputs:
            self._inputs[task] = self.families[task].eval_data()[0]
        return self._inputs[task]


class ControlledRuntime(Protocol):
    """What ``control_events`` drives: the real ``Runtime`` and the simulator's both have it."""

    scheduler: Scheduler
    corrector: LatencyCorrector

    @property
    def tasks(self) -> dict[str, TaskBinding]: ...

    def now(self) -> float: ...

    def set_slo(self, task: str, *, latency_ms: float | None = None, accuracy_floor: float | None = None) -> None: ...

    def set_candidates(self, task: str, plans: Sequence[Plan]) -> None: ...


def control_events(
    dep: Deployment, policy_name: str, rt: ControlledRuntime, *, duration_s: float, correction: bool | None,
    replan_s: float, clock: Callable[[], float],
) -> list[tuple[float, Callable[[], None]]]:
    """The actions a run takes at given trace seconds: SLO changes, and re-planning the mix.

    Shared by ``run_trace`` and the simulator (``loom.app.simulate``), so that both run the
    same control code; ``clock`` gives the trace's time when an action runs.
    """
    cfg = dep.config
    policy = get_policy(policy_name)
    # SLO changes fall due during the run: the runtime's bound and floor change, and the
    # candidates are recomputed for the new SLO (the policy's choice depends on it).
    changes: list[tuple[float, Callable[[], None]]] = []
    for t in cfg.tasks:
        for ch in t.slo_changes:
            def apply(task: str = t.name, at: float = ch.at_s) -> None:
                lat, floor = cfg.slo_at(task, at)
                rt.set_slo(task, latency_ms=lat, accuracy_floor=floor)
                plans = dep.candidates(policy.name, t_s=at)
                rt.set_candidates(task, plans[task])
                if policy.adaptive:
                    rt.scheduler.set_mix(task, dep.mixes(plans, t_s=at)[task])
            changes.append((ch.at_s, apply))
    if policy.adaptive and (correction if correction is not None else cfg.correction.enabled):
        # re-solve the joint assignment with the corrected latencies every replan_s, so
        # that load moves off a processor that slows down (and back when it recovers)
        current: dict[str, dict] = dep.mixes({t: rt.tasks[t].candidates for t in cfg.task_names})

        def replan() -> None:
            plans = {t: rt.tasks[t].candidates for t in cfg.task_names}
            fresh = dep.mixes(plans, t_s=clock(), corrector=rt.corrector, now_s=rt.now(), scheduler=rt.scheduler)
            for task, shares in fresh.items():
                # move half way each time: the measurements that drive a re-plan change
                # with the plan itself, and a full jump makes the load swing back and forth
                old = current.get(task, {})
                keys = set(old) | set(shares)
                blended = {k: 0.5 * old.get(k, 0.0) + 0.5 * shares.get(k, 0.0) for k in keys}
                current[task] = {k: v for k, v in blended.items() if v > 0.01}
                rt.scheduler.set_mix(task, current[task])
        changes += [(float(t), replan) for t in np.arange(replan_s, duration_s, replan_s)]
    return changes


# -- running a trace ------------------------------------------------------------------------------
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
    events: Sequence[tuple[float, Callable[[], None]]] = (),
    replan_s: float = 1.0,
    progress: bool = True,
) -> RunResult:
    """Serve the config's seeded trace with one policy, open loop, and measure it.

    ``rate_scale`` thins or thickens the trace (same seed, same order of tasks);
    ``events``: extra actions at given seconds (a competing process starting, ...).
    """
    cfg = dep.config
    duration = cfg.run.duration_s if duration_s is None else duration_s
    n_samples = {t: len(dep.inputs(t)) for t in cfg.task_names}
    trace = make_trace(cfg, n_samples, duration_s=duration, rate_scale=rate_scale)
    collector = MetricsCollector()
    policy = get_policy(policy_name)
    rt = dep.runtime(policy_name, correction=correction, on_record=collector.record)
    changes = control_events(dep, policy.name, rt, duration_s=duration, correction=correction, replan_s=replan_s,
                             clock=lambda: time.perf_counter() - start)
    timeline = sorted([*changes, *events], key=lambda e: e[0])
    futures: list[Future] = []
    errors: dict[str, int] = {}
    label = f"serve {policy.name}"
    start = time.perf_counter()
    rt_offset = rt.now()  # the runtime's clock started when it was built (after preloading)
    with RssSampler() as rss:
        next_report = 0.0
        ei = 0
        for it in trace:
            while ei < len(timeline) and timeline[ei][0] <= it.t_s:
                timeline[ei][1]()
                ei += 1
            delay = it.t_s - (time.perf_counter() - start)
            if delay > 0:
                time.sleep(delay)
            x = dep.inputs(it.task)
            futures.append(rt.submit(it.task, {dep.families[it.task].manifest.input.name: x[it.sample: it.sample + 1]}))
            if progress and it.t_s >= next_report:
                say(f"{label}: {it.t_s:5.1f}/{duration:.0f} s, {len(futures)} requests, {rt.stats()['in_flight']} in flight")
                next_report += max(1.0, duration / 10)
        for _, fn in timeline[ei:]:
            fn()
        rt.close()
        for f in futures:
            exc = f.exception()
            if exc is not None:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
    wall = time.perf_counter() - start
    records = sorted(collector.records, key=lambda r: r.id)
    # arrival times are on the runtime's clock; shift them onto the trace's
    for r in records:
        r.arrival_s -= rt_offset
        if r.start_s is not None:
            r.start_s -= rt_offset
        if r.end_s is not None:
            r.end_s -= rt_offset
        r.spans = [(p, b, s - rt_offset, e - rt_offset) for p, b, s, e in r.spans]
    summary = summarize(records, duration, warmup_s=min(cfg.run.warmup_s, duration / 2))
    return RunResult(policy.name, records, summary, rss.peak_mb, list(rss.series), wall, errors)


def _row(run: RunResult) -> dict[str, Any]:
    o = run.summary["overall"]
    return {"policy": run.policy, "slo_violation_rate": o["slo_violation_rate"], "goodput_rps": o["goodput_rps"],
            "throughput_rps": o["throughput_rps"], "p50_ms": o["p50_ms"], "p95_ms": o["p95_ms"], "p99_ms": o["p99_ms"],
            "peak_rss_mb": run.peak_rss_mb, "n": o["n"], "utilization": run.summary["utilization"],
            "errors": run.errors}


def write_run(run: RunResult, out_dir: Path) -> dict[str, Any]:
    from loom.serving.metrics import plot_timeline, write_jsonl

    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(run.records, out_dir / f"trace-{run.policy}.jsonl")
    plot_timeline(run.records, out_dir / f"timeline-{run.policy}.png")
    return _row(run)


def format_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    def f(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    lines = [f"{'policy':<11} {'violations':>10} {'goodput/s':>9} {'thru/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'RSS MB':>7}"]
    for r in rows:
        lines.append(f"{r['policy']:<11} {f(r['slo_violation_rate'], '>10.1%')} {f(r['goodput_rps'], '>9.1f')} "
                     f"{f(r['throughput_rps'], '>8.1f')} {f(r['p50_ms'], '>7.2f')} {f(r['p99_ms'], '>7.2f')} "
                     f"{f(r['peak_rss_mb'], '>7.0f')}")
    return "\n".join(lines)


def serve(config: str | Path, *, out_dir: str | Path = "out/serve", policy: str | None = None,
          duration_s: float | None = None) -> dict[str, Any]:
    """Run the config (its policy, or ``policy``) for its duration; write the trace, plots and a report."""
    dep = Deployment.from_config(config)
    name = policy or dep.config.policy
    run = run_trace(dep, name, duration_s=duration_s)
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

    ``simulate``: run ``loom.app.simulate`` instead of the real runtime, on this device
    (latencies from its profile dataset) or on ``device``, a profile that need not be
    here (latencies from its datasheet figures). ``load``: scale the config's rates to
    this multiple of the best static plan's capacity (its fluid bound) on that device.
    """
    from loom.serving.metrics import plot_latency_cdf, plot_violations_by_policy

    dep = Deployment.from_config(config)
    out = Path(out_dir)
    rows, by_policy = [], {}
    source = "real runtime"
    if simulate or device is not None:
        from loom.app import simulate as sim_mod

        target = load_device_profile(device) if device is not None else dep.device
        if target.name != dep.device.name:
            dep, latency = sim_mod.on_device(dep, target)
        else:
            latency = sim_mod.LatencyModel.from_dataset(load_profile_dataset(dep.dataset_dir()))
        source = f"SIMULATED on {dep.device.name}: {latency.source}; nothing ran on its processors"
        say(source)
    if load is not None:
        mix = dep.rates()
        capacity, who = static_capacity(dep, mix)
        if not math.isfinite(capacity) or capacity <= 0:
            raise ConfigError(f"{dep.config.source}: no static plan meets the SLOs on {dep.device.name}: "
                              "no capacity to scale the load to")
        dep.config = scenario(dep.config, total_rps=load * capacity, mix=mix, bound_scale=1.0,
                              duration_s=dep.config.run.duration_s if duration_s is None else duration_s,
                              seed=dep.config.run.seed, keep_slo_changes=True)
        say(f"load {load}x the capacity of the best static plan ({who}, {capacity:.0f} requests/s by the fluid bound)")
    for name in policies:
        if source == "real runtime":
            run = run_trace(dep, name, duration_s=duration_s)
            rows.append(write_run(run, out))
            by_policy[run.policy] = run.records
        else:
            res = sim_mod.simulate(dep, name, latency, duration_s=duration_s)
            o = res.summary["overall"]
            rows.append({"policy": res.policy, "slo_violation_rate": o["slo_violation_rate"],
                         "goodput_rps": o["goodput_rps"], "throughput_rps": o["throughput_rps"],
                         "p50_ms": o["p50_ms"], "p95_ms": o["p95_ms"], "p99_ms": o["p99_ms"],
                         "peak_rss_mb": None, "n": o["n"], "utilization": res.summary["utilization"],
                         "simulated": True})
            by_policy[res.policy] = res.records
    plot_violations_by_policy(rows, out / "violations.png")
    plot_latency_cdf(by_policy, out / "latency_cdf.png")
    report = {"config": str(dep.config.source), "device": dep.device.name, "runs": rows,
              "simulated": source != "real runtime", "source": source}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


# -- capacities and scenarios (the benchmarks' knobs) -----------------------------------------------
STATIC_POLICIES = ("sv-ao-np", "sv-ao-p", "sv-lo-np", "sv-lo-p")


def slos_of(cfg: SloConfig) -> dict[str, tuple[float, float]]:
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

