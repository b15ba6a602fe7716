"""``loom profile``: measure blocks on a device's processors, and a sample of placed configs.

What it measures, and why each figure is there:

- every block of every partition on every processor that can run it (the backend is
  asked which ops it cannot run first; a refused block is a row with the ops, not a
  crash): load time and resident memory (the preloader's costs), size on disk, and
  latency at batch 1 on the block's *real* input activations (the dense chain run up
  to its slot on the first evaluation sample: zeros or noise would hit other code
  paths, e.g. in sparse or quantized kernels), as median, p90, min and std of repeats
  after a warm-up. Everything runs on the processor's own pinned worker thread, as in
  serving. These rows are what the latency estimators learn from.
- a stated, seeded sample of stitched configs x placements (``config_samples`` per
  task, a random processor per slot, plus every all-on-one-processor placement for the
  first ``single_placements`` of them), run end to end through the workers, with the
  sum of their blocks' medians and the bytes handed across each processor boundary.
  They check that a config's latency composes from its blocks', and calibrate the
  device profile's links: ``measured - sum`` is fitted by least squares to a fixed
  dispatch cost per chain plus, per link, a cost per hand-off and per byte.

Output (in ``out_dir``): ``blocks.csv`` and ``configs.csv`` (one row per measurement,
appended and flushed as it is taken, so an interrupted run loses at most the row in
flight) and ``meta.json`` (the hardware fingerprint, settings, runs, counts, and the
link calibration). A rerun skips rows already measured with the same fingerprint; a
different fingerprint is refused (``ProfileMismatchError``) unless mixing is allowed,
and every row carries the id of the fingerprint it was measured under.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import glob
import hashlib
import json
import math
import os
import platform
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from loom.core.errors import ConfigError, ProfileMismatchError, UnsupportedOpsError
from loom.core.paths import REPO_ROOT
from loom.core.progress import Progress, say
from loom.model.family import Family
from loom.model.partition import Partition
from loom.processors.device import DeviceProfile
from loom.processors.workers import PlacedChain, Resident, Worker, WorkerPool

FORMAT_VERSION = 1
BLOCKS_CSV = "blocks.csv"
CONFIGS_CSV = "configs.csv"
META_JSON = "meta.json"
STATUSES = ("ok", "unsupported", "error")


class ProfileDataError(ConfigError):
    """A profile dataset (CSV or meta.json) is malformed. Names the file, row and column."""


# -- columns -------------------------------------------------------------------------------
#: column -> type: str, int, float; "?" suffix: may be empty (unsupported or failed rows)
BLOCK_COLUMNS: dict[str, str] = {
    "fingerprint": "str",
    "task": "str",
    "partition": "str",  # partition folder, relative to the repository root when inside it
    "block_id": "str",
    "block_file": "str",  # relative to the partition folder
    "slot": "int",
    "variants": "str",  # ";"-joined variants that have this block
    "precision": "str",
    "macs": "int",
    "processor": "str",
    "backend": "str",
    "status": "str",
    "unsupported_ops": "str",  # ";"-joined
    "error": "str",
    "latency_ms_median": "float?",
    "latency_ms_p90": "float?",
    "latency_ms_min": "float?",
    "latency_ms_std": "float?",
    "repeats": "int?",
    "warmup": "int?",
    "load_ms": "float?",
    "memory_bytes": "int?",
    "size_bytes": "int",
    "input_bytes": "int?",
    "output_bytes": "int?",
    "measured_at": "str",
}
CONFIG_COLUMNS: dict[str, str] = {
    "fingerprint": "str",
    "task": "str",
    "partition": "str",
    "config": "str",  # ";"-joined variant per slot
    "placement": "str",  # ";"-joined processor per slot
    "block_ids": "str",
    "status": "str",
    "error": "str",
    "measured_ms_median": "float?",
    "measured_ms_p90": "float?",
    "measured_ms_min": "float?",
    "repeats": "int?",
    "sum_blocks_ms": "float?",
    "transfer_bytes": "int?",
    "n_transfers": "int?",
    "transfers": "str",  # ";"-joined src>dst@slot=bytes
    "measured_at": "str",
}


# -- the hardware fingerprint ----------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _governor() -> str:
    """The frequency governor (``performance``, ``schedutil``...): it moves latencies a lot."""
    found: dict[str, str] = {}
    for path in sorted(glob.glob("/sys/devices/system/cpu/cpu*/cpufreq/scaling_governor")):
        try:
            found[Path(path).parent.parent.name] = Path(path).read_text().strip()
        except OSError:
            continue
    values = sorted(set(found.values()))
    if not values:
        return "unknown"
    return values[0] if len(values) == 1 else ",".join(f"{c}:{g}" for c, g in sorted(found.items()))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def hardware_fingerprint(device: DeviceProfile) -> dict[str, Any]:
    """What makes measurements comparable: machine, kernel, engines, and the processors' settings.

    Link figures, memory budgets and descriptions are left out: they are not settings
    of anything that is measured.
    """
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count() or 0,
        "governor": _governor(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "packages": {
            "onnxruntime": _version("onnxruntime"),
            "openvino": _version("openvino"),
            "onnx": _version("onnx"),
            "numpy": _version("numpy"),
        },
        "device": {
            "name": device.name,
            "processors": [
                p.model_dump(mode="json", include={"name", "kind", "backend", "options", "cores", "device_id"})
                for p in device.processors
            ],
        },
    }


def fingerprint_id(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: dataset value -> this run's value`` for every field that differs."""
    a, b = _flatten(old), _flatten(new)
    return [
        f"{k}: {json.dumps(a.get(k))} (dataset) vs {json.dumps(b.get(k))} (here)"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


# -- the dataset ------------------------------------------------------------------------------
def partition_ref(root: Path) -> str:
    """How rows name a partition: relative to the repository when inside it (portable)."""
    root = Path(root).resolve()
    try:
        return root.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(root)


def resolve_partition_ref(ref: str) -> Path:
    path = Path(ref)
    return path if path.is_absolute() else REPO_ROOT / path


@dataclass
class ProfileDataset:
    """A loaded profile dataset: typed rows (dicts) plus ``meta.json``."""

    root: Path
    meta: dict[str, Any]
    blocks: list[dict[str, Any]]
    configs: list[dict[str, Any]]

    def column(self, name: str, *, table: str = "blocks", status: str | None = "ok") -> np.ndarray:
        """One column as an array (floats with NaN for empty cells), rows of ``status`` only."""
        rows = self.blocks if table == "blocks" else self.configs
        kind = (BLOCK_COLUMNS if table == "blocks" else CONFIG_COLUMNS)[name]
        values = [r[name] for r in rows if status is None or r["status"] == status]
        if kind.startswith(("int", "float")):
            return np.array([np.nan if v is None else v for v in values], dtype=float)
        return np.array(values, dtype=object)

    def block_latency(self, *, fingerprint: str | None = None) -> dict[tuple[str, str, str], float]:
        """(partition, block_id, processor) -> median latency (ms) of the ``ok`` rows."""
        return {
            (r["partition"], r["block_id"], r["processor"]): r["latency_ms_median"]
            for r in self.blocks
            if r["status"] == "ok" and (fingerprint is None or r["fingerprint"] == fingerprint)
        }

    def partition_dir(self, row: dict[str, Any]) -> Path:
        return resolve_partition_ref(row["partition"])

    def block_path(self, row: dict[str, Any]) -> Path:
        return self.partition_dir(row) / row["block_file"]


def _parse_value(kind: str, text: str | None) -> Any:
    optional = kind.endswith("?")
    base = kind.rstrip("?")
    if text is None:
        raise ValueError("missing (the row has fewer fields than the header)")
    if base == "str":
        return text
    if text == "":
        if optional:
            return None
        raise ValueError("empty, a number is required")
    if base == "int":
        return int(text)
    value = float(text)
    if math.isnan(value):
        raise ValueError("NaN: leave the cell empty instead")
    return value


def _read_rows(path: Path, columns: dict[str, str]) -> list[dict[str, Any]]:
    """Typed rows of a profile CSV; ``ProfileDataError`` naming the file, row and column."""
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise ProfileDataError(f"{path}: header lacks column(s) {missing}")
        for n, raw in enumerate(reader, start=1):
            where = f"{path}: row {n} (line {reader.line_num})"
            if None in raw:
                raise ProfileDataError(f"{where}: {len(header) + len(raw[None])} fields, the header has {len(header)}")
            row: dict[str, Any] = {}
            for col, kind in columns.items():
                try:
                    row[col] = _parse_value(kind, raw.get(col))
                except ValueError as exc:
                    raise ProfileDataError(f"{where}, column {col!r}: {exc} (got {raw.get(col)!r})") from None
            for col in header:  # columns a later version added: kept as text
                row.setdefault(col, raw[col])
            problem = _row_problem(row, columns)
            if problem:
                col, why = problem
                raise ProfileDataError(f"{where}, column {col!r}: {why} (got {raw.get(col)!r})")
            rows.append(row)
    return rows


def _row_problem(row: dict[str, Any], columns: dict[str, str]) -> tuple[str, str] | None:
    if row["status"] not in STATUSES:
        return "status", f"must be one of {list(STATUSES)}"
    timed = ("latency_ms_median", "latency_ms_p90", "latency_ms_min") if "latency_ms_median" in columns else (
        "measured_ms_median", "measured_ms_p90", "measured_ms_min")
    if row["status"] == "ok":
        for col in timed:
            if row[col] is None:
                return col, "empty on an ok row"
            if row[col] < 0:
                return col, "negative time"
        median, p90, low = (row[c] for c in timed)
        if not low <= median * (1 + 1e-9):
            return timed[2], f"expected min <= median <= p90, got {low}, {median}, {p90}"
        if not median <= p90 * (1 + 1e-9):
            return timed[1], f"expected min <= median <= p90, got {low}, {median}, {p90}"
    return None


def load_profile_dataset(root: str | Path) -> ProfileDataset:
    """Read and validate a profile dataset folder (``blocks.csv``, ``configs.csv``, ``meta.json``)."""
    root = Path(root)
    meta_path = root / META_JSON
    if not meta_path.is_file():
        raise ProfileDataError(f"{meta_path}: no such file (is {root} a profile dataset? run `loom profile`)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ProfileDataError(f"{meta_path}: not valid JSON: {exc}") from exc
    for key in ("format", "fingerprints"):
        if key not in meta:
            raise ProfileDataError(f"{meta_path}: no {key!r}")
    if meta["format"] != FORMAT_VERSION:
        raise ProfileDataError(f"{meta_path}: format {meta['format']!r}, this sparseloom reads {FORMAT_VERSION}")
    blocks = _read_rows(root / BLOCKS_CSV, BLOCK_COLUMNS)
    configs = _read_rows(root / CONFIGS_CSV, CONFIG_COLUMNS)
    for name, rows in ((BLOCKS_CSV, blocks), (CONFIGS_CSV, configs)):
        for n, row in enumerate(rows, start=1):
            if row["fingerprint"] not in meta["fingerprints"]:
                raise ProfileDataError(
                    f"{root / name}: row {n}, column 'fingerprint': {row['fingerprint']!r} is not in {META_JSON}"
                )
    return ProfileDataset(root, meta, blocks, configs)


class _RowWriter:
    """Appends rows to a CSV and flushes each one: a kill loses at most the row being written."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        fresh = not path.is_file() or path.stat().st_size == 0
        if not fresh:
            _drop_partial_line(path)
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
            if header != self.columns:
                raise ProfileDataError(
                    f"{path}: its columns {header} are not this version's {self.columns}; "
                    f"profile into another folder"
                )
        self._file = path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="raise")
        if fresh:
            self._writer.writeheader()
            self._file.flush()

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow({c: _cell(row.get(c)) for c in self.columns})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e-3 and value != 0 else round(value, 6)
    return value


def _drop_partial_line(path: Path) -> None:
    """An interrupted write leaves a line without its newline: drop it, it is re-measured."""
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        cut = data.rfind(b"\n") + 1
        f.truncate(cut)
        say(f"{path}: dropped an incomplete last row (an interrupted run); it is measured again")


# -- measuring ----------------------------------------------------------------------------------
def _time_samples(fn: Callable[[], object], *, warmup: int, repeats: int) -> list[float]:
    """Wall times (ms) of ``repeats`` calls after ``warmup``; the GC is off while timing
    (a collection inside a sub-millisecond run would be its whole p90)."""
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


def _stats(samples: Sequence[float]) -> dict[str, float]:
    """Median, p90 (the same order statistic as ``loom.profiling.measure.time_call``), min, std."""
    s = sorted(samples)
    n = len(s)
    return {
        "median": float(np.median(s)),
        "p90": s[min(n - 1, int(0.9 * n))],
        "min": s[0],
        "std": float(np.std(s, ddof=1)) if n > 1 else 0.0,
    }


def _one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception as one short line: engine messages span lines, and a CSV row should not."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]


def _nbytes(arrays: Iterable[Any]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays))


def _measure_block(worker: Worker, path: Path, block_id: str, feeds: dict[str, np.ndarray], *,
                   warmup: int, repeats: int) -> dict[str, Any]:
    """One block on one processor, inside the processor's worker thread (the job below)."""

    def job() -> dict[str, Any]:
        backend = worker.backend
        bad = backend.unsupported_ops(path)
        if bad:
            return {"status": "unsupported", "unsupported_ops": ";".join(bad)}
        t0 = time.perf_counter()
        try:
            loaded = backend.load(path, block_id=block_id)
        except UnsupportedOpsError as exc:  # kernels missing for a type show only at load
            return {"status": "unsupported", "unsupported_ops": ";".join(exc.ops)}
        load_ms = (time.perf_counter() - t0) * 1e3
        try:
            inputs = {n: feeds[n] for n in loaded.input_names}
            out = backend.run(loaded, inputs)
            stats = _stats(_time_samples(lambda: backend.run(loaded, inputs), warmup=warmup, repeats=repeats))
            return {
                "status": "ok",
                "latency_ms_median": stats["median"],
                "latency_ms_p90": stats["p90"],
                "latency_ms_min": stats["min"],
                "latency_ms_std": stats["std"],
                "repeats": repeats,
                "warmup": warmup,
                "load_ms": load_ms,
                "memory_bytes": backend.memory_bytes(loaded),
                "input_bytes": _nbytes(inputs.values()),
                "output_bytes": _nbytes(out.values()),
            }
        finally:
            backend.release(loaded)

    return worker.submit(job).result()


def _warm_worker(worker: Worker) -> None:
    """Load, run and drop a one-op model: engine start-up is not charged to the first block."""
    from backends.base import warm_model

    def job() -> None:
        model = warm_model()
        loaded = worker.backend.load(model, block_id="warm-up")
        try:
            worker.backend.run(loaded, {"x": np.zeros((1, 4), np.float32)})
        finally:
            worker.backend.release(loaded)

    with contextlib.suppress(Exception):  # a backend refusing even this says so on the real blocks
        worker.submit(job).result()


def slot_inputs(partition: Partition, family: Family, *, samples: int = 1) -> list[dict[str, np.ndarray]]:
    """The tensors available before each slot on real data: the dense chain on the first
    ``samples`` evaluation inputs (graph inputs plus every earlier cut's tensors)."""
    from loom.core.onnxutil import load_model
    from loom.core.runref import session

    x, _ = family.eval_data(samples)
    env: dict[str, np.ndarray] = {family.manifest.input.name: x}
    dense = family.reference_variant().name
    result = []
    for s, bid in enumerate(partition.variants[dense]):
        result.append(dict(env))
        if s + 1 < partition.k:
            info = partition.blocks[bid]
            sess = session(load_model(partition.block_path(bid), check=False), name=bid)
            env.update(zip(info.outputs, sess.run(info.outputs, {n: env[n] for n in info.inputs}), strict=True))
    return result


# -- sampling configs x placements ------------------------------------------------------------------
def sample_placed_configs(
    partition: Partition,
    supported: dict[str, list[str]],
    processors: Sequence[str],
    *,
    n: int,
    single_placements: int,
    seed: int,
) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """A seeded sample: ``n`` random configs, each on a random processor per slot among those
    that run its block, plus every all-on-one-processor placement of the first
    ``single_placements`` of them. ``supported``: block id -> processors that ran it.

    Seeded by task name too, so that adding a task does not change another's sample.
    """
    rng = random.Random(f"{seed}:{partition.task}")
    names = sorted(partition.variants)
    chosen: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    seen: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
    configs: list[tuple[str, ...]] = []
    attempts = 0
    while len(configs) < n and attempts < 50 * max(1, n):
        attempts += 1
        config = tuple(rng.choice(names) for _ in range(partition.k))
        blocks = [partition.variants[v][s] for s, v in enumerate(config)]
        options = [sorted(supported.get(b, [])) for b in blocks]
        if not all(options):
            continue  # some slot's block runs nowhere
        placement = tuple(rng.choice(o) for o in options)
        if (config, placement) in seen:
            continue
        seen.add((config, placement))
        configs.append(config)
        chosen.append((config, placement))
    for config in configs[:single_placements]:
        blocks = [partition.variants[v][s] for s, v in enumerate(config)]
        for proc in processors:
            placement = tuple([proc] * partition.k)
            if all(proc in supported.get(b, []) for b in blocks) and (config, placement) not in seen:
                seen.add((config, placement))
                chosen.append((config, placement))
    return chosen


# -- link calibration --------------------------------------------------------------------------------
def parse_transfers(text: str) -> list[tuple[str, str, int, int]]:
    """``a>b@1=4096;b>a@2=512`` -> [(a, b, 1, 4096), (b, a, 2, 512)]."""
    out = []
    for part in filter(None, text.split(";")):
        head, _, nbytes = part.rpartition("=")
        pair, _, slot = head.rpartition("@")
        src, _, dst = pair.partition(">")
        out.append((src, dst, int(slot), int(nbytes)))
    return out


def link_key(a: str, b: str) -> str:
    return "|".join(sorted((a, b)))


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0 (a cost cannot be negative): drop the most
    negative coefficient and refit until none is (an active-set method, enough here)."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


def _fit_quality(measured: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    err = (predicted - measured) / measured
    return {
        "mape_pct": round(float(np.mean(np.abs(err))) * 100, 2),
        "within_10pct": round(float(np.mean(np.abs(err) <= 0.10)), 3),
        "median_error_pct": round(float(np.median(err)) * 100, 2),
    }


def segments_of(placement: Sequence[str]) -> list[str]:
    """The processor of each run of consecutive slots: ``a;a;b;a`` -> ``[a, b, a]``."""
    out: list[str] = []
    for p in placement:
        if not out or out[-1] != p:
            out.append(p)
    return out


def calibrate_links(configs: Sequence[dict[str, Any]], device: DeviceProfile | None = None) -> dict[str, Any]:
    """Fit what a placed chain costs beyond the sum of its blocks' isolated medians.

    ``measured - sum_blocks = dispatch[first processor]
    + sum over hand-offs (latency[link] + bytes / bandwidth[link])``.

    ``dispatch`` is what a request pays to enter its chain's first processor and come
    back (the caller's submit, the worker's wake-up, the engine's start after idling,
    which a block timed in a hot loop never pays, the hand-back of the result). It is
    fitted per processor because it differs (OpenVINO's is larger here), and so that
    it does not leak into the links. A link's ``latency`` is then the whole fixed cost
    of one hand-off: the next worker's wake-up and its engine's start included.

    Why per chain and not per run of slots on a processor: a chain has one more such
    run than it has hand-offs, so a cost per run and a cost per hand-off can trade a
    constant between them; only this split is identified by the data.

    Returns the fitted figures in the device profile's units (``dispatch_us`` per
    processor, ``latency_us`` and ``bandwidth_gbps`` per link), and how well the sum
    of blocks alone, the device profile's own figures and the calibrated ones predict
    the measured latency, in-sample and leave-one-out.
    """
    rows = [r for r in configs if r["status"] == "ok" and r["sum_blocks_ms"] is not None]
    if not rows:
        return {"n_configs": 0, "note": "no measured configs"}
    firsts = [r["placement"].split(";")[0] for r in rows]
    procs = sorted(set(firsts))
    links = sorted({link_key(s, d) for r in rows for s, d, _, _ in parse_transfers(r["transfers"])})
    n_p = len(procs)
    x = np.zeros((len(rows), n_p + 2 * len(links)))
    for i, (r, first) in enumerate(zip(rows, firsts, strict=True)):
        x[i, procs.index(first)] = 1.0
        for s, d, _, nbytes in parse_transfers(r["transfers"]):
            j = n_p + 2 * links.index(link_key(s, d))
            x[i, j] += 1.0
            x[i, j + 1] += nbytes
    measured = np.array([r["measured_ms_median"] for r in rows])
    sums = np.array([r["sum_blocks_ms"] for r in rows])
    y = measured - sums
    # Byte columns in MB so that the fit is well conditioned; scaled back after.
    scale = np.ones(x.shape[1])
    scale[n_p + 1 :: 2] = 1e6
    # Rows weighted by 1 / measured: the fit minimizes relative error. Unweighted, the
    # millisecond-scale noise of the largest models decides every coefficient and the
    # sub-millisecond configs (most of them) come out worse than with no model at all.
    w = 1.0 / np.maximum(measured, 1e-9)

    def fit(keep: np.ndarray) -> np.ndarray:
        return _nonneg_lstsq(x[keep] / scale * w[keep, None], y[keep] * w[keep]) / scale

    everything = np.ones(len(rows), dtype=bool)
    coef = fit(everything)
    loo = np.empty(len(rows))
    for i in range(len(rows)):
        keep = everything.copy()
        keep[i] = False
        loo[i] = sums[i] + x[i] @ fit(keep)
    result: dict[str, Any] = {
        "n_configs": len(rows),
        "model": "measured_ms = sum_blocks_ms + dispatch[first processor] "
                 "+ sum over hand-offs (latency[link] + bytes / bandwidth[link])",
        "fit": "least squares of the relative error (rows weighted by 1 / measured), coefficients >= 0",
        "processors": {
            p: {"dispatch_us": round(float(coef[k]) * 1e3, 2), "n_configs": int((x[:, k] > 0).sum())}
            for k, p in enumerate(procs)
        },
        "links": {},
        "quality": {
            "sum_of_blocks": _fit_quality(measured, sums),
            "calibrated_in_sample": _fit_quality(measured, sums + x @ coef),
            "calibrated_leave_one_out": _fit_quality(measured, loo),
        },
    }
    for j, key in enumerate(links):
        col = n_p + 2 * j
        per_byte_ms = float(coef[col + 1])
        used = x[:, col] > 0
        result["links"][key] = {
            "between": key.split("|"),
            "latency_us": round(float(coef[col]) * 1e3, 2),
            # ms per byte -> 1e9 bytes per second; None: no per-byte cost was measurable
            "bandwidth_gbps": round(1.0 / (per_byte_ms * 1e-3) / 1e9, 3) if per_byte_ms > 0 else None,
            "n_configs": int(used.sum()),
            "bytes_range": [int(x[used, col + 1].min()), int(x[used, col + 1].max())] if used.any() else None,
        }
    if device is not None:
        try:
            prior = sums + np.array([
                device.chain_overhead_ms(r["placement"].split(";"),
                                         [b for _, _, _, b in parse_transfers(r["transfers"])])
                for r in rows
            ])
            result["quality"]["device_profile"] = _fit_quality(measured, prior)
        except ConfigError as exc:  # a placement over a link the profile does not list
            result["quality"]["device_profile"] = {"error": str(exc)}
    tasks = np.array([str(r.get("task", "")) for r in rows])
    if len(set(tasks)) > 1:
        result["quality_by_task"] = {
            t: {"n": int((tasks == t).sum()),
                "sum_of_blocks": _fit_quality(measured[tasks == t], sums[tasks == t]),
                "calibrated_leave_one_out": _fit_quality(measured[tasks == t], loo[tasks == t])}
            for t in sorted(set(tasks))
        }
    return result


# -- the driver ---------------------------------------------------------------------------------------
@dataclass
class _RunCounts:
    blocks_measured: int = 0
    blocks_skipped: int = 0
    configs_measured: int = 0
    configs_skipped: int = 0
    errors: list[str] = field(default_factory=list)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=False))
    tmp.replace(path)  # atomic: a kill never leaves half a meta.json


def _open_meta(out: Path, fp: dict[str, Any], fid: str, *, resume: bool, allow_mixed: bool) -> dict[str, Any]:
    meta_path = out / META_JSON
    has_rows = any((out / n).is_file() and (out / n).stat().st_size > 0 for n in (BLOCKS_CSV, CONFIGS_CSV))
    if not resume:
        for n in (BLOCKS_CSV, CONFIGS_CSV, META_JSON):
            (out / n).unlink(missing_ok=True)
        has_rows = False
    if not meta_path.is_file():
        if has_rows:
            raise ProfileMismatchError(
                f"{out}: has measurements but no {META_JSON}, so nothing says which machine took them; "
                f"move them away or profile into another folder"
            )
        return {"format": FORMAT_VERSION, "fingerprint_id": fid, "fingerprint": fp, "fingerprints": {fid: fp}, "runs": []}
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ProfileDataError(f"{meta_path}: not valid JSON: {exc}") from exc
    known = meta.get("fingerprints", {})
    if fid not in known:
        if not allow_mixed:
            base = known.get(meta.get("fingerprint_id"), meta.get("fingerprint", {}))
            diff = fingerprint_diff(base, fp)
            raise ProfileMismatchError(
                f"{out} was measured on other hardware or software ({len(diff)} difference(s)):\n  "
                + "\n  ".join(diff)
                + "\nprofile into another folder, or pass allow_mixed (--allow-mixed) to add rows under a new fingerprint id"
            )
        known[fid] = fp
        meta["fingerprints"] = known
    return meta


def profile_device(
    partitions: Sequence[Partition],
    device: DeviceProfile,
    out_dir: str | Path,
    *,
    warmup: int = 5,
    repeats: int = 30,
    config_samples: int = 20,
    single_placements: int = 3,
    seed: int = 0,
    resume: bool = True,
    allow_mixed: bool = False,
    progress: bool = True,
    processors: Sequence[str] | None = None,
) -> ProfileDataset:
    """Measure every block of ``partitions`` on every processor of ``device``, then a sample of
    placed configs; write ``blocks.csv``, ``configs.csv`` and ``meta.json`` to ``out_dir``."""
    if warmup < 0 or repeats < 1 or config_samples < 0:
        raise ConfigError(f"warmup >= 0, repeats >= 1, config_samples >= 0; got {warmup}, {repeats}, {config_samples}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    procs = list(processors) if processors is not None else device.processor_names
    for p in procs:
        device.processor(p)
    fp = hardware_fingerprint(device)
    fid = fingerprint_id(fp)
    meta = _open_meta(out, fp, fid, resume=resume, allow_mixed=allow_mixed)
    for name in (BLOCKS_CSV, CONFIGS_CSV):
        if (out / name).is_file():
            _drop_partial_line(out / name)
    existing = load_profile_dataset(out) if (out / META_JSON).is_file() else None
    done_blocks = {(r["partition"], r["block_id"], r["processor"]) for r in (existing.blocks if existing else [])
                   if r["fingerprint"] == fid}
    done_configs = {(r["partition"], r["config"], r["placement"]) for r in (existing.configs if existing else [])
                    if r["fingerprint"] == fid}
    block_rows = [r for r in (existing.blocks if existing else []) if r["fingerprint"] == fid]

    run = {"started": _now(), "fingerprint_id": fid, "status": "running", "loadavg_at_start": _loadavg(),
           "settings": {"warmup": warmup, "repeats": repeats, "config_samples": config_samples,
                        "single_placements": single_placements, "seed": seed, "processors": procs}}
    meta["runs"] = [*meta.get("runs", []), run]
    meta["device"] = device.name
    meta["partitions"] = {**meta.get("partitions", {}), **{p.task: partition_ref(p.root) for p in partitions}}
    meta["columns"] = {"blocks": BLOCK_COLUMNS, "configs": CONFIG_COLUMNS}
    meta["notes"] = (
        "Latencies in ms at batch 1 on real input activations, each measured on the processor's pinned "
        "worker thread; partition paths are relative to the repository root unless absolute; "
        "bandwidth_gbps is gigabytes per second."
    )
    _write_meta(out / META_JSON, meta)

    t_start = time.perf_counter()
    counts = _RunCounts()
    blocks_w = _RowWriter(out / BLOCKS_CSV, list(BLOCK_COLUMNS))
    configs_w = _RowWriter(out / CONFIGS_CSV, list(CONFIG_COLUMNS))
    pool = WorkerPool(device)
    try:
        for proc in procs:  # an engine missing here stops the run now, naming its processor
            pool[proc]
        # -- blocks --
        total = sum(len(p.blocks) for p in partitions) * len(procs)
        bar = Progress(total, f"profile {device.name}: blocks x processors", enabled=progress)
        warmed: set[str] = set()
        for part in partitions:
            ref = partition_ref(part.root)
            todo = [(bid, proc) for bid in part.blocks for proc in procs if (ref, bid, proc) not in done_blocks]
            skipped = len(part.blocks) * len(procs) - len(todo)
            counts.blocks_skipped += skipped
            if skipped:
                bar.update(skipped, note=f"{part.task}: {skipped} already measured")
            if not todo:
                continue
            envs = slot_inputs(part, part.family())
            for bid, proc in todo:
                info = part.blocks[bid]
                worker = pool[proc]
                if proc not in warmed:
                    _warm_worker(worker)
                    warmed.add(proc)
                row: dict[str, Any] = {
                    "fingerprint": fid, "task": part.task, "partition": ref, "block_id": bid,
                    "block_file": info.file, "slot": info.slot, "variants": ";".join(info.variants),
                    "precision": info.precision, "macs": info.macs, "processor": proc,
                    "backend": device.processor(proc).backend, "unsupported_ops": "", "error": "",
                    "size_bytes": part.block_path(bid).stat().st_size,
                }
                try:
                    row.update(_measure_block(worker, part.block_path(bid), bid, envs[info.slot],
                                              warmup=warmup, repeats=repeats))
                except Exception as exc:  # recorded, never fatal: one bad block must not stop a profile
                    row.update(status="error", error=_one_line(exc))
                    counts.errors.append(f"{part.task} {bid} on {proc}: {row['error']}")
                row["measured_at"] = _now()
                blocks_w.write(row)
                block_rows.append(row)
                counts.blocks_measured += 1
                bar.update(note=f"{part.task} slot {info.slot} on {proc}: {row['status']}")

        # -- configs x placements, end to end through the workers --
        latency = {(r["partition"], r["block_id"], r["processor"]): r["latency_ms_median"]
                   for r in block_rows if r["status"] == "ok"}
        plans: list[tuple[Partition, list[tuple[tuple[str, ...], tuple[str, ...]]]]] = []
        for part in partitions:
            ref = partition_ref(part.root)
            supported: dict[str, list[str]] = {}
            for (pref, bid, proc) in latency:
                if pref == ref:
                    supported.setdefault(bid, []).append(proc)
            sample = sample_placed_configs(part, supported, procs, n=config_samples,
                                           single_placements=single_placements, seed=seed)
            plans.append((part, sample))
        bar = Progress(sum(len(s) for _, s in plans), f"profile {device.name}: placed configs", enabled=progress)
        for part, sample in plans:
            ref = partition_ref(part.root)
            todo = [(c, pl) for c, pl in sample if (ref, ";".join(c), ";".join(pl)) not in done_configs]
            skipped = len(sample) - len(todo)
            counts.configs_skipped += skipped
            if skipped:
                bar.update(skipped, note=f"{part.task}: {skipped} already measured")
            if not todo:
                continue
            feeds = slot_inputs(part, part.family())[0]
            resident: Resident = {}
            try:
                for config, placement in todo:
                    row = _measure_config(part, ref, config, placement, pool, resident, feeds, latency,
                                          warmup=warmup, repeats=repeats)
                    row["fingerprint"] = fid
                    if row["status"] == "error":
                        counts.errors.append(f"{part.task} {row['config']} on {row['placement']}: {row['error']}")
                    configs_w.write(row)
                    counts.configs_measured += 1
                    bar.update(note=f"{part.task} {row['placement']}")
            finally:
                _release_all(pool, resident)
        run["status"] = "finished"
    except BaseException as exc:
        run["status"] = f"interrupted: {type(exc).__name__}"
        raise
    finally:
        pool.close()
        blocks_w.close()
        configs_w.close()
        run["finished"] = _now()
        # other work on the machine during a run is the first suspect for noisy figures
        run["loadavg_at_end"] = _loadavg()
        run["wall_s"] = round(time.perf_counter() - t_start, 1)
        run.update({k: v for k, v in counts.__dict__.items() if k != "errors"})
        run["errors"] = counts.errors[:50]
        _finish_meta(out, meta, device, fid)
    return load_profile_dataset(out)


def _measure_config(
    part: Partition,
    ref: str,
    config: tuple[str, ...],
    placement: tuple[str, ...],
    pool: WorkerPool,
    resident: Resident,
    feeds: dict[str, np.ndarray],
    latency: dict[tuple[str, str, str], float],
    *,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    block_ids = [part.variants[v][s] for s, v in enumerate(config)]
    row: dict[str, Any] = {
        "task": part.task, "partition": ref, "config": ";".join(config), "placement": ";".join(placement),
        "block_ids": ";".join(block_ids), "error": "", "transfers": "",
        "sum_blocks_ms": sum(latency[(ref, b, p)] for b, p in zip(block_ids, placement, strict=True)),
    }
    try:
        chain = PlacedChain(part, config, placement, pool, resident=resident)
        env = chain.run(feeds, keep_all=True)
        transfers = chain.transfers(env)
        inputs = {n: feeds[n] for n in chain.segments[0].reads}
        stats = _stats(_time_samples(lambda: chain.run(inputs), warmup=warmup, repeats=repeats))
        row.update({
            "status": "ok",
            "measured_ms_median": stats["median"],
            "measured_ms_p90": stats["p90"],
            "measured_ms_min": stats["min"],
            "repeats": repeats,
            "transfer_bytes": sum(t.nbytes for t in transfers),
            "n_transfers": len(transfers),
            "transfers": ";".join(f"{t.src}>{t.dst}@{t.slot}={t.nbytes}" for t in transfers),
        })
    except Exception as exc:  # recorded, never fatal
        row.update(status="error", error=_one_line(exc))
    row["measured_at"] = _now()
    return row


def measure_placed_configs(
    part: Partition,
    pairs: Sequence[tuple[tuple[str, ...], tuple[str, ...]]],
    device: DeviceProfile,
    *,
    warmup: int = 5,
    repeats: int = 30,
    latency: Mapping[tuple[str, str, str], float] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Measure (config, placement) pairs of one partition end to end, as ``profile_device`` does.

    For checking predictions on configs the estimators never saw, and for timing
    exhaustive profiling. ``latency``: block medians by (partition ref, block id,
    processor), for the rows' ``sum_blocks_ms`` (0 without). Rows as in ``configs.csv``
    plus ``wall_s``, the time each pair took to measure.
    """
    ref = partition_ref(part.root)
    table: Mapping[tuple[str, str, str], float] = latency if latency is not None else defaultdict(float)
    rows: list[dict[str, Any]] = []
    pool = WorkerPool(device)
    resident: Resident = {}
    bar = Progress(len(pairs), f"{part.task}: placed configs", enabled=progress)
    try:
        for proc in dict.fromkeys(p for _, pl in pairs for p in pl):
            _warm_worker(pool[proc])
        feeds = slot_inputs(part, part.family())[0]
        for config, placement in pairs:
            t0 = time.perf_counter()
            row = _measure_config(part, ref, tuple(config), tuple(placement), pool, resident, feeds, table,  # type: ignore[arg-type]
                                  warmup=warmup, repeats=repeats)
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            bar.update(note=row["placement"])
    finally:
        _release_all(pool, resident)
        pool.close()
    return rows


def _release_all(pool: WorkerPool, resident: Resident) -> None:
    futures = [pool[proc].release(block) for (proc, _), block in resident.items()]
    for f in futures:
        f.result()
    resident.clear()


def _finish_meta(out: Path, meta: dict[str, Any], device: DeviceProfile, fid: str) -> None:
    """Counts over the whole dataset, and the link calibration on this fingerprint's rows."""
    try:
        data = load_profile_dataset_rows(out)
    except ProfileDataError as exc:
        meta["problem"] = str(exc)
        _write_meta(out / META_JSON, meta)
        return
    blocks, configs = data
    meta["counts"] = {
        "block_rows": len(blocks),
        "config_rows": len(configs),
        "blocks_by_status": {s: sum(r["status"] == s for r in blocks) for s in STATUSES},
        "configs_by_status": {s: sum(r["status"] == s for r in configs) for s in STATUSES},
        "by_fingerprint": {f: {"blocks": sum(r["fingerprint"] == f for r in blocks),
                               "configs": sum(r["fingerprint"] == f for r in configs)}
                           for f in meta.get("fingerprints", {})},
    }
    meta["wall_s_total"] = round(sum(r.get("wall_s", 0.0) for r in meta.get("runs", [])), 1)
    meta["link_calibration"] = calibrate_links([r for r in configs if r["fingerprint"] == fid], device)
    meta["link_calibration"]["fingerprint_id"] = fid
    _write_meta(out / META_JSON, meta)


def load_profile_dataset_rows(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return _read_rows(out / BLOCKS_CSV, BLOCK_COLUMNS), _read_rows(out / CONFIGS_CSV, CONFIG_COLUMNS)


# -- partitions for the CLI ----------------------------------------------------------------------------
def ensure_partitions(families: Sequence[Family], partitions_dir: str | Path, *, k: int = 3) -> list[Partition]:
    """Each family's partition under ``partitions_dir/<task>``, made when it is not there yet."""
    from loom.model.partition import PARTITION_FILE, load_partition, partition_family

    result = []
    for family in families:
        folder = Path(partitions_dir) / family.task
        if (folder / PARTITION_FILE).is_file():
            part = load_partition(folder)
            if part.k != k:
                raise ConfigError(
                    f"{folder / PARTITION_FILE}: has K={part.k} slots, asked for {k}; remove it or choose "
                    f"another partitions folder"
                )
        else:
            say(f"{family.task}: partitioning into {k} slots under {folder}")
            part = partition_family(family, folder, k=k, progress=say)
        result.append(part)
    return result


# -- the summary ---------------------------------------------------------------------------------------
def summarize(data: ProfileDataset, *, fingerprint: str | None = None) -> dict[str, Any]:
    """Block latency per task and processor, counts, composition and link calibration.

    Rows of one fingerprint only (default: the latest run's), so that a mixed dataset is
    not averaged across machines.
    """
    runs = data.meta.get("runs") or [{}]
    fid = fingerprint or runs[-1].get("fingerprint_id") or data.meta.get("fingerprint_id")
    blocks = [r for r in data.blocks if r["fingerprint"] == fid]
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for r in blocks:
        cell = table.setdefault(r["task"], {}).setdefault(r["processor"], {"ok": [], "unsupported": 0, "error": 0})
        if r["status"] == "ok":
            cell["ok"].append(r)
        else:
            cell[r["status"]] += 1
    rows = []
    for task, by_proc in sorted(table.items()):
        for proc, cell in sorted(by_proc.items()):
            ok = cell["ok"]
            lat = [r["latency_ms_median"] for r in ok]
            dense = [r["latency_ms_median"] for r in ok if "dense" in r["variants"].split(";")]
            rows.append({
                "task": task, "processor": proc, "blocks_ok": len(ok), "unsupported": cell["unsupported"],
                "errors": cell["error"],
                "median_block_ms": float(np.median(lat)) if lat else None,
                "dense_chain_sum_ms": float(sum(dense)) if dense else None,
                "median_load_ms": float(np.median([r["load_ms"] for r in ok])) if ok else None,
                "median_memory_kb": float(np.median([r["memory_bytes"] for r in ok])) / 1024 if ok else None,
            })
    return {
        "rows": {"blocks": len(data.blocks), "configs": len(data.configs)},
        "wall_s": data.meta.get("wall_s_total"),
        "block_table": rows,
        "link_calibration": data.meta.get("link_calibration", {}),
    }


def format_summary(summary: dict[str, Any]) -> str:
    def f(v: float | None, spec: str = ".3f") -> str:
        return "-" if v is None else format(v, spec)

    lines = [f"{summary['rows']['blocks']} block rows, {summary['rows']['configs']} config rows, "
             f"{f(summary['wall_s'], '.0f')} s of profiling"]
    lines.append(f"{'task':<12}{'processor':<12}{'ok':>4}{'unsup':>6}{'err':>4}{'median block ms':>17}"
                 f"{'dense chain ms':>16}{'load ms':>9}{'mem KB':>8}")
    for r in summary["block_table"]:
        lines.append(f"{r['task']:<12}{r['processor']:<12}{r['blocks_ok']:>4}{r['unsupported']:>6}{r['errors']:>4}"
                     f"{f(r['median_block_ms']):>17}{f(r['dense_chain_sum_ms']):>16}{f(r['median_load_ms'], '.1f'):>9}"
                     f"{f(r['median_memory_kb'], '.0f'):>8}")
    cal = summary["link_calibration"]
    if cal.get("n_configs"):
        lines.append(f"composition over {cal['n_configs']} placed configs (measured end to end vs predicted):")
        for name, q in cal["quality"].items():
            if "mape_pct" in q:
                lines.append(f"  {name:<26} MAPE {q['mape_pct']:6.2f}%   within +-10%: {100 * q['within_10pct']:5.1f}%"
                             f"   median error {q['median_error_pct']:+.2f}%")
        for task, q in cal.get("quality_by_task", {}).items():
            a, b = q["sum_of_blocks"], q["calibrated_leave_one_out"]
            lines.append(f"    {task:<24} n={q['n']:<3} MAPE {a['mape_pct']:6.2f}% -> {b['mape_pct']:6.2f}%   "
                         f"within +-10%: {100 * a['within_10pct']:5.1f}% -> {100 * b['within_10pct']:5.1f}%")
        for proc, d in cal.get("processors", {}).items():
            lines.append(f"  dispatch into {proc}: {d['dispatch_us']} us per request starting there "
                         f"({d['n_configs']} configs)")
        for key, link in cal["links"].items():
            bw = "not measurable" if link["bandwidth_gbps"] is None else f"{link['bandwidth_gbps']} GB/s"
            lines.append(f"  link {key}: latency {link['latency_us']} us per hand-off, bandwidth {bw} "
                         f"({link['n_configs']} configs, {link['bytes_range']} bytes)")
    return "\n".join(lines)
