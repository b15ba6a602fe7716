"""A deployment: everything a run of an SLO config needs that does not change between policies.

``Deployment.from_config`` wires the device profile, each task's partition, the
estimators (loaded, or fitted once and saved) and each task's ``TaskSpace``; its methods
give a policy's candidate plans, their planned mix, and a ``Runtime`` bound to them.
Design notes: ``docs/app.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loom.app.arrivals import mean_rate_rps
from loom.app.config import SloConfig, load_slo_config
from loom.core.errors import ConfigError, LoomError
from loom.core.paths import REPO_ROOT
from loom.core.progress import say
from loom.model.blockstore import BlockStore
from loom.model.family import Family, load_family
from loom.model.partition import Partition
from loom.processors.device import DeviceProfile, load_device_profile
from loom.profiling.dataset import META_JSON, load_profile_dataset, read_meta
from loom.profiling.fingerprint import machine_mismatch
from loom.profiling.fitting import Estimates, dataset_digest, fit_estimates, partition_features
from loom.profiling.partitions import ensure_partitions
from loom.serving.correction import LatencyCorrector
from loom.serving.metrics import RequestRecord
from loom.serving.overhead import OverheadMeter
from loom.serving.runtime import Runtime, TaskBinding
from loom.serving.scheduler import Scheduler
from placement.assignment import assign
from placement.plan import Plan, TaskSpace
from placement.policies import get_policy
from placement.queueing import latency_aware_mix

if TYPE_CHECKING:
    from backends.base import Backend


# -- the optimizer's view of a task ---------------------------------------------------------------
def task_space(estimates: Estimates, task: str, processors: Sequence[str] | None = None) -> TaskSpace:
    """A task's choices with predicted numbers: block latency on every processor (of
    ``processors`` only, when given: the config's device), hand-offs, accuracy."""
    te = estimates.task(task)
    procs = [p for p in estimates.processors if processors is None or p in processors]
    part = te.partition
    feats = partition_features(part)
    names = list(part.variants)
    return TaskSpace(
        task=task,
        variants=names,
        k=part.k,
        processors=procs,
        blocks={(v, s): part.variants[v][s] for v in names for s in range(part.k)},
        # a pair the profiler could not run (an op the engine refuses) is left out: the
        # optimizer never places the block there
        block_ms={k: v for k, v in estimates.block_table(task).items() if te.can_run(*k) and k[1] in procs},
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
    #: how the machine the estimates' dataset was measured on differs from this one (said loudly)
    machine_mismatch: list[str] = field(default_factory=list)
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
        usable = [q.name for q in device.processors if q.name in est.processors]
        if not usable:
            raise ConfigError(f"{cfg.source}: device {device.name}: none of its processors "
                              f"{[q.name for q in device.processors]} has estimates ({sorted(est.processors)})")
        spaces = {p.task: task_space(est, p.task, usable) for p in parts}
        store = _shared_store(cfg, parts)
        dep = cls(cfg, device, est, {p.task: p for p in parts}, families, spaces, store)
        dep.machine_mismatch = _machine_check(dep)
        return dep

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
            manifest = self.families[t.name].manifest
            # checked by the runtime: the inputs at submit, the outputs before a request resolves
            result = manifest.output
            out.append(TaskBinding(task=t.name, candidates=plans[t.name], block_paths=self.block_paths(t.name),
                                   latency_ms=lat, accuracy_floor=floor, priority=t.priority,
                                   output_name=result.name,
                                   inputs={s.name: (s.dtype or "float32", tuple(s.shape) or None) for s in manifest.inputs},
                                   outputs={result.name: (result.dtype or "float32", tuple(result.shape) or None)}))
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
                on_record: Callable[[RequestRecord], None] | None = None,
                backends: Mapping[str, Backend] | None = None, meter: OverheadMeter | None = None) -> Runtime:
        """The runtime serving the config's tasks under ``policy_name``; ``backends``: processor ->
        backend in place of the device's (say, ``NullBackend``s); ``meter``: see ``loom.serving.overhead``."""
        policy = get_policy(policy_name)
        bindings = self.bindings(policy_name)
        mix = self.mixes({b.task: b.candidates for b in bindings}) if policy.adaptive else {}
        rt = Runtime(device=self.device, backends=backends, tasks=bindings, policy_name=policy.name,
                     adaptive=policy.adaptive, on_unservable=self.config.on_unservable,
                     correction=self.corrector(correction), on_record=on_record,
                     memory_budget_mb=self.config.memory_budget_mb, block_store=self.store,
                     block_bytes=self.block_bytes(), rates=self.rates(), mix=mix, meter=meter)
        self.steer(rt.scheduler, policy.name, bindings, mix)
        return rt

    def inputs(self, task: str) -> dict[str, np.ndarray]:
        """The task's evaluation inputs (input name -> array over samples), read once."""
        if task not in self._inputs:
            self._inputs[task] = self.families[task].eval_feeds()[0]
        return self._inputs[task]

    def sample_count(self, task: str) -> int:
        """How many evaluation samples the task's requests can draw from."""
        return len(next(iter(self.inputs(task).values())))

    def request_inputs(self, task: str, sample: int) -> dict[str, np.ndarray]:
        """One request's inputs: evaluation sample ``sample`` of every input, batch 1."""
        return {name: x[sample: sample + 1] for name, x in self.inputs(task).items()}


def _shared_store(cfg: SloConfig, parts: list[Partition]) -> BlockStore:
    """The one block store the tasks' partitions wrote their blocks to; serving reads it as is."""
    roots = {str(p.store_root.resolve()) for p in parts if p.store_root is not None}
    if len(roots) != 1 or any(p.store_root is None for p in parts):
        raise ConfigError(f"{cfg.source}: partitions: serving needs every task's blocks in one block store; "
                          f"these partitions use {sorted(roots) or 'none'} (partition them into one folder)")
    store = BlockStore(roots.pop())
    for part in parts:  # a partition made by an older sparseloom is not in the index yet
        if store.tasks.get(part.task, {}).get("variants") != part.variants:
            store.add_partition(part)
    return store


def _machine_check(dep: Deployment) -> list[str]:
    """Say loudly when the estimates rank plans by another machine's measurements, and how to fix it."""
    meta_path = dep.dataset_dir() / META_JSON
    if not meta_path.is_file():
        return []
    recorded = read_meta(meta_path).get("fingerprint") or {}
    problems = machine_mismatch(recorded, dep.device)
    if problems:
        say(f"WARNING: the estimates for {dep.device.name} come from {dep.dataset_dir()}, measured on another "
            f"machine, or one not recorded well enough to tell: plans are ranked by its latencies.\n  "
            + "\n  ".join(problems)
            + f"\n  Fix: loom profile --device {dep.device.name} (re-measures the blocks here: minutes), then serve "
              "again (the estimators refit on the new dataset).")
    return problems
