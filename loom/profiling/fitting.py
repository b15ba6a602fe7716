"""``loom fit``: the estimators fitted on loom's artifacts, bundled as ``Estimates``.

The latency estimator learns from a profile dataset's block rows; one accuracy
estimator per task learns from a small, chosen sample of measured stitched configs.
``Estimates`` holds them with the small tables they need at prediction time, saved as
a folder that ``loom predict`` and the optimizer read without the dataset (layout in
``docs/profiling.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from estimators.accuracy import (
    AccuracyEstimator,
    Compatibility,
    compatibility_from_json,
    compatibility_to_json,
    config_features,
    cut_compatibility,
)
from estimators.features import block_features, latency_row, processor_features
from estimators.latency import LatencyEstimator
from estimators.persist import load_estimator, save_estimator
from estimators.plans import LinkModel, latency_table, plan_latency
from estimators.sampling import (
    Config,
    active_sample,
    config_space,
    random_sample,
    stratified_sample,
)
from loom.core.errors import ConfigError, LoomError
from loom.core.onnxutil import load_model
from loom.core.runref import evaluation_threads
from loom.core.schema import check_fields, read_json
from loom.model.family import Family
from loom.model.partition import Partition, load_partition
from loom.model.signals import cut_activations
from loom.model.stitch import evaluate_configs
from loom.processors.device import DeviceProfile
from loom.profiling.dataset import (
    BLOCKS_CSV,
    CONFIGS_CSV,
    ProfileDataset,
    partition_ref,
    resolve_partition_ref,
)

STRATEGIES = ("active", "stratified", "random")
ESTIMATES_FILE = "estimates.json"


class EstimatesError(LoomError, ValueError):
    """An estimates folder is missing, incomplete, or asked about a task it does not cover."""


# -- sizes -------------------------------------------------------------------------------------
def accuracy_budget(space_size: int, *, share: float = 0.05, cap: int = 50) -> int:
    """How many stitched configs to measure: at most 5% of the space, or 50, whichever is smaller."""
    return max(1, min(int(space_size * share), cap))


# -- latency -----------------------------------------------------------------------------------
def partition_features(partition: Partition) -> dict[str, dict[str, float]]:
    """``block_features`` of every block of a partition, by block id (cached beside the blocks)."""
    cache = partition.root / "features.json"
    if cache.is_file():
        try:  # a cache: unreadable or of another shape, it is recomputed
            data = read_json(cache, EstimatesError)
        except EstimatesError:
            data = {}
        if set(data) == set(partition.blocks) and all(
                isinstance(f, dict) and all(isinstance(v, (int, float)) for v in f.values()) for f in data.values()):
            return data
    feats = {bid: block_features(load_model(partition.block_path(bid), check=False)) for bid in partition.blocks}
    cache.write_text(json.dumps(feats))
    return feats


def processor_rows(device: DeviceProfile) -> dict[str, dict[str, float]]:
    """The latency estimator's features of each processor of the device, by name."""
    return {p.name: processor_features(p.kind, p.backend, p.options) for p in device.processors}


@dataclass
class LatencyRows:
    """The latency estimator's training data from a profile dataset: one row per measured (block, processor)."""

    rows: list[dict[str, float]]
    latency_ms: np.ndarray
    task: list[str]
    block_id: list[str]
    processor: list[str]


def latency_rows(data: ProfileDataset, device: DeviceProfile) -> LatencyRows:
    """Features and median latency of each ``ok`` block row; ``ConfigError`` when a row names a
    processor the device lacks or a block its partition no longer has."""
    procs = processor_rows(device)
    feats: dict[str, dict[str, dict[str, float]]] = {}
    out = LatencyRows([], np.zeros(0), [], [], [])
    values = []
    for r in data.blocks:
        if r["status"] != "ok":
            continue
        if r["processor"] not in procs:
            raise ConfigError(f"{data.root}: rows of processor {r['processor']!r}, which device "
                              f"{device.name!r} does not have (have {sorted(procs)})")
        ref = r["partition"]
        if ref not in feats:
            feats[ref] = partition_features(load_partition(resolve_partition_ref(ref)))
        if r["block_id"] not in feats[ref]:
            raise ConfigError(f"{data.root}: block {r['block_id']} of {ref} is not in that partition any more "
                              "(the zoo changed since it was profiled: run `loom profile --no-resume`)")
        out.rows.append(latency_row(feats[ref][r["block_id"]], procs[r["processor"]]))
        values.append(r["latency_ms_median"])
        out.task.append(r["task"])
        out.block_id.append(r["block_id"])
        out.processor.append(r["processor"])
    out.latency_ms = np.asarray(values, dtype=float)
    if not out.rows:
        raise ConfigError(f"{data.root}: no measured block rows (status ok) to learn latency from")
    return out


def link_model(data: ProfileDataset | None, device: DeviceProfile) -> LinkModel:
    """The dataset's calibrated links and dispatch costs, else the device profile's figures."""
    calib = data.meta.get("link_calibration") if data is not None else None
    if calib and calib.get("links") is not None:
        model = LinkModel.from_calibration(calib)
        # a processor added to the profile after the calibration: its links and dispatch
        # cost come from the profile until the next calibration measures them
        for (a, b), link in LinkModel.from_profile(device).links.items():
            if (a, b) not in model.links and (b, a) not in model.links:
                model.links[(a, b)] = link
        for proc in device.processors:
            model.dispatch_ms.setdefault(proc.name, proc.dispatch_us / 1e3)
        return model
    model = LinkModel.from_profile(device)
    model.dispatch_ms = {p.name: p.dispatch_us / 1e3 for p in device.processors}
    return model


# -- accuracy ----------------------------------------------------------------------------------
def compatibility(partition: Partition, family: Family, *, samples: int = 32) -> Compatibility:
    """Cut compatibilities of every ordered pair of variants: one tapped run of each variant."""
    return cut_compatibility(cut_activations(partition, family, samples=samples), partition.cuts)


@dataclass
class AccuracySample:
    """Configs whose accuracy was measured to train on, and what it cost."""

    measured: dict[Config, float]
    #: uniform configs: each variant's own accuracy, known without measuring
    known: dict[Config, float]
    strategy: str
    seconds: float


def sample_accuracy(
    partition: Partition,
    family: Family,
    n: int,
    *,
    strategy: str = "active",
    seed: int = 0,
    compat: Compatibility | None = None,
    progress: Callable[[str], None] | None = None,
) -> AccuracySample:
    """Measure the accuracy of ``n`` stitched configs chosen by ``strategy``.

    ``active``: a stratified seed, then rounds picked where a bootstrap ensemble of
    accuracy estimators disagrees most; ``stratified``: each variant in each slot
    equally often; ``random``: uniform over stitched configs. The uniform configs are
    never measured: their accuracy is each variant's own, recorded in the manifest.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: {strategy!r} is not one of {list(STRATEGIES)}")
    names = list(partition.variants)
    info = {v.name: v for v in family.variants}
    known = {tuple([v] * partition.k): float(info[v].accuracy) for v in names}
    measure = _accuracy_meter(partition, family, progress or (lambda _m: None))
    t0 = time.perf_counter()
    stitched = [c for c in config_space(names, partition.k) if len(set(c)) > 1]
    if strategy == "active":
        if compat is None:
            compat = compatibility(partition, family)
        result = active_sample(stitched, lambda c: config_features(c, info, compat), measure, n,
                               seed=seed, known=known)
        measured = dict(zip(result.configs, result.values, strict=True))
    else:
        if strategy == "stratified":
            chosen = stratified_sample(names, partition.k, n, seed, include_uniform=False)
        else:
            chosen = random_sample(stitched, n, seed)
        measured = dict(zip(chosen, measure(chosen), strict=True)) if chosen else {}
    return AccuracySample(measured=measured, known=known, strategy=strategy, seconds=time.perf_counter() - t0)


def _accuracy_meter(partition: Partition, family: Family,
                    say: Callable[[str], None]) -> Callable[[list[Config]], list[float]]:
    """A function measuring the accuracy of configs, its blocks kept loaded between calls
    (the rounds of active sampling measure configs made of the same blocks)."""
    sessions: dict[str, object] = {}

    def measure(configs: list[Config]) -> list[float]:
        say(f"{partition.task}: measuring {len(configs)} configs")
        acc = evaluate_configs(partition, configs, family, sessions=sessions)
        return [acc[tuple(c)] for c in configs]

    return measure


def fit_accuracy(
    family: Family, sample: AccuracySample, compat: Compatibility, *, random_state: int = 0
) -> AccuracyEstimator:
    """An accuracy estimator fitted on the sample's measured and uniform configs."""
    info = {v.name: v for v in family.variants}
    train = {**sample.known, **sample.measured}
    rows = [config_features(c, info, compat) for c in train]
    return AccuracyEstimator(random_state=random_state).fit(rows, list(train.values()))


# -- the bundle --------------------------------------------------------------------------------
@dataclass
class TaskEstimates:
    """One task's side of ``Estimates``: its partition, accuracy estimator and the facts it reads."""

    task: str
    partition: Partition
    accuracy: AccuracyEstimator
    compat: Compatibility
    #: variant -> {kind, sparsity, precision, accuracy}
    variants: dict[str, dict[str, Any]]
    measured: dict[Config, float] = field(default_factory=dict)
    #: (block id, processor) pairs the profiler could not run there, with why
    unsupported: dict[tuple[str, str], str] = field(default_factory=dict)

    def can_run(self, block_id: str, processor: str) -> bool:
        return (block_id, processor) not in self.unsupported

    def predict_accuracy(self, configs: Sequence[Sequence[str]]) -> np.ndarray:
        """Predicted accuracy of each config; measured or uniform ones return what was measured."""
        configs = [tuple(c) for c in configs]
        for c in configs:
            bad = [v for v in c if v not in self.variants]
            if len(c) != self.partition.k or bad:
                raise ConfigError(f"{self.task}: config {list(c)} needs {self.partition.k} variants of "
                                  f"{sorted(self.variants)}" + (f"; unknown: {bad}" if bad else ""))
        rows = [config_features(c, self.variants, self.compat) for c in configs]
        pred = self.accuracy.predict(rows) if rows else np.zeros(0)
        for i, c in enumerate(configs):
            if c in self.measured:
                pred[i] = self.measured[c]
            elif len(set(c)) == 1:
                pred[i] = self.variants[c[0]]["accuracy"]
        return pred


@dataclass
class Estimates:
    """Fitted estimators for one device and its tasks: what ``loom fit`` writes and ``loom predict`` reads."""

    device: str
    processors: dict[str, dict[str, float]]
    latency: LatencyEstimator
    links: LinkModel
    tasks: dict[str, TaskEstimates]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    _tables: dict[str, dict[tuple[str, str], float]] = field(default_factory=dict, repr=False)

    def task(self, name: str) -> TaskEstimates:
        if name not in self.tasks:
            raise EstimatesError(f"no estimates for task {name!r} (have {sorted(self.tasks)})")
        return self.tasks[name]

    def block_table(self, task: str) -> dict[tuple[str, str], float]:
        """Predicted ms of every block of the task on every processor (one batched prediction, cached)."""
        if task not in self._tables:
            part = self.task(task).partition
            self._tables[task] = latency_table(self.latency, partition_features(part), self.processors)
        return self._tables[task]

    def predict(self, task: str, config: Sequence[str], placement: Sequence[str]) -> dict[str, Any]:
        """Predicted latency (blocks, hand-offs, dispatch) and accuracy of one plan."""
        te = self.task(task)
        config, placement = tuple(config), tuple(placement)
        if len(placement) == 1 and te.partition.k > 1:
            placement = placement * te.partition.k
        if len(placement) != te.partition.k:
            raise ConfigError(f"{task}: a placement names one processor per slot ({te.partition.k}), got {list(placement)}")
        unknown = [p for p in dict.fromkeys(placement) if p not in self.processors]
        if unknown:
            raise ConfigError(f"{task}: unknown processors {unknown} (device {self.device!r} has {sorted(self.processors)})")
        acc = float(te.predict_accuracy([config])[0])
        ids = [te.partition.variants[v][s] for s, v in enumerate(config)]
        feats = partition_features(te.partition)
        lat = plan_latency(ids, list(placement), self.block_table(task),
                           {b: feats[b]["act_out_bytes"] for b in ids}, self.links)
        return {"task": task, "config": list(config), "placement": list(placement), "latency_ms": lat.total_ms,
                "block_ms": lat.block_ms, "transfer_ms": lat.transfer_ms, "dispatch_ms": lat.dispatch_ms,
                "accuracy": acc, "accuracy_measured": config in te.measured or len(set(config)) == 1}

    # -- files ---------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_estimator(self.latency, folder / "latency.json", fingerprint=self.fingerprint, notes=self.notes.get("latency"))
        (folder / "links.json").write_text(self.links.to_json() + "\n")
        tasks = {name: self._save_task(folder / "tasks" / name, te) for name, te in self.tasks.items()}
        meta = {"format": "sparseloom-estimates", "format_version": 1, "device": self.device,
                "processors": self.processors, "fingerprint": self.fingerprint, "tasks": tasks, "notes": self.notes}
        path = folder / ESTIMATES_FILE
        path.write_text(json.dumps(meta, indent=1) + "\n")
        return path

    def _save_task(self, tdir: Path, te: TaskEstimates) -> dict[str, Any]:
        """Write a task's accuracy estimator and compatibilities; its entry of ``estimates.json``."""
        tdir.mkdir(parents=True, exist_ok=True)
        save_estimator(te.accuracy, tdir / "accuracy.json", fingerprint={"task": te.task},
                       notes=self.notes.get("accuracy", {}).get(te.task))
        (tdir / "compat.json").write_text(json.dumps(compatibility_to_json(te.compat)) + "\n")
        return {"partition": partition_ref(te.partition.root), "variants": te.variants,
                "measured": [{"config": list(c), "accuracy": a} for c, a in te.measured.items()],
                "unsupported": [{"block": b, "processor": p, "why": why}
                                for (b, p), why in te.unsupported.items()]}

    @classmethod
    def load(cls, folder: str | Path) -> Estimates:
        """Read a folder ``save`` wrote; ``EstimatesError`` (or the typed error of the partition or
        estimator file at fault) naming the file and field when anything in it is malformed."""
        folder = Path(folder)
        path = folder / ESTIMATES_FILE
        if not path.is_file():
            raise EstimatesError(f"{path}: no such file (run `loom fit` first)")
        meta = read_json(path, EstimatesError)
        check_fields(meta, ESTIMATES_FIELDS, source=f"{path}: malformed estimates folder",
                     error=EstimatesError, required=("device", "processors", "tasks"))
        processors = _parsed(path, "processors", meta["processors"],
                             lambda p: {name: {k: float(v) for k, v in feats.items()} for name, feats in p.items()})
        tasks = {name: _load_task(folder / "tasks" / name, name, t, path) for name, t in meta["tasks"].items()}
        return cls(
            device=meta["device"],
            processors=processors,
            latency=load_estimator(folder / "latency.json"),  # type: ignore[arg-type]
            links=_parsed(folder / "links.json", "links", read_json(folder / "links.json", EstimatesError),
                          LinkModel.from_dict),
            tasks=tasks,
            fingerprint=meta.get("fingerprint") or {},
            notes=meta.get("notes") or {},
        )


#: fields of ``estimates.json`` and their JSON types
ESTIMATES_FIELDS: dict[str, type | tuple[type, ...]] = {
    "device": str, "processors": dict, "tasks": dict, "fingerprint": (dict, type(None)), "notes": (dict, type(None)),
}
_T = TypeVar("_T")


def _parsed(path: Path, field: str, data: Any, parse: Callable[[Any], _T]) -> _T:
    """``parse(data)``, the ``field`` read from ``path``; data of the wrong shape is an ``EstimatesError``
    naming the file and field."""
    try:
        return parse(data)
    except LoomError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        why = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise EstimatesError(f"{path}: malformed estimates folder: {field}: {why}") from exc


def _load_task(tdir: Path, name: str, entry: Any, path: Path) -> TaskEstimates:
    """A task's estimates from its entry of ``estimates.json`` (``path``) and its folder."""
    check_fields({name: entry}, {name: dict}, source=f"{path}: malformed estimates folder: tasks", error=EstimatesError)
    check_fields(entry, {"partition": str, "variants": dict, "measured": list, "unsupported": list},
                 source=f"{path}: malformed estimates folder: tasks.{name}", error=EstimatesError,
                 required=("partition", "variants"))
    compat_path = tdir / "compat.json"
    return TaskEstimates(
        task=name,
        partition=load_partition(resolve_partition_ref(entry["partition"])),
        accuracy=load_estimator(tdir / "accuracy.json"),  # type: ignore[arg-type]
        compat=_parsed(compat_path, "compat", read_json(compat_path, EstimatesError, kind=list),
                       compatibility_from_json),
        variants=_parsed(path, f"tasks.{name}.variants", entry["variants"], _variant_facts),
        measured=_parsed(path, f"tasks.{name}.measured", entry.get("measured", []), _measured),
        unsupported=_parsed(path, f"tasks.{name}.unsupported", entry.get("unsupported", []),
                            lambda us: {(u["block"], u["processor"]): str(u["why"]) for u in us}),
    )


def _measured(entries: list[Any]) -> dict[Config, float]:
    """An entry's measured configs, checked: each config a list of variant names."""
    out = {}
    for i, m in enumerate(entries):
        if not isinstance(m["config"], list) or not all(isinstance(v, str) for v in m["config"]):
            raise ValueError(f"[{i}].config: expected a list of variant names")
        out[tuple(m["config"])] = float(m["accuracy"])
    return out


def _variant_facts(variants: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """An entry's variant facts, checked: each a mapping with a numeric accuracy."""
    for v, facts in variants.items():
        if not isinstance(facts, dict) or isinstance(facts.get("accuracy"), bool) or not isinstance(
                facts.get("accuracy"), (int, float)):
            raise ValueError(f"{v}: expected an object with a numeric accuracy")
    return variants


def unsupported_pairs(data: ProfileDataset, partition: Partition) -> dict[tuple[str, str], str]:
    """(block, processor) pairs of this partition that the profiler could not run, with the reason.

    A block the dataset never tried on a processor is not listed: the estimator predicts
    it, and the backend's own check refuses it at load time if it must.
    """
    ref = partition_ref(partition.root)
    out = {}
    for r in data.blocks:
        if r["partition"] == ref and r["status"] != "ok" and r["block_id"] in partition.blocks:
            why = r.get("unsupported_ops") or r.get("error") or r["status"]
            out[(r["block_id"], r["processor"])] = f"{r['status']}: {why}"[:300]
    ok = {(r["block_id"], r["processor"]) for r in data.blocks if r["partition"] == ref and r["status"] == "ok"}
    return {k: v for k, v in out.items() if k not in ok}


def dataset_digest(root: str | Path) -> str:
    """A digest of a profile dataset's rows: estimates fitted on other rows are stale."""
    h = hashlib.sha256()
    for name in (BLOCKS_CSV, CONFIGS_CSV):
        path = Path(root) / name
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def variant_facts(family: Family) -> dict[str, dict[str, Any]]:
    """Each variant's kind, sparsity, precision and accuracy: what the accuracy features read."""
    return {v.name: {"kind": v.kind, "sparsity": float(v.sparsity or 0.0), "precision": v.precision,
                     "accuracy": float(v.accuracy)} for v in family.variants if v.accuracy is not None}


def _fit_task(part: Partition, data: ProfileDataset, n: int, *, strategy: str, seed: int,
              say: Callable[[str], None],
              on_task: Callable[[str, AccuracySample], None] | None) -> tuple[TaskEstimates, AccuracySample]:
    """One task's accuracy estimator, fitted on ``n`` measured stitched configs; and the sample."""
    family = part.family()
    say(f"{part.task}: cut compatibilities")
    compat = compatibility(part, family)
    sample = sample_accuracy(part, family, n, strategy=strategy, seed=seed, compat=compat, progress=say)
    if on_task:
        on_task(part.task, sample)
    te = TaskEstimates(part.task, part, fit_accuracy(family, sample, compat, random_state=seed),
                       compat, variant_facts(family), dict(sample.measured),
                       unsupported=unsupported_pairs(data, part))
    return te, sample


def fit_estimates(
    partitions: Sequence[Partition],
    data: ProfileDataset,
    device: DeviceProfile,
    *,
    samples: int | None = None,
    strategy: str = "active",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    on_task: Callable[[str, AccuracySample], None] | None = None,
) -> Estimates:
    """Fit the latency estimator on the dataset's blocks and one accuracy estimator per task.

    ``samples``: stitched configs measured per task (default ``accuracy_budget``: 5% of
    the space, at most 50).
    """
    say = progress or (lambda _m: None)
    rows = latency_rows(data, device)
    say(f"latency: fitting on {len(rows.rows)} measured (block, processor) pairs")
    latency = LatencyEstimator().fit(rows.rows, rows.latency_ms)
    tasks: dict[str, TaskEstimates] = {}
    notes: dict[str, Any] = {"latency": {"train_rows": len(rows.rows), "dataset": str(data.root),
                                         "dataset_sha256": dataset_digest(data.root)}, "accuracy": {}}
    for part in partitions:
        n = samples if samples is not None else accuracy_budget(len(part.variants) ** part.k)
        with evaluation_threads(os.cpu_count() or 1):  # offline accuracy passes: every core
            tasks[part.task], sample = _fit_task(part, data, n, strategy=strategy, seed=seed, say=say,
                                                 on_task=on_task)
        notes["accuracy"][part.task] = {"strategy": strategy, "measured_configs": len(sample.measured),
                                        "space": len(part.variants) ** part.k, "seconds": round(sample.seconds, 2)}
    # A processor the dataset has no row of is left out: the estimator would extrapolate to
    # it from its features alone (measured: untuned TVM predicted at onnxruntime's speed).
    measured = {r["processor"] for r in data.blocks if r.get("status") == "ok"}
    every = processor_rows(device)
    processors = {n: f for n, f in every.items() if n in measured}
    if not processors:
        raise EstimatesError(f"{data.root}: no block measured on any processor of {device.name}")
    left_out = sorted(set(every) - set(processors))
    if left_out:
        notes["latency"]["processors_left_out"] = left_out
        say(f"latency: no profile rows for {', '.join(left_out)}: left out of the estimates (profile them to place "
            "blocks there)")
    return Estimates(device=device.name, processors=processors, latency=latency,
                     links=link_model(data, device), tasks=tasks,
                     fingerprint={"fingerprint_id": data.meta.get("fingerprint_id")}, notes=notes)
