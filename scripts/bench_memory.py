"""The memory benchmark: a budget sweep, differential switching, sharing-aware ordering.

On the host device profile with the tasks of ``configs/serve.yaml`` (as configured: the
mid-run SLO change of ``image-cls`` at 10 s falls inside runs of ``--duration`` > 10 s
only), three parts:

- **budget sweep**: the *all-resident memory* is what every (block, processor) pair
  of sparseloom's candidate plans (at the start and after each SLO change) holds when
  loaded. Two counts of it: the host profile dataset's measured ``memory_bytes`` (the
  RSS growth across a load of each block alone; the block file's size where a pair was
  not measured), and what the runtime itself counts resident after preloading them all
  (the same kind of measurement, taken while both processors load at once: it comes out
  about 4x larger, see ``all_resident`` in the JSON). The budget enforces the runtime's
  count, so the shares are of that one by default (``--basis runtime``; it is measured in
  sparseloom's all-preloaded run, which runs first); ``--basis dataset`` takes the
  dataset's. For each ``--fracs`` share, sparseloom and ``av-p`` serve the same seeded
  trace with ``memory_budget_mb`` set to it (the preloader keeps the hottest blocks, the
  rest load on demand), real inference; and each once with no budget (everything
  preloaded), the reference rows. Work still queued ``--drain-grace`` seconds after the
  trace is cancelled and counts as violated (under a thrashing budget the drain takes
  minutes). Each run is a child process of its own (``--in-process`` to share one), so
  that its peak RSS is not inflated by what the runs before it left to the allocator;
- **switching**: for each task, ordered pairs of configs (every pair of the uniform
  configs of ``dense``, ``int8``, ``structured-50``, ``fp16``, plus seeded stitched pairs
  that differ in one or two slots), switched differentially (load only the missing
  blocks) and monolithically (unload the whole model, load the other whole model) on
  the onnxruntime processor's backend (``scripts/switching.py``: ``measure_switches``), warm and
  cold page cache separately; across tasks only where the tasks share blocks;
- **ordering**: FIFO, EDF, the backbone DP (where it applies) and the sharing-aware
  greedy on queues of jobs under tight memory (``placement.ordering.compare_policies``):
  the synthetic shared-backbone instances, and instances made of the zoo's real blocks
  (measured sizes and load times of the host dataset).

Writes ``{"budget_sweep": [{"budget_frac", "policy", "slo_violation_rate",
"peak_rss_mb", ...}], "switch": {"mean_speedup_vs_monolithic", "pairs", ...},
"ordering": [{"policy", "deadline_hit_rate", ...}], "aims": {...}, ...}``, a table, and
plots beside the JSON (violation rate against the budget; memory over time). ``--zoo``: the
zoo the config's tasks come from (the edge zoo by default; ``embedded`` for
``configs/serve.yaml``), recorded as ``zoo``; the script stops with one line if the
config's tasks are not in it or have no profile data.

    python scripts/bench_memory.py --out out/bench_memory.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_check import zoo_config  # noqa: E402

from loom.core.progress import say  # noqa: E402

Key = tuple[str, str]  # (block id, processor)
Config = tuple[str, ...]

#: the uniform configs whose every ordered pair is switched (those the task has)
UNIFORM_VARIANTS = ("dense", "int8", "structured-50", "fp16")
#: the issue's aims (points of violation rate)
AIM_TOLERANCE = 0.027
AIM_SWITCH_SPEEDUP = 8.0


# -- pure helpers (tested) ---------------------------------------------------------------------
def measured_table(rows: Iterable[Mapping[str, Any]]) -> dict[Key, dict[str, float]]:
    """(block, processor) -> median ``memory_bytes``, ``load_ms``, ``latency_ms`` of the ``ok`` rows.

    Rows as ``loom.profiling.dataset.ProfileDataset.blocks``; a column that is empty in every row of
    a pair is left out of its entry.
    """
    grouped: dict[Key, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            grouped.setdefault((r["block_id"], r["processor"]), []).append(r)
    out: dict[Key, dict[str, float]] = {}
    for key, rs in grouped.items():
        entry: dict[str, float] = {}
        for col, name in (("memory_bytes", "memory_bytes"), ("load_ms", "load_ms"),
                          ("latency_ms_median", "latency_ms")):
            vals = [float(r[col]) for r in rs if r.get(col) is not None]
            if vals:
                entry[name] = statistics.median(vals)
        out[key] = entry
    return out


def candidate_keys(plans_by_task: Mapping[str, Sequence[Any]]) -> set[Key]:
    """The distinct (block, processor) pairs of every plan (anything with ``block_ids``, ``placement``)."""
    return {k for plans in plans_by_task.values() for p in plans
            for k in zip(p.block_ids, p.placement, strict=True)}


def all_resident(keys: Iterable[Key], measured: Mapping[Key, Mapping[str, float]],
                 file_size: Callable[[str], int]) -> dict[str, Any]:
    """Bytes every pair in ``keys`` holds when resident: measured ``memory_bytes``, else the block file's size.

    A measured 0 (the allocator reused freed pages) counts as the file's size too.
    """
    total, by_proc = 0, {}
    measured_pairs, fallback = 0, []
    for b, p in sorted(set(keys)):
        m = measured.get((b, p), {}).get("memory_bytes")
        if m is not None and m > 0:
            n, measured_pairs = int(m), measured_pairs + 1
        else:
            n = int(file_size(b))
            fallback.append([b, p])
        total += n
        by_proc[p] = by_proc.get(p, 0) + n
    return {"bytes": total, "mb": total / 2**20, "pairs": measured_pairs + len(fallback),
            "measured_pairs": measured_pairs, "file_size_pairs": fallback,
            "mb_by_processor": {p: n / 2**20 for p, n in sorted(by_proc.items())}}


def memory_saved_at_equal_violation(rates: Mapping[float, float | None], reference: float | None,
                                    tolerance: float = AIM_TOLERANCE) -> dict[str, Any]:
    """The smallest budget share whose violation rate is within ``tolerance`` of ``reference``.

    ``rates``: budget share -> violation rate. ``frac``: the smallest share from which on
    every larger measured share is within tolerance too (robust to one lucky run);
    ``first_frac``: the smallest share within tolerance at all. ``saved``: 1 - ``frac``.
    None where no share qualifies (or the reference is missing).
    """
    fracs = sorted(f for f, v in rates.items() if v is not None)
    out: dict[str, Any] = {"tolerance": tolerance, "reference": reference, "frac": None, "first_frac": None,
                           "saved": None}
    if reference is None or not fracs:
        return out
    ok = {f: rates[f] <= reference + tolerance + 1e-12 for f in fracs}
    first = next((f for f in fracs if ok[f]), None)
    stable = None
    for f in reversed(fracs):
        if not ok[f]:
            break
        stable = f
    out.update(first_frac=first, frac=stable, saved=None if stable is None else 1.0 - stable)
    return out


def uniform_pairs(variants: Sequence[str], k: int, wanted: Sequence[str] = UNIFORM_VARIANTS) -> list[tuple[Config, Config]]:
    """Every ordered pair of distinct uniform configs of the ``wanted`` variants the task has."""
    have = [v for v in wanted if v in variants]
    return [((a,) * k, (b,) * k) for a, b in itertools.permutations(have, 2)]


def stitched_pairs(variants: Sequence[str], k: int, n: int, seed: int, *, max_diff: int = 2) -> list[tuple[Config, Config]]:
    """``n`` distinct ordered pairs of random configs that differ in 1 to ``max_diff`` slots (seeded)."""
    rng = random.Random(seed)
    names = sorted(variants)
    if len(names) < 2 or k < 1:
        return []
    out: list[tuple[Config, Config]] = []
    seen: set[tuple[Config, Config]] = set()
    for _ in range(200 * max(n, 1)):
        if len(out) >= n:
            break
        a = tuple(rng.choice(names) for _ in range(k))
        slots = rng.sample(range(k), rng.randint(1, min(max_diff, k)))
        b = list(a)
        for s in slots:
            b[s] = rng.choice([v for v in names if v != a[s]])
        pair = (a, tuple(b))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def shares_between_tasks(blocks_by_task: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Block id -> tasks, for the blocks more than one task uses."""
    users: dict[str, set[str]] = {}
    for t, ids in blocks_by_task.items():
        for b in ids:
            users.setdefault(b, set()).add(t)
    return {b: sorted(ts) for b, ts in sorted(users.items()) if len(ts) > 1}


def summarize_switches(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean / geometric mean / median of the per-pair speedups (total and load-only), and bytes."""
    def stats(xs: list[float]) -> dict[str, float | None]:
        if not xs:
            return {"mean": None, "geomean": None, "median": None, "min": None, "max": None}
        return {"mean": statistics.fmean(xs), "geomean": math.exp(statistics.fmean(math.log(x) for x in xs)),
                "median": statistics.median(xs), "min": min(xs), "max": max(xs)}

    total = [r["speedup"] for r in rows if r.get("speedup")]
    load = [r["monolithic_load_s"] / r["differential_load_s"] for r in rows
            if r.get("differential_load_s") and r.get("monolithic_load_s")]
    bd = sum(r["bytes_differential"] for r in rows)
    bm = sum(r["bytes_monolithic"] for r in rows)
    return {"pairs": len(rows), "speedup": stats(total), "load_only_speedup": stats(load),
            "bytes_differential": bd, "bytes_monolithic": bm,
            "bytes_share": bd / bm if bm else None,
            "seconds_ratio": (sum(r["monolithic_s"] for r in rows) / sum(r["differential_s"] for r in rows)
                              if sum(r["differential_s"] for r in rows) > 0 else None)}


def zoo_ordering_instance(seed: int, tasks: Mapping[str, Mapping[str, Sequence[str]]],
                          sizes: Mapping[str, int], load_ms: Mapping[str, float], exec_ms: Mapping[str, float], *,
                          n_jobs: int = 8, configs_per_task: int = 3, capacity_jobs: float = 2.5,
                          slack: tuple[float, float] = (1.5, 0.6)) -> Any:
    """A queue of ``n_jobs`` requests on one processor, made of real blocks, under tight memory.

    ``tasks``: task -> {variant: [block id per slot]}; ``sizes``, ``load_ms``,
    ``exec_ms``: per block. Each task has a small pool of ``configs_per_task`` random
    stitched configs (a runtime's candidate plans), each job one config of a random
    task; jobs are all queued at ``now``. Capacity is ``capacity_jobs`` times the mean
    job's bytes (at least the largest job's). Deadlines: ``now`` + uniform between
    ``slack[0]`` x the mean job's cold cost (all loads + compute) and ``slack[1]`` x the
    cold cost of the whole queue, so that running everything cold misses some.
    """
    from placement.ordering import Instance, Job

    rng = random.Random(seed)
    pools: dict[str, list[tuple[str, ...]]] = {}
    for t in sorted(tasks):
        variants = tasks[t]
        names = sorted(variants)
        k = len(next(iter(variants.values())))
        pool = []
        for _ in range(configs_per_task):
            cfg = [rng.choice(names) for _ in range(k)]
            pool.append(tuple(variants[v][s] for s, v in enumerate(cfg)))
        pools[t] = pool
    now = 1.0
    chains = []
    for _ in range(n_jobs):
        t = rng.choice(sorted(pools))
        chains.append(rng.choice(pools[t]))

    def cold(chain: Sequence[str]) -> float:
        return sum(load_ms[b] + exec_ms[b] for b in dict.fromkeys(chain))

    mean_cold = statistics.fmean(cold(c) for c in chains)
    queue_cold = sum(cold(c) for c in chains)
    lo = slack[0] * mean_cold
    hi = max(lo, slack[1] * queue_cold)
    jobs = []
    for i, chain in enumerate(chains):
        jobs.append(Job(f"j{i}", now - (n_jobs - i) * 1e-3, now + rng.uniform(lo, hi) / 1000.0, tuple(chain),
                        sum(exec_ms[b] for b in dict.fromkeys(chain))))
    job_bytes = [sum(sizes[b] for b in dict.fromkeys(c)) for c in chains]
    capacity = max(int(capacity_jobs * statistics.fmean(job_bytes)), max(job_bytes))
    used = {b for c in chains for b in c}
    return Instance(tuple(jobs), {b: int(sizes[b]) for b in used}, {b: float(load_ms[b]) for b in used},
                    capacity, (), now)


def lookup(rows: Sequence[Mapping[str, Any]], policy: str, frac: float | None) -> Mapping[str, Any] | None:
    for r in rows:
        if r["policy"] == policy and (r["budget_frac"] is None if frac is None else
                                      r["budget_frac"] is not None and abs(r["budget_frac"] - frac) < 1e-9):
            return r
    return None


def aims(rows: Sequence[Mapping[str, Any]], switch: Mapping[str, Any] | None) -> dict[str, Any]:
    """The issue's three aims, each with the figures it compares and whether it is met (None: not measured)."""
    def rate(policy: str, frac: float | None) -> float | None:
        r = lookup(rows, policy, frac)
        return None if r is None else r.get("slo_violation_rate")

    sl_ref, av_ref = rate("sparseloom", None), rate("av-p", None)
    sl40, sl15 = rate("sparseloom", 0.4), rate("sparseloom", 0.15)
    out: dict[str, Any] = {
        "sparseloom_40pct_within_2.7_points_of_all_preloaded": {
            "sparseloom_at_0.4": sl40, "sparseloom_all_preloaded": sl_ref,
            "points": None if sl40 is None or sl_ref is None else 100 * (sl40 - sl_ref),
            "met": None if sl40 is None or sl_ref is None else sl40 - sl_ref <= AIM_TOLERANCE + 1e-12},
        "sparseloom_15pct_better_than_av_p_all_preloaded": {
            "sparseloom_at_0.15": sl15, "av_p_all_preloaded": av_ref,
            "met": None if sl15 is None or av_ref is None else sl15 < av_ref},
    }
    mean = None if switch is None else switch.get("mean_speedup_vs_monolithic")
    out["switching_8x_faster_on_average"] = {"mean_speedup": mean,
                                             "met": None if mean is None else mean >= AIM_SWITCH_SPEEDUP}
    return out


def _all_resident_of(dep: Any) -> dict[str, Any]:
    from loom.profiling.dataset import load_profile_dataset

    data_dir = dep.dataset_dir()
    measured = measured_table(load_profile_dataset(data_dir).blocks)
    times = sorted({0.0} | {ch.at_s for t in dep.config.tasks for ch in t.slo_changes})
    keys: set[Key] = set()
    for t_s in times:
        keys |= candidate_keys(dep.candidates("sparseloom", t_s=t_s))
    paths = {b: p for task in dep.partitions for b, p in dep.block_paths(task).items()}
    info = all_resident(keys, measured, lambda b: paths[b].stat().st_size)
    info["how"] = (f"sum over the {info['pairs']} distinct (block, processor) pairs of sparseloom's candidate plans "
                   f"at t = {', '.join(f'{t:g}' for t in times)} s of the measured memory_bytes in {data_dir} "
                   "(RSS growth across the load); the block file's size for pairs without a measurement")
    info["dataset"] = str(data_dir)
    return info


def run_cell(config: str, policy: str, budget_mb: float | None, duration_s: float, *, drain_grace_s: float | None = 5.0,
             sample_s: float = 0.1) -> dict[str, Any]:
    """One policy at one budget on the config's seeded trace, in this process: a row plus memory series.

    ``drain_grace_s``: after the trace, queued work may run this long; what is left then
    is cancelled (recorded as errors, which count as violations: a request still queued
    seconds after the end has missed its bound of a few ms anyway). None: drain it all,
    which under a thrashing budget takes minutes. p50/p99 are of completed requests.
    """
    from loom.app.deployment import Deployment
    from loom.app.run import run_trace

    dep = Deployment.from_config(config)
    dep.config = dep.config.model_copy(update={"memory_budget_mb": budget_mb})
    made: list[Any] = []
    snapshot: dict[str, Any] = {}
    resident: list[tuple[float, float]] = []
    make = dep.runtime

    def runtime(*a: Any, **kw: Any) -> Any:
        rt = make(*a, **kw)
        made.append(rt)
        snapshot["t_made"] = rt.now()  # run_trace's clock starts about here
        snapshot["after_preload"] = rt.stats()["memory"]["resident_bytes"]
        close = rt.close

        def closing(*, cancel: bool = False, timeout: float | None = None) -> None:
            # what is resident before the caches are released at close
            snapshot.setdefault("at_close", rt.stats()["memory"]["resident_bytes"])
            t0 = time.perf_counter()
            close(cancel=cancel, timeout=drain_grace_s if timeout is None else timeout)
            snapshot["close_s"] = time.perf_counter() - t0
        rt.close = closing
        return rt

    dep.runtime = runtime  # type: ignore[method-assign]  # to reach the runtime run_trace makes

    def sample() -> None:
        if made:
            rt = made[0]
            resident.append((rt.now() - snapshot["t_made"], rt.stats()["memory"]["resident_bytes"] / 2**20))

    events = [(i * sample_s, sample) for i in range(int(duration_s / sample_s) + 1)]
    t0 = time.perf_counter()
    run = run_trace(dep, policy, duration_s=duration_s, events=events, progress=False)
    wall = time.perf_counter() - t0
    stats = made[0].stats() if made else {}
    o = run.summary["overall"]
    mem = stats.get("memory", {})
    after, at_close = snapshot.get("after_preload", 0) / 2**20, snapshot.get("at_close", 0) / 2**20
    row = {
        "policy": run.policy, "budget_mb": budget_mb,
        "slo_violation_rate": o["slo_violation_rate"], "goodput_rps": o["goodput_rps"],
        "throughput_rps": o["throughput_rps"], "p50_ms": o["p50_ms"], "p99_ms": o["p99_ms"], "n": o["n"],
        "cancelled_after_grace": o["errors"],
        "peak_rss_mb": run.peak_rss_mb,
        "rss_start_mb": run.rss_series[0][1] if run.rss_series else None,
        "resident_mb_after_preload": after, "resident_mb_at_end": at_close,
        "peak_resident_mb": max([v for _, v in resident] + [after, at_close]),
        "budget_peak_mb": (mem.get("peak_bytes") or 0) / 2**20 if mem.get("budget_bytes") is not None else None,
        "over_budget_loads": mem.get("over_budget"),
        "loads": sum(stats.get("loads", {}).values()), "evictions": sum(stats.get("evictions", {}).values()),
        "load_seconds": sum(stats.get("load_seconds", {}).values()),
        "preload_errors": stats.get("preload_errors", []),
        "errors": run.errors, "wall_s": wall, "close_s": snapshot.get("close_s"),
        "by_task": {t: {"slo_violation_rate": v["slo_violation_rate"], "p99_ms": v["p99_ms"]}
                    for t, v in run.summary["tasks"].items()},
    }
    return {"row": row, "rss_series": run.rss_series, "resident_series": resident}


def run_cell_isolated(config: str, policy: str, budget_mb: float | None, duration_s: float, *,
                      drain_grace_s: float | None, timeout_s: float) -> dict[str, Any]:
    """``run_cell`` in a child process (a fresh allocator: its peak RSS is its own)."""
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        out = Path(tmp) / "cell.json"
        spec = json.dumps({"config": config, "policy": policy, "budget_mb": budget_mb, "duration_s": duration_s,
                           "drain_grace_s": drain_grace_s, "out": str(out)})
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--cell", spec],
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"row": {"policy": policy, "budget_mb": budget_mb, "failed": f"timed out after {timeout_s:.0f} s"},
                    "rss_series": [], "resident_series": []}
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout or "")[-2000:]
            return {"row": {"policy": policy, "budget_mb": budget_mb,
                            "failed": f"exit {proc.returncode}: {tail}"}, "rss_series": [], "resident_series": []}
        return json.loads(out.read_text())


def budget_sweep(args: argparse.Namespace, resident: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The all-preloaded reference runs first, then every budget share (smallest first) of each policy.

    ``resident`` (the all-resident figures) gets ``basis_mb``, the megabytes the shares
    are of: the dataset's figure, or (``--basis runtime``) what the runtime itself
    counted resident after preloading everything in sparseloom's reference run.
    """
    rows: list[dict[str, Any]] = []
    series: dict[str, Any] = {}
    cells: list[tuple[float | None, str]] = [(None, p) for p in args.policies]
    cells += [(f, p) for f in sorted(args.fracs) for p in args.policies]
    resident["basis"] = args.basis
    resident["basis_mb"] = resident["mb"]
    grace = None if args.drain_grace < 0 else args.drain_grace
    for i, (frac, policy) in enumerate(cells, 1):
        if frac is not None and args.basis == "runtime" and "runtime_mb" not in resident:
            ref = next((r for r in rows if r["budget_frac"] is None and "failed" not in r
                        and r["policy"] == "sparseloom"), None) or \
                next((r for r in rows if r["budget_frac"] is None and "failed" not in r), None)
            if ref is None:
                raise SystemExit("--basis runtime: no all-preloaded run succeeded to measure the runtime's count")
            resident["runtime_mb"] = resident["basis_mb"] = ref["resident_mb_after_preload"]
            resident["runtime_how"] = (f"what the runtime counted resident (the sum of each load's measured "
                                       f"bytes) after preloading every block of {ref['policy']}'s candidates")
            say(f"all-resident memory as the runtime counts it: {resident['runtime_mb']:.1f} MB "
                f"({resident['runtime_mb'] / resident['mb']:.1f}x the dataset's {resident['mb']:.1f} MB)")
        budget = None if frac is None else frac * resident["basis_mb"]
        if args.in_process:
            cell = run_cell(args.config, policy, budget, args.duration, drain_grace_s=grace)
        else:
            cell = run_cell_isolated(args.config, policy, budget, args.duration, drain_grace_s=grace,
                                     timeout_s=args.cell_timeout)
        row = {"budget_frac": frac, "label": "all-preloaded" if frac is None else f"{frac:.0%}", **cell["row"]}
        row["policy"] = policy
        rows.append(row)
        series[f"{policy}@{row['label']}"] = {"rss": cell["rss_series"], "resident": cell["resident_series"]}
        if "failed" in row:
            say(f"[{i}/{len(cells)}] {policy} at {row['label']}: FAILED: {row['failed'][-300:]}")
            continue
        say(f"[{i}/{len(cells)}] {policy} at {row['label']} ({'no budget' if budget is None else f'{budget:.1f} MB'}): "
            f"violations {row['slo_violation_rate']:.1%}, peak RSS {row['peak_rss_mb']:.0f} MB, "
            f"resident blocks peak {row['peak_resident_mb']:.1f} MB, {row['loads']} loads, "
            f"{row['evictions']} evictions, {row['cancelled_after_grace']} cancelled, {row['wall_s']:.1f} s")
    return rows, series


# -- switching -----------------------------------------------------------------------------------
def switching(dep: Any, *, repeats: int, stitched: int, seed: int, processor: str | None) -> dict[str, Any]:
    from switching import measure_switches  # scripts/switching.py, beside this script

    from loom.model.blockstore import BlockStore

    procs = dep.device.processors
    proc = next((p for p in procs if p.name == processor), None) if processor else \
        next((p for p in procs if p.backend == "onnxruntime"), procs[0])
    if proc is None:
        raise SystemExit(f"--switch-processor {processor!r}: no such processor in {dep.device.name}")
    backend = dep.device.make_backend(proc.name)
    rows: list[dict[str, Any]] = []
    for ti, (task, part) in enumerate(sorted(dep.partitions.items())):
        pairs = [("uniform", p) for p in uniform_pairs(list(part.variants), part.k)]
        pairs += [("stitched", p) for p in stitched_pairs(list(part.variants), part.k, stitched, seed + ti)]
        for cold in (False, True):
            t0 = time.perf_counter()
            measured = measure_switches(part, backend, [p for _, p in pairs], repeats=repeats, cold=cold)
            for (kind, _), r in zip(pairs, measured, strict=True):
                rows.append({"task": task, "kind": kind, **r, "from": list(r["from"]), "to": list(r["to"])})
            say(f"switching {task} ({'cold' if cold else 'warm'} page cache): {len(pairs)} pairs x {repeats} "
                f"in {time.perf_counter() - t0:.0f} s")
    # across tasks: only where tasks share blocks (the store deduplicates by content)
    with tempfile.TemporaryDirectory(prefix="bench-memory-store-") as tmp:
        store = BlockStore(tmp)
        for part in dep.partitions.values():
            store.add_partition(part, link=False)
        shared = store.shared_blocks()
        cross = {b: sorted({t for t, _, _ in users}) for b, users in shared.items()
                 if len({t for t, _, _ in users}) > 1}
        within = len(shared) - len(cross)
    by_id = shares_between_tasks({t: list(p.blocks) for t, p in dep.partitions.items()})
    summary: dict[str, Any] = {}
    for cold in (False, True):
        for kind in ("all", "uniform", "stitched"):
            sel = [r for r in rows if r["cold"] == cold and (kind == "all" or r["kind"] == kind)]
            summary[f"{'cold' if cold else 'warm'}/{kind}"] = summarize_switches(sel)
    warm = summary["warm/all"]
    cross_switch = cross_task_switches(dep, backend, cross, repeats=repeats) if cross else {}
    return {
        "mean_speedup_vs_monolithic": warm["speedup"]["mean"],
        "definition": "mean over warm-page-cache pairs of monolithic_s / differential_s (release + load, medians "
                      "over repeats); summary holds cold, load-only and per kind",
        "processor": proc.name, "backend": proc.backend, "repeats": repeats,
        "page_cache_dropped": any(r["page_cache_dropped"] for r in rows if r["cold"]),
        "summary": summary, "pairs": rows,
        "cross_task_speedup_vs_monolithic": cross_switch.get("warm"),
        "cross_task_speedup_vs_monolithic_cold": cross_switch.get("cold"),
        "cross_task_pairs": cross_switch.get("pairs", []),
        "cross_task": {"shared_blocks": len(cross), "blocks_shared_within_a_task": within,
                       "note": ("no cross-task sharing in the zoo: its tasks have no block in common, so there is "
                                "no cross-task switch to measure") if not cross else
                       f"{len(cross)} blocks shared across tasks", "shared": cross,
                       "block_ids_in_several_tasks": len(by_id)},
    }


def cross_task_switches(dep: Any, backend: Any, cross: Mapping[str, Sequence[str]], *, repeats: int) -> dict[str, Any]:
    """Switching from one task to another that shares blocks with it (the edge zoo's two
    fashion tasks share the backbone): uniform configs of the variants both tasks have,
    both ways, differential (only the blocks the second task lacks) against monolithic,
    warm and cold page cache (``bench_sharing.switching``). Medians of the speedups."""
    # scripts/bench_sharing.py and scripts/switching.py, beside this script
    from bench_sharing import switching as switch_tasks
    from switching import Switcher

    tasks = sorted({t for users in cross.values() for t in users})
    parts = dep.partitions
    pairs = []
    for i, ta in enumerate(tasks):
        for tb in tasks[i + 1:]:
            for v in (v for v in UNIFORM_VARIANTS if v in parts[ta].variants and v in parts[tb].variants):
                ca, cb = (v,) * parts[ta].k, (v,) * parts[tb].k
                pairs += [((ta, ca), (tb, cb)), ((tb, cb), (ta, ca))]
    with contextlib.ExitStack() as stack:
        switchers = {t: stack.enter_context(Switcher(parts[t], backend)) for t in tasks}
        rows = switch_tasks(switchers, pairs, repeats=repeats)

    def median(cold: bool) -> float | None:
        xs = [r["speedup"] for r in rows if r["cold"] == cold and r["speedup"]]
        return statistics.median(xs) if xs else None

    return {"warm": median(False), "cold": median(True), "pairs": rows}


# -- ordering ---------------------------------------------------------------------------------------
def ordering(dep: Any, *, n_instances: int, n_jobs: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from loom.profiling.dataset import load_profile_dataset
    from placement.ordering import compare_policies, synthetic_backbone_instance

    def rows_of(scores: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
        return [{"instances": kind, "policy": name, "deadline_hit_rate": s.hit_rate, "hits": s.hits, "jobs": s.jobs,
                 "total_load_ms": s.total_load_ms, "per_instance_hits": list(s.per_instance_hits)}
                for name, s in scores.items()]

    t0 = time.perf_counter()
    synth = [synthetic_backbone_instance(seed + i) for i in range(n_instances)]
    rows = rows_of(compare_policies(synth), "synthetic-backbone")
    # the zoo's blocks on the onnxruntime processor: measured bytes, load and run time
    procs = dep.device.processors
    proc = next((p for p in procs if p.backend == "onnxruntime"), procs[0]).name
    measured = measured_table(load_profile_dataset(dep.dataset_dir()).blocks)
    tasks = {t: dict(p.variants) for t, p in dep.partitions.items()}
    sizes, load_ms, exec_ms = {}, {}, {}
    mean_load = statistics.fmean(v["load_ms"] for (_, p), v in measured.items() if p == proc and "load_ms" in v)
    for part in dep.partitions.values():
        for b, info in part.blocks.items():
            m = measured.get((b, proc), {})
            sizes[b] = int(m.get("memory_bytes") or info.size_bytes)
            load_ms[b] = float(m.get("load_ms", mean_load))
            exec_ms[b] = float(m.get("latency_ms", 1.0))
    zoo = [zoo_ordering_instance(seed + i, tasks, sizes, load_ms, exec_ms, n_jobs=n_jobs) for i in range(n_instances)]
    rows += rows_of(compare_policies(zoo), "zoo-blocks")
    say(f"ordering: {n_instances} synthetic + {n_instances} zoo instances in {time.perf_counter() - t0:.1f} s")
    info = {"synthetic": "placement.ordering.synthetic_backbone_instance(seed): 8 jobs, 2 backbones, capacity = one "
                         "backbone + two heads",
            "zoo": f"{n_jobs} jobs each a config from a pool of 3 random configs of a random zoo task, blocks on "
                   f"{proc} with the host dataset's measured memory_bytes, load_ms and latency; capacity 2.5 mean "
                   "jobs' bytes; deadlines 1.5x a mean job's cold cost to 0.6x the queue's",
            "processor": proc, "instances": n_instances}
    return rows, info


# -- plots ----------------------------------------------------------------------------------------
def plot_sweep(rows: Sequence[Mapping[str, Any]], path: Path, basis: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {}
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r["budget_frac"], r["slo_violation_rate"]) for r in rows
                     if r["policy"] == policy and r["budget_frac"] is not None and r.get("slo_violation_rate") is not None)
        if pts:
            (line,) = ax.plot([100 * f for f, _ in pts], [v for _, v in pts], "o-", label=f"{policy}, budget")
            colors[policy] = line.get_color()
        ref = lookup(rows, policy, None)
        if ref is not None and ref.get("slo_violation_rate") is not None:
            ax.axhline(ref["slo_violation_rate"], ls="--", lw=1, color=colors.get(policy),
                       label=f"{policy}, all preloaded")
    ax.set_xlabel(f"memory budget (% of all-resident memory{', ' + basis if basis else ''})")
    ax.set_ylabel("SLO violation rate")
    ax.set_ylim(bottom=0)
    ax.set_title("violations against the memory budget (host, real inference)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory_over_time(series: Mapping[str, Mapping[str, Any]], path: Path, lines: Mapping[str, float]) -> None:
    """RSS and the runtime's count of resident blocks over time, per run; ``lines``: label -> MB to mark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for label, s in series.items():
        for ax, key in ((axes[0], "rss"), (axes[1], "resident")):
            pts = s.get(key) or []
            if pts:
                ax.plot([t for t, _ in pts], [v for _, v in pts], label=label, lw=1)
    axes[0].set_title("process RSS (libraries and runtime included)")
    axes[0].set_ylabel("MiB")
    axes[1].set_title("resident blocks (the budget's count)")
    for (label, mb), style in zip(lines.items(), (":", "-.", "--"), strict=False):
        axes[1].axhline(mb, ls=style, color="k", lw=0.8, label=label)
    for ax in axes:
        ax.set_xlabel("time (s)")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/serve.yaml")
    ap.add_argument("--out", default="out/bench_memory.json")
    ap.add_argument("--zoo", default="edge", help="the zoo of the config's tasks: edge (default), embedded, or a folder")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per run of the budget sweep")
    ap.add_argument("--fracs", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.1, 0.15, 0.25, 0.4, 0.55, 0.7, 1.0], help="budgets as shares of the all-resident memory")
    ap.add_argument("--policies", nargs="*", default=["sparseloom", "av-p"])
    ap.add_argument("--in-process", action="store_true", help="run the sweep's runs in this process (RSS accumulates)")
    ap.add_argument("--cell-timeout", type=float, default=600.0, help="seconds a sweep run may take (child process)")
    ap.add_argument("--basis", choices=("runtime", "dataset"), default="dataset",
                    help="what the budget shares are of: the host dataset's measured memory_bytes of every "
                         "(block, processor) sparseloom's plans use (what the runtime's budget counts since it takes "
                         "offline sizes), or the runtime's own count in the all-preloaded sparseloom run")
    ap.add_argument("--drain-grace", type=float, default=5.0,
                    help="seconds queued work may run after the trace before it is cancelled (-1: drain all)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-switch", action="store_true")
    ap.add_argument("--switch-repeats", type=int, default=3)
    ap.add_argument("--switch-stitched", type=int, default=6, help="stitched pairs per task")
    ap.add_argument("--switch-processor", default=None, help="default: the first onnxruntime processor")
    ap.add_argument("--no-ordering", action="store_true")
    ap.add_argument("--ordering-instances", type=int, default=10)
    ap.add_argument("--ordering-jobs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # internal: one sweep run, as a child process
    args = ap.parse_args(argv)

    if args.cell:
        spec = json.loads(args.cell)
        cell = run_cell(spec["config"], spec["policy"], spec["budget_mb"], spec["duration_s"],
                        drain_grace_s=spec["drain_grace_s"])
        Path(spec["out"]).write_text(json.dumps(cell, default=str))
        return 0

    from loom.app.deployment import Deployment

    cfg, zoo = zoo_config(args.config, args.zoo)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    dep = Deployment.from_config(cfg)
    resident = _all_resident_of(dep)
    all_mb = resident["mb"]
    say(f"all-resident memory: {all_mb:.1f} MB over {resident['pairs']} (block, processor) pairs "
        f"({resident['measured_pairs']} measured)")
    result: dict[str, Any] = {"zoo": zoo, "all_resident": resident, "simulated": False}

    # switching first: its releases run gc.collect, whose cost grows with what the process holds
    switch = None
    if not args.no_switch:
        switch = switching(dep, repeats=args.switch_repeats, stitched=args.switch_stitched, seed=args.seed,
                           processor=args.switch_processor)
        result["switch"] = switch
    if not args.no_ordering:
        result["ordering"], result["ordering_settings"] = ordering(dep, n_instances=args.ordering_instances,
                                                                   n_jobs=args.ordering_jobs, seed=args.seed)
    rows: list[dict[str, Any]] = []
    series: dict[str, Any] = {}
    if not args.no_sweep:
        rows, series = budget_sweep(args, resident)
        result["budget_sweep"] = rows
        equal: dict[str, Any] = {}
        for policy in args.policies:
            ref = lookup(rows, policy, None)
            rates = {r["budget_frac"]: r.get("slo_violation_rate") for r in rows
                     if r["policy"] == policy and r["budget_frac"] is not None}
            equal[policy] = memory_saved_at_equal_violation(rates, None if ref is None else ref.get("slo_violation_rate"))
        result["memory_saved_at_equal_violation"] = equal
    result["aims"] = aims(rows, switch)
    result["settings"] = {"config": args.config, "duration_s": args.duration, "fracs": args.fracs,
                          "policies": args.policies, "seed": args.seed, "isolated_runs": not args.in_process,
                          "basis": args.basis, "drain_grace_s": args.drain_grace,
                          "slo_changes": {t.name: [c.model_dump() for c in t.slo_changes] for t in dep.config.tasks},
                          "slo_changes_note": "kept as configured; they fire only in runs longer than their time",
                          "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                          "wall_s": time.perf_counter() - t_start}
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    if rows:
        print(f"{'policy':<11} {'budget':>13} {'viol':>7} {'goodput':>8} {'p99 ms':>8} {'RSS MB':>7} "
              f"{'blocks MB':>9} {'loads':>6} {'evict':>6}")
        for r in rows:
            budget = "all-preloaded" if r["budget_frac"] is None else f"{r['budget_frac']:.0%} {r['budget_mb']:.1f}MB"
            if "failed" in r:
                print(f"{r['policy']:<11} {budget:>13} FAILED")
                continue
            print(f"{r['policy']:<11} {budget:>13} {_fmt(r['slo_violation_rate'], '>7.1%')} "
                  f"{_fmt(r['goodput_rps'], '>8.1f')} {_fmt(r['p99_ms'], '>8.2f')} {_fmt(r['peak_rss_mb'], '>7.0f')} "
                  f"{_fmt(r['peak_resident_mb'], '>9.1f')} {r['loads']:>6} {r['evictions']:>6}")
        for policy, e in result["memory_saved_at_equal_violation"].items():
            saved = "-" if e["saved"] is None else f"{e['saved']:.0%}"
            print(f"{policy}: memory saved at an equal violation rate (within {100 * e['tolerance']:.1f} points of "
                  f"all-preloaded): {saved} (budget {_fmt(e['frac'], '.0%')})")
    if switch is not None:
        for key, s in switch["summary"].items():
            if s["pairs"]:
                print(f"switching {key:<14} {s['pairs']:>3} pairs: speedup mean {_fmt(s['speedup']['mean'], '.2f')}x "
                      f"(geomean {_fmt(s['speedup']['geomean'], '.2f')}x), load-only mean "
                      f"{_fmt(s['load_only_speedup']['mean'], '.2f')}x, bytes {_fmt(s['bytes_share'], '.0%')} of monolithic")
        if switch.get("cross_task_speedup_vs_monolithic") is not None:
            print(f"switching across tasks ({len(switch['cross_task_pairs'])} pairs): speedup median "
                  f"{switch['cross_task_speedup_vs_monolithic']:.2f}x warm, "
                  f"{_fmt(switch['cross_task_speedup_vs_monolithic_cold'], '.2f')}x cold")
        print(f"switching: {switch['cross_task']['note']}; page cache dropped on cold runs: "
              f"{switch['page_cache_dropped']}")
    for r in result.get("ordering", []):
        print(f"ordering {r['instances']:<19} {r['policy']:<7} deadline hits {r['deadline_hit_rate']:.1%} "
              f"({r['hits']}/{r['jobs']}), load {r['total_load_ms']:.0f} ms")
    for name, a in result["aims"].items():
        print(f"aim {name}: {'-' if a['met'] is None else ('met' if a['met'] else 'NOT met')} "
              f"({', '.join(k + '=' + _fmt(v, '.3f') for k, v in a.items() if k != 'met')})")
    if rows:
        plot_sweep(rows, out.with_name(out.stem + "_violation_vs_budget.png"),
                   f"{resident['basis_mb']:.0f} MB, {resident['basis']}'s count")
        keep = {k: v for k, v in series.items() if any(s in k for s in ("@40%", "@100%", "@all-preloaded", "@15%"))}
        lines = {"all-resident (dataset)": all_mb}
        if "runtime_mb" in resident:
            lines["all-resident (runtime's count)"] = resident["runtime_mb"]
        plot_memory_over_time(keep or series, out.with_name(out.stem + "_memory.png"), lines)
    print(f"wrote {out}{' and plots beside it' if rows else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
