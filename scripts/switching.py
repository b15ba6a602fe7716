"""Differential switching: what a config switch costs when only missing blocks are loaded.

Used by ``bench_memory.py`` and, across tasks (``to=``), ``bench_sharing.py`` (the runtime
does not switch configs this way yet).

A runtime serving config A of a task that is told to serve config B can either

- **differential**: keep the blocks A and B share, release A's other blocks, and load
  only B's missing ones (On-Demand Multi-Task Sparsity's block-granular switch), or
- **monolithic**: release the whole A model and load the whole B model, as a runtime
  without blocks does. The whole model is the config's merged ONNX
  (``loom.model.stitch.merge_config``), written to a temporary file once, outside timing.

``switch_cost`` times one switch both ways; ``measure_switches`` repeats it over pairs
of configs and reports medians. The timed part of each is release + load on the
backend, reading the files from disk.

Cold and warm page cache. ``cold=True`` asks the kernel to drop the files about to be
loaded from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``: no root needed,
unlike ``/proc/sys/vm/drop_caches``). It is *advisory*: the kernel keeps pages that are
dirty (we fsync first), mapped by some process, or that it chooses to keep, and
``posix_fadvise`` does not exist outside POSIX (macOS, Windows), where ``cold`` has no
effect and rows say ``page_cache_dropped: False``. ``cold=False`` reads every file once
before timing, so that a warm measurement is warm for blocks never loaded before too.

Releases are inside the timing on both sides. The onnxruntime backend runs
``gc.collect()`` on every release, so a differential switch that releases several
blocks pays it several times and the monolithic one once: a bias against the
differential switch, kept because it is what the runtime pays. On small blocks that
collection (~0.1 s in a test process) dwarfs the load (~5 ms), so the load part is
also reported alone (``*_load_s``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backends.base import Backend, LoadedBlock
from loom.core.errors import ManifestError
from loom.core.onnxutil import save_model
from loom.model.blockstore import BlockStore
from loom.model.partition import Partition
from loom.model.stitch import check_config, merge_config

Config = tuple[str, ...]


# -- page cache -------------------------------------------------------------------------------
def drop_page_cache(paths: Iterable[str | Path]) -> bool:
    """Advise the kernel to evict ``paths`` from the page cache; False where it cannot be asked.

    Advisory (see the module notes): a True return means the advice was given, not that
    every page left memory. Dirty pages cannot be dropped, so each file is fsynced first
    (a file just written, such as a merged model, would otherwise stay cached).
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            # some file systems refuse fsync on a read-only fd: advise anyway
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def warm_page_cache(paths: Iterable[str | Path]) -> None:
    """Read each file once, so that the timed load finds it in the page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


# -- where blocks come from ---------------------------------------------------------------------
class _Source:
    """A partition or a task of a block store, seen the same way: config -> block files."""

    def __init__(self, source: Partition | BlockStore, task: str | None) -> None:
        self.store: BlockStore | None = None
        if isinstance(source, BlockStore):
            if task is None:
                names = source.task_names()
                if len(names) != 1:
                    raise ManifestError(
                        f"{source.index_path}: the store holds tasks {names}: name one (task=...)"
                    )
                task = names[0]
            self.store = source
            self.task = task
            # merge_config and check_config read a Partition; the store's view reads the
            # store's (verified) files
            self.partition = source.partition(task)
        else:
            if task is not None and task != source.task:
                raise ManifestError(f"{source.root}: the partition is of task {source.task!r}, not {task!r}")
            self.partition = source
            self.task = source.task

    def blocks_of(self, config: Sequence[str]) -> list[str]:
        config = check_config(self.partition, config)
        if self.store is not None:
            return self.store.blocks_of(self.task, config)
        return [self.partition.variants[v][s] for s, v in enumerate(config)]

    def path(self, block_id: str) -> Path:
        if self.store is not None:
            return self.store.path(block_id)
        return self.partition.block_path(block_id)

    def size(self, block_id: str) -> int:
        # the file's size, not the recorded one: bytes read from disk is what is compared
        return self.path(block_id).stat().st_size


def _unique(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(ids))


# -- one switch -----------------------------------------------------------------------------------
@dataclass
class SwitchCost:
    """One switch measured both ways (seconds: release + load; bytes: files loaded)."""

    from_config: Config
    to_config: Config
    differential_s: float
    monolithic_s: float
    #: the load part alone of each (the rest is release: see the module notes on gc)
    differential_load_s: float
    monolithic_load_s: float
    bytes_differential: int
    bytes_monolithic: int
    blocks_loaded: list[str]
    blocks_released: list[str]
    blocks_kept: list[str]
    cold: bool
    #: whether the page cache could be asked to drop the files (cold runs only)
    page_cache_dropped: bool

    @property
    def speedup(self) -> float | None:
        """monolithic / differential time; None when the differential switch took no time."""
        return self.monolithic_s / self.differential_s if self.differential_s > 0 else None


class Switcher:
    """Measures switches of one task on one backend; merged models are written once.

    Use as a context manager (or call ``close``) to delete the temporary merged models.
    """

    def __init__(
        self,
        source: Partition | BlockStore,
        backend: Backend,
        *,
        task: str | None = None,
        workdir: str | Path | None = None,
    ) -> None:
        self.source = _Source(source, task)
        self.backend = backend
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="loom-switch-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._merged: dict[Config, Path] = {}

    def __enter__(self) -> Switcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def merged_path(self, config: Sequence[str]) -> Path:
        """The config's merged ONNX file, written (and fsynced) on first use."""
        config = check_config(self.source.partition, config)
        if config not in self._merged:
            name = hashlib.sha256("\0".join(config).encode()).hexdigest()[:16]
            path = save_model(merge_config(self.source.partition, config), self.workdir / f"{name}.onnx")
            self._merged[config] = path
        return self._merged[config]

    def _prepare(self, paths: list[Path], cold: bool) -> bool:
        if cold:
            return drop_page_cache(paths)
        warm_page_cache(paths)
        return False

    def differential(self, from_config: Sequence[str], to_config: Sequence[str], *, cold: bool,
                     to: Switcher | None = None) -> dict[str, Any]:
        """Time releasing the from-only blocks and loading the missing ones (``to``: the
        switcher of the task switched to, when it is another one; blocks are matched by id)."""
        dst = to or self
        from_ids = _unique(self.source.blocks_of(from_config))
        to_ids = _unique(dst.source.blocks_of(to_config))
        missing = [b for b in to_ids if b not in from_ids]
        drop = [b for b in from_ids if b not in to_ids]
        kept = [b for b in from_ids if b in to_ids]
        resident: dict[str, LoadedBlock] = {}
        try:
            for b in from_ids:  # the state before the switch, untimed
                resident[b] = self.backend.load(self.source.path(b), block_id=b)
            paths = {b: dst.source.path(b) for b in missing}  # verified before timing
            dropped = self._prepare(list(paths.values()), cold)
            t0 = time.perf_counter()
            for b in drop:
                self.backend.release(resident.pop(b))
            t1 = time.perf_counter()
            for b in missing:
                resident[b] = self.backend.load(paths[b], block_id=b)
            t2 = time.perf_counter()
            # nothing to release or load is no work, not a few ns of loop overhead
            seconds = t2 - t0 if (missing or drop) else 0.0
            load_seconds = t2 - t1 if missing else 0.0
        finally:
            for blk in resident.values():
                self.backend.release(blk)
        return {
            "seconds": seconds,
            "load_seconds": load_seconds,
            "bytes": sum(dst.source.size(b) for b in missing),
            "loaded": missing,
            "released": drop,
            "kept": kept,
            "page_cache_dropped": dropped,
        }

    def monolithic(self, from_config: Sequence[str], to_config: Sequence[str], *, cold: bool,
                   to: Switcher | None = None) -> dict[str, Any]:
        """Time releasing the whole from-model and loading the whole to-model (``to``: as
        in ``differential``).

        When both configs are made of the same blocks the models are the same and a
        monolithic runtime does not switch either: 0 s, 0 bytes.
        """
        other = to or self
        if self.source.blocks_of(from_config) == other.source.blocks_of(to_config):
            return {"seconds": 0.0, "load_seconds": 0.0, "bytes": 0, "page_cache_dropped": False}
        src, dst = self.merged_path(from_config), other.merged_path(to_config)
        loaded: LoadedBlock | None = self.backend.load(src, block_id="monolithic-from")
        new: LoadedBlock | None = None
        try:
            dropped = self._prepare([dst], cold)
            t0 = time.perf_counter()
            self.backend.release(loaded)
            loaded = None
            t1 = time.perf_counter()
            new = self.backend.load(dst, block_id="monolithic-to")
            t2 = time.perf_counter()
            seconds, load_seconds = t2 - t0, t2 - t1
        finally:
            for blk in (loaded, new):
                if blk is not None:
                    self.backend.release(blk)
        return {
            "seconds": seconds,
            "load_seconds": load_seconds,
            "bytes": dst.stat().st_size,
            "page_cache_dropped": dropped,
        }

    def measure(
        self, from_config: Sequence[str], to_config: Sequence[str], *, cold: bool, monolithic_first: bool = False,
        to: Switcher | None = None,
    ) -> SwitchCost:
        """Both ways once; ``monolithic_first`` swaps the order (repeats alternate it, so
        that allocator state left by one does not always favour the other); ``to``: the
        switcher of another task, for a switch across tasks."""
        if monolithic_first:
            mono = self.monolithic(from_config, to_config, cold=cold, to=to)
            diff = self.differential(from_config, to_config, cold=cold, to=to)
        else:
            diff = self.differential(from_config, to_config, cold=cold, to=to)
            mono = self.monolithic(from_config, to_config, cold=cold, to=to)
        return SwitchCost(
            from_config=tuple(from_config),
            to_config=tuple(to_config),
            differential_s=diff["seconds"],
            monolithic_s=mono["seconds"],
            differential_load_s=diff["load_seconds"],
            monolithic_load_s=mono["load_seconds"],
            bytes_differential=diff["bytes"],
            bytes_monolithic=mono["bytes"],
            blocks_loaded=diff["loaded"],
            blocks_released=diff["released"],
            blocks_kept=diff["kept"],
            cold=cold,
            page_cache_dropped=bool(diff["page_cache_dropped"] or mono["page_cache_dropped"]),
        )


def switch_cost(
    source: Partition | BlockStore,
    backend: Backend,
    from_config: Sequence[str],
    to_config: Sequence[str],
    *,
    cold: bool,
    task: str | None = None,
) -> SwitchCost:
    """One switch from ``from_config`` to ``to_config``, differential and monolithic.

    ``source`` is a partition or a block store (``task`` names the store's task when it
    holds several).
    """
    with Switcher(source, backend, task=task) as sw:
        return sw.measure(from_config, to_config, cold=cold)


def measure_switches(
    source: Partition | BlockStore,
    backend: Backend,
    pairs: Iterable[tuple[Sequence[str], Sequence[str]]],
    *,
    repeats: int = 3,
    cold: bool = False,
    task: str | None = None,
) -> list[dict[str, Any]]:
    """Rows, one per (from, to) pair: median seconds over ``repeats`` both ways, bytes, speedup.

    Keys: ``from``, ``to`` (configs as tuples), ``differential_s``, ``monolithic_s``,
    ``differential_load_s``, ``monolithic_load_s`` (the load part alone),
    ``bytes_differential``, ``bytes_monolithic``, ``speedup`` (monolithic /
    differential; None when the differential switch took no time), ``blocks_loaded``,
    ``blocks_released``, ``blocks_kept`` (counts), ``repeats``, ``cold``,
    ``page_cache_dropped``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with Switcher(source, backend, task=task) as sw:
        return [summarize_runs([sw.measure(from_config, to_config, cold=cold, monolithic_first=bool(i % 2))
                                for i in range(repeats)])
                for from_config, to_config in pairs]


def summarize_runs(runs: Sequence[SwitchCost]) -> dict[str, Any]:
    """One row of ``measure_switches`` from the repeats of one switch: medians, bytes, counts."""
    first = runs[0]
    diff_s = statistics.median(r.differential_s for r in runs)
    mono_s = statistics.median(r.monolithic_s for r in runs)
    return {
        "from": first.from_config,
        "to": first.to_config,
        "differential_s": diff_s,
        "monolithic_s": mono_s,
        "differential_load_s": statistics.median(r.differential_load_s for r in runs),
        "monolithic_load_s": statistics.median(r.monolithic_load_s for r in runs),
        "bytes_differential": first.bytes_differential,
        "bytes_monolithic": first.bytes_monolithic,
        "speedup": mono_s / diff_s if diff_s > 0 else None,
        "blocks_loaded": len(first.blocks_loaded),
        "blocks_released": len(first.blocks_released),
        "blocks_kept": len(first.blocks_kept),
        "repeats": len(runs),
        "cold": first.cold,
        "page_cache_dropped": any(r.page_cache_dropped for r in runs),
    }


def cost_as_dict(cost: SwitchCost) -> dict[str, Any]:
    """A ``SwitchCost`` as plain data (for JSON reports), speedup included."""
    return {**asdict(cost), "speedup": cost.speedup}
