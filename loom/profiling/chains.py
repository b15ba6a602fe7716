"""Placed configs: which (config, placement) pairs to measure, and measuring them end to end.

A placed config runs through the processors' workers as serving runs it
(``PlacedChain``); its row records the measured latency, the sum of its blocks'
isolated medians and every hand-off's bytes, for the link calibration.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from loom.core.progress import Progress
from loom.model.partition import Partition
from loom.processors.device import DeviceProfile
from loom.processors.workers import PlacedChain, Resident, WorkerPool
from loom.profiling.blocks import one_line, slot_inputs, warm_worker
from loom.profiling.dataset import partition_ref, utc_now
from loom.profiling.measure import sample_stats, time_samples

#: (config, placement): a variant per slot, and a processor per slot
PlacedConfig = tuple[tuple[str, ...], tuple[str, ...]]


def _random_placed(partition: Partition, supported: dict[str, list[str]], rng: random.Random,
                   n: int) -> list[PlacedConfig]:
    """Up to ``n`` distinct random configs, each on a random processor per slot that runs its block."""
    names = sorted(partition.variants)
    chosen: list[PlacedConfig] = []
    seen: set[PlacedConfig] = set()
    attempts = 0
    while len(chosen) < n and attempts < 50 * max(1, n):
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
        chosen.append((config, placement))
    return chosen


def sample_placed_configs(
    partition: Partition,
    supported: dict[str, list[str]],
    processors: Sequence[str],
    *,
    n: int,
    single_placements: int,
    seed: int,
) -> list[PlacedConfig]:
    """A seeded sample: ``n`` random configs, each on a random processor per slot among those
    that run its block, plus every all-on-one-processor placement of the first
    ``single_placements`` of them. ``supported``: block id -> processors that ran it.

    Seeded by task name too, so that adding a task does not change another's sample.
    """
    rng = random.Random(f"{seed}:{partition.task}")
    chosen = _random_placed(partition, supported, rng, n)
    seen = set(chosen)
    for config, _ in chosen[:single_placements]:
        blocks = [partition.variants[v][s] for s, v in enumerate(config)]
        for proc in processors:
            placement = tuple([proc] * partition.k)
            if all(proc in supported.get(b, []) for b in blocks) and (config, placement) not in seen:
                seen.add((config, placement))
                chosen.append((config, placement))
    return chosen


def _chain_cells(chain: PlacedChain, feeds: dict[str, np.ndarray], *, warmup: int, repeats: int) -> dict[str, Any]:
    """A loaded chain's row cells: its end-to-end latency figures and what crossed each boundary."""
    env = chain.run(feeds, keep_all=True)
    transfers = chain.transfers(env)
    inputs = {n: feeds[n] for n in chain.segments[0].reads}
    stats = sample_stats(time_samples(lambda: chain.run(inputs), warmup=warmup, repeats=repeats))
    return {
        "status": "ok",
        "measured_ms_median": stats["median"],
        "measured_ms_p90": stats["p90"],
        "measured_ms_min": stats["min"],
        "repeats": repeats,
        "transfer_bytes": sum(t.nbytes for t in transfers),
        "n_transfers": len(transfers),
        "transfers": ";".join(f"{t.src}>{t.dst}@{t.slot}={t.nbytes}" for t in transfers),
    }


def measure_config(
    part: Partition,
    ref: str,
    config: tuple[str, ...],
    placement: tuple[str, ...],
    pool: WorkerPool,
    resident: Resident,
    feeds: dict[str, np.ndarray],
    latency: Mapping[tuple[str, str, str], float],
    *,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """One placed config end to end: a ``configs.csv`` row (without its fingerprint).

    Blocks load into ``resident`` and stay there for the next configs; a failure is the
    row's ``error``, never raised.
    """
    block_ids = [part.variants[v][s] for s, v in enumerate(config)]
    row: dict[str, Any] = {
        "task": part.task, "partition": ref, "config": ";".join(config), "placement": ";".join(placement),
        "block_ids": ";".join(block_ids), "error": "", "transfers": "",
        "sum_blocks_ms": sum(latency[(ref, b, p)] for b, p in zip(block_ids, placement, strict=True)),
    }
    try:
        chain = PlacedChain(part, config, placement, pool, resident=resident)
        row.update(_chain_cells(chain, feeds, warmup=warmup, repeats=repeats))
    except Exception as exc:  # recorded, never fatal
        row.update(status="error", error=one_line(exc))
    row["measured_at"] = utc_now()
    return row


def release_all(pool: WorkerPool, resident: Resident) -> None:
    """Release every block of ``resident`` on its processor, and empty the map."""
    futures = [pool[proc].release(block) for (proc, _), block in resident.items()]
    for f in futures:
        f.result()
    resident.clear()


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
            warm_worker(pool[proc])
        feeds = slot_inputs(part, part.family())[0]
        for config, placement in pairs:
            t0 = time.perf_counter()
            row = measure_config(part, ref, tuple(config), tuple(placement), pool, resident, feeds, table,
                                 warmup=warmup, repeats=repeats)
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            bar.update(note=row["placement"])
    finally:
        release_all(pool, resident)
        pool.close()
    return rows
