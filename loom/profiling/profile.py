"""``loom profile``: measure blocks on a device's processors, and a sample of placed configs.

``profile_device`` runs the two passes (every block on every processor that runs it,
then a seeded sample of placed configs end to end), appends rows to the dataset as they
are measured, resumes what a run under the same fingerprint already measured, and
writes the link calibration into ``meta.json``. What is measured and why, and the
dataset's format: ``docs/profiling.md``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loom.core.errors import ConfigError, ProfileMismatchError
from loom.core.progress import Progress
from loom.model.partition import Partition
from loom.processors.device import DeviceProfile
from loom.processors.workers import Resident, WorkerPool
from loom.profiling.blocks import measure_block, one_line, slot_inputs, warm_worker
from loom.profiling.chains import PlacedConfig, measure_config, release_all, sample_placed_configs
from loom.profiling.dataset import (
    BLOCK_COLUMNS,
    BLOCKS_CSV,
    CONFIG_COLUMNS,
    CONFIGS_CSV,
    FORMAT_VERSION,
    META_JSON,
    STATUSES,
    ProfileDataError,
    ProfileDataset,
    RowWriter,
    drop_partial_line,
    load_profile_dataset,
    load_profile_dataset_rows,
    partition_ref,
    read_meta,
    utc_now,
    write_meta,
)
from loom.profiling.fingerprint import fingerprint_diff, fingerprint_id, hardware_fingerprint
from loom.profiling.links import calibrate_links

# The passes call these through this module's names, so that a test can stand in for them.
_measure_block = measure_block
_measure_config = measure_config

NOTES = (
    "Latencies in ms at batch 1 on real input activations, each measured on the processor's pinned "
    "worker thread; partition paths are relative to the repository root unless absolute; "
    "bandwidth_gbps is gigabytes per second."
)


@dataclass
class _RunCounts:
    blocks_measured: int = 0
    blocks_skipped: int = 0
    configs_measured: int = 0
    configs_skipped: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class _Run:
    """What the passes of one run share: the device, its workers, the settings, the counts."""

    device: DeviceProfile
    procs: list[str]
    fid: str
    pool: WorkerPool
    warmup: int
    repeats: int
    progress: bool
    counts: _RunCounts = field(default_factory=_RunCounts)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- meta.json ----------------------------------------------------------------------------------------
def _open_meta(out: Path, fp: dict[str, Any], fid: str, *, resume: bool, allow_mixed: bool) -> dict[str, Any]:
    """The dataset's meta to extend: new, or the one there when its fingerprint is ours
    (or ``allow_mixed``); ``ProfileMismatchError`` otherwise, naming the differences."""
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
    meta = read_meta(meta_path)
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


def _start_run(out: Path, meta: dict[str, Any], device: DeviceProfile, partitions: Sequence[Partition],
               fid: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Append this run to ``meta.json`` (status ``running``) and write it; the run's record."""
    run = {"started": utc_now(), "fingerprint_id": fid, "status": "running", "loadavg_at_start": _loadavg(),
           "settings": settings}
    meta["runs"] = [*meta.get("runs", []), run]
    meta["device"] = device.name
    meta["partitions"] = {**meta.get("partitions", {}), **{p.task: partition_ref(p.root) for p in partitions}}
    meta["columns"] = {"blocks": BLOCK_COLUMNS, "configs": CONFIG_COLUMNS}
    meta["notes"] = NOTES
    write_meta(out / META_JSON, meta)
    return run


def _end_run(run: dict[str, Any], counts: _RunCounts, t_start: float) -> None:
    run["finished"] = utc_now()
    # other work on the machine during a run is the first suspect for noisy figures
    run["loadavg_at_end"] = _loadavg()
    run["wall_s"] = round(time.perf_counter() - t_start, 1)
    run.update({k: v for k, v in counts.__dict__.items() if k != "errors"})
    run["errors"] = counts.errors[:50]


def _finish_meta(out: Path, meta: dict[str, Any], device: DeviceProfile, fid: str) -> None:
    """Counts over the whole dataset, and the link calibration on this fingerprint's rows."""
    try:
        blocks, configs = load_profile_dataset_rows(out)
    except ProfileDataError as exc:
        meta["problem"] = str(exc)
        write_meta(out / META_JSON, meta)
        return
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
    write_meta(out / META_JSON, meta)


def _measured_so_far(out: Path, fid: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The block and config rows already measured under ``fid`` (a torn last row dropped)."""
    for name in (BLOCKS_CSV, CONFIGS_CSV):
        if (out / name).is_file():
            drop_partial_line(out / name)
    if not (out / META_JSON).is_file():
        return [], []
    existing = load_profile_dataset(out)
    return ([r for r in existing.blocks if r["fingerprint"] == fid],
            [r for r in existing.configs if r["fingerprint"] == fid])


# -- the passes ---------------------------------------------------------------------------------------
def _skipped(bar: Progress, task: str, n: int) -> None:
    if n:
        bar.update(n, note=f"{task}: {n} already measured")


def _block_row(run: _Run, part: Partition, ref: str, bid: str, proc: str,
               envs: list[dict[str, Any]]) -> dict[str, Any]:
    """Measure one block on one processor: its ``blocks.csv`` row, failures included."""
    info = part.blocks[bid]
    row: dict[str, Any] = {
        "fingerprint": run.fid, "task": part.task, "partition": ref, "block_id": bid,
        "block_file": info.file, "slot": info.slot, "variants": ";".join(info.variants),
        "precision": info.precision, "macs": info.macs, "processor": proc,
        "backend": run.device.processor(proc).backend, "unsupported_ops": "", "error": "",
        "size_bytes": part.block_path(bid).stat().st_size,
    }
    try:
        row.update(_measure_block(run.pool[proc], part.block_path(bid), bid, envs[info.slot],
                                  warmup=run.warmup, repeats=run.repeats))
    except Exception as exc:  # recorded, never fatal: one bad block must not stop a profile
        row.update(status="error", error=one_line(exc))
        run.counts.errors.append(f"{part.task} {bid} on {proc}: {row['error']}")
    row["measured_at"] = utc_now()
    return row


def _measure_blocks(run: _Run, partitions: Sequence[Partition], done: set[tuple[str, str, str]],
                    writer: RowWriter) -> list[dict[str, Any]]:
    """The block pass: every block not yet measured on every processor; the new rows."""
    total = sum(len(p.blocks) for p in partitions) * len(run.procs)
    bar = Progress(total, f"profile {run.device.name}: blocks x processors", enabled=run.progress)
    warmed: set[str] = set()
    rows = []
    for part in partitions:
        ref = partition_ref(part.root)
        todo = [(bid, proc) for bid in part.blocks for proc in run.procs if (ref, bid, proc) not in done]
        skipped = len(part.blocks) * len(run.procs) - len(todo)
        run.counts.blocks_skipped += skipped
        _skipped(bar, part.task, skipped)
        if not todo:
            continue
        envs = slot_inputs(part, part.family())
        for bid, proc in todo:
            if proc not in warmed:
                warm_worker(run.pool[proc])
                warmed.add(proc)
            row = _block_row(run, part, ref, bid, proc, envs)
            writer.write(row)
            rows.append(row)
            run.counts.blocks_measured += 1
            bar.update(note=f"{part.task} slot {part.blocks[bid].slot} on {proc}: {row['status']}")
    return rows


def _config_samples(run: _Run, partitions: Sequence[Partition], latency: dict[tuple[str, str, str], float], *,
                    n: int, single_placements: int, seed: int) -> list[tuple[Partition, list[PlacedConfig]]]:
    """Each partition's sample of placed configs, among the processors that ran each block."""
    plans = []
    for part in partitions:
        ref = partition_ref(part.root)
        supported: dict[str, list[str]] = {}
        for (pref, bid, proc) in latency:
            if pref == ref:
                supported.setdefault(bid, []).append(proc)
        plans.append((part, sample_placed_configs(part, supported, run.procs, n=n,
                                                  single_placements=single_placements, seed=seed)))
    return plans


def _measure_configs(run: _Run, plans: list[tuple[Partition, list[PlacedConfig]]], done: set[tuple[str, str, str]],
                     latency: dict[tuple[str, str, str], float], writer: RowWriter) -> None:
    """The config pass: each sampled placed config not yet measured, end to end."""
    bar = Progress(sum(len(s) for _, s in plans), f"profile {run.device.name}: placed configs", enabled=run.progress)
    for part, sample in plans:
        ref = partition_ref(part.root)
        todo = [(c, pl) for c, pl in sample if (ref, ";".join(c), ";".join(pl)) not in done]
        run.counts.configs_skipped += len(sample) - len(todo)
        _skipped(bar, part.task, len(sample) - len(todo))
        if not todo:
            continue
        feeds = slot_inputs(part, part.family())[0]
        resident: Resident = {}
        try:
            for config, placement in todo:
                row = _measure_config(part, ref, config, placement, run.pool, resident, feeds, latency,
                                      warmup=run.warmup, repeats=run.repeats)
                row["fingerprint"] = run.fid
                if row["status"] == "error":
                    run.counts.errors.append(f"{part.task} {row['config']} on {row['placement']}: {row['error']}")
                writer.write(row)
                run.counts.configs_measured += 1
                bar.update(note=f"{part.task} {row['placement']}")
        finally:
            release_all(run.pool, resident)


# -- the driver ---------------------------------------------------------------------------------------
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
    block_rows, config_rows = _measured_so_far(out, fid)
    record = _start_run(out, meta, device, partitions, fid, {
        "warmup": warmup, "repeats": repeats, "config_samples": config_samples,
        "single_placements": single_placements, "seed": seed, "processors": procs})
    t_start = time.perf_counter()
    blocks_w = RowWriter(out / BLOCKS_CSV, list(BLOCK_COLUMNS))
    configs_w = RowWriter(out / CONFIGS_CSV, list(CONFIG_COLUMNS))
    run = _Run(device, procs, fid, WorkerPool(device), warmup, repeats, progress)
    try:
        for proc in procs:  # an engine missing here stops the run now, naming its processor
            run.pool[proc]
        done_blocks = {(r["partition"], r["block_id"], r["processor"]) for r in block_rows}
        block_rows += _measure_blocks(run, partitions, done_blocks, blocks_w)
        latency = {(r["partition"], r["block_id"], r["processor"]): r["latency_ms_median"]
                   for r in block_rows if r["status"] == "ok"}
        plans = _config_samples(run, partitions, latency, n=config_samples,
                                single_placements=single_placements, seed=seed)
        done_configs = {(r["partition"], r["config"], r["placement"]) for r in config_rows}
        _measure_configs(run, plans, done_configs, latency, configs_w)
        record["status"] = "finished"
    except BaseException as exc:
        record["status"] = f"interrupted: {type(exc).__name__}"
        raise
    finally:
        run.pool.close()
        blocks_w.close()
        configs_w.close()
        _end_run(record, run.counts, t_start)
        _finish_meta(out, meta, device, fid)
    return load_profile_dataset(out)
