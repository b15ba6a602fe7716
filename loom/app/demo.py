"""``loom demo``: the main job, on the edge zoo by default (``--zoo embedded``: the toy zoo).

For every task: partition the family (K slots), measure every original variant's
accuracy and latency, measure the stitched configs (all of them when the space is
small, otherwise a seeded random sample that always includes the originals), and
report how many stitched configs no original variant dominates. Writes ``demo.json``
and one Pareto plot per task.
"""

from __future__ import annotations

import itertools
import json
import platform
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loom.core.onnxutil import load_model
from loom.core.paths import resolve_zoo, zoo_name, zoo_tasks
from loom.core.progress import Progress, say
from loom.core.runref import evaluation_threads, session
from loom.model.cutting import partition_family
from loom.model.family import Family, load_family
from loom.model.partition import Partition
from loom.model.stitch import evaluate_configs, merge_config
from loom.model.variants import measure_accuracy
from loom.profiling.measure import time_call


@dataclass
class Point:
    accuracy: float
    latency_ms: float


def dominated(p: Point, by: Sequence[Point]) -> bool:
    """True when some point is at least as accurate and as fast, and better in one."""
    return any(
        q.accuracy >= p.accuracy and q.latency_ms <= p.latency_ms and (q.accuracy > p.accuracy or q.latency_ms < p.latency_ms)
        for q in by
    )


def pareto_front(points: Sequence[Point]) -> list[int]:
    return [i for i, p in enumerate(points) if not dominated(p, points)]


def select_configs(variants: Sequence[str], k: int, max_configs: int, seed: int,
                   sample: int = 120) -> tuple[list[tuple[str, ...]], bool]:
    """All configs when there are at most ``max_configs``, else a seeded sample of ``sample``
    configs (at most ``max_configs``) that always includes the originals."""
    total = len(variants) ** k
    if total <= max_configs:
        return list(itertools.product(variants, repeat=k)), True
    uniform = [tuple([v] * k) for v in variants]
    rng = random.Random(seed)
    chosen = set(uniform)
    while len(chosen) < min(max(sample, len(uniform)), max_configs):
        chosen.add(tuple(rng.choice(variants) for _ in range(k)))
    return sorted(chosen), False


def bs1_latency(model_or_path: Any, feeds: Mapping[str, np.ndarray], *, repeats: int, name: str) -> dict[str, float]:
    sess = session(model_or_path if not isinstance(model_or_path, Path) else load_model(model_or_path), name=name, threads=1)
    return time_call(lambda: sess.run(None, feeds), warmup=3, repeats=repeats).as_dict()


def measure_variants(family: Family, x1: Mapping[str, np.ndarray], *, repeats: int, limit: int | None = None,
                     known: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Each original variant's accuracy (first ``limit`` samples; ``known``: already measured
    through its verified chain of blocks) and batch-1 latency (median and p90)."""
    variants = []
    for v in family.variants:
        acc = (known or {}).get(v.name)
        if acc is None:
            acc = measure_accuracy(family, family.variant_path(v.name), limit=limit)
        lat = bs1_latency(family.variant_path(v.name), x1, repeats=repeats, name=v.name)
        variants.append({
            "name": v.name, "kind": v.kind, "sparsity": v.sparsity, "precision": v.precision,
            "accuracy": acc, "latency_ms": lat["median_ms"], "latency_p90_ms": lat["p90_ms"],
            "size_bytes": v.size_bytes,
        })
    return variants


def measure_configs(partition: Partition, family: Family, configs: Sequence[tuple[str, ...]], x1: Mapping[str, np.ndarray], *,
                    repeats: int, show: bool, limit: int | None = None) -> list[dict[str, Any]]:
    """Each config's accuracy (stitched as a chain) and its merged model's batch-1 latency."""
    task = family.task
    bar = Progress(len(configs), f"{task}: accuracy of {len(configs)} configs", enabled=show)
    accuracy = evaluate_configs(partition, configs, family, on_done=lambda c, a: bar.update(), limit=limit)
    bar = Progress(len(configs), f"{task}: latency of {len(configs)} merged configs", enabled=show)
    rows = []
    for c in configs:
        lat = bs1_latency(merge_config(partition, c), x1, repeats=repeats, name="|".join(c))
        rows.append({
            "config": list(c), "stitched": len(set(c)) > 1, "measured": True, "accuracy": accuracy[c],
            "latency_ms": lat["median_ms"], "latency_p90_ms": lat["p90_ms"],
        })
        bar.update()
    return rows


def demo_task(
    family: Family,
    out: Path,
    *,
    k: int,
    max_configs: int,
    seed: int,
    repeats: int,
    show: bool,
    sample: int = 120,
    eval_limit: int | None = None,
) -> dict[str, Any]:
    """One task of the demo: partition, measure the originals and the chosen configs, count the
    non-dominated. Accuracy on the first ``eval_limit`` evaluation samples (None: all)."""
    t0 = time.perf_counter()
    task = family.task
    partition: Partition = partition_family(family, out / "partitions" / task, k=k, progress=say if show else None)
    x1 = family.eval_feeds(1)[0]
    names = list(partition.variants)
    configs, exhaustive = select_configs(names, partition.k, max_configs, seed, sample)
    rows = measure_configs(partition, family, configs, x1, repeats=repeats, show=show, limit=eval_limit)
    say(f"{task}: measuring {len(names)} original variants")
    # the originals are among the configs (one variant in every slot): their accuracy is known
    known = {r["config"][0]: r["accuracy"] for r in rows if not r["stitched"]}
    variants = measure_variants(family, x1, repeats=repeats, limit=eval_limit, known=known)
    originals = [Point(v["accuracy"], v["latency_ms"]) for v in variants]
    stitched = [r for r in rows if r["stitched"]]
    non_dominated = [r for r in stitched if not dominated(Point(r["accuracy"], r["latency_ms"]), originals)]
    accs = [v["accuracy"] for v in variants]
    return {
        "task": task,
        "metric": family.manifest.metric.name,
        "evaluation_samples": len(next(iter(family.eval_feeds(eval_limit)[0].values()))),
        "k": partition.k,
        "cuts": partition.cuts,
        "slot_macs_share": partition.slot_macs_share,
        "chain_verification": partition.verification,
        "variants": variants,
        "accuracy_range_pts": round(100 * (max(accs) - min(accs)), 2),
        "configs_measured": len(rows),
        "config_space": len(names) ** partition.k,
        "exhaustive": exhaustive,
        "sample": None if exhaustive else f"seeded random sample (seed {seed}) of {len(rows)} configs including the {len(names)} originals",
        "configs": rows,
        "non_dominated_stitched": len(non_dominated),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def plot_task(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    st = [r for r in result["configs"] if r["stitched"]]
    pts = [Point(r["accuracy"], r["latency_ms"]) for r in result["configs"]]
    ax.scatter([r["latency_ms"] for r in st], [100 * r["accuracy"] for r in st], s=10, c="#9aa4b1",
               alpha=0.6, label=f"stitched configs ({len(st)})")
    front = sorted((pts[i] for i in pareto_front(pts)), key=lambda p: p.latency_ms)
    ax.plot([p.latency_ms for p in front], [100 * p.accuracy for p in front], "-", c="#2b6cb0", lw=1.2,
            label="Pareto front (all configs)")
    for v in result["variants"]:
        ax.scatter([v["latency_ms"]], [100 * v["accuracy"]], marker="*", s=130, c="#d9480f", edgecolor="k", zorder=3)
        ax.annotate(v["name"], (v["latency_ms"], 100 * v["accuracy"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.scatter([], [], marker="*", s=130, c="#d9480f", edgecolor="k", label="original variants")
    ax.set_xlabel("latency, batch 1, onnxruntime CPU 1 thread (ms, median)")
    ax.set_ylabel(f"{result['metric']} accuracy (%)")
    ax.set_title(f"{result['task']}: K={result['k']}, {result['non_dominated_stitched']} stitched configs not dominated by an original")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(results: list[dict[str, Any]]) -> None:
    for r in results:
        print(f"\n== {r['task']} (metric {r['metric']} on {r['evaluation_samples']} held-out samples, K={r['k']}, "
              f"cuts {r['cuts']})")
        print(f"{'variant':<22}{'kind':<14}{'accuracy':>10}{'latency ms':>12}")
        for v in r["variants"]:
            print(f"{v['name']:<22}{v['kind']:<14}{100 * v['accuracy']:>9.2f}%{v['latency_ms']:>12.3f}")
        how = "all" if r["exhaustive"] else "a random sample"
        print(f"stitched configs measured: {r['configs_measured']} of {r['config_space']} ({how}); "
              f"not dominated by an original variant: {r['non_dominated_stitched']}; "
              f"accuracy range of the originals: {r['accuracy_range_pts']} points")


def run_demo(
    zoo: str | Path | None = None,
    out: str | Path = "out/demo",
    *,
    k: int = 3,
    tasks: Sequence[str] | None = None,
    max_configs: int = 512,
    sample: int = 120,
    repeats: int = 15,
    seed: int = 0,
    show: bool = True,
    eval_limit: int | None = None,
) -> dict[str, Any]:
    """Run the demo on ``zoo`` (a name, ``embedded`` or ``edge``, or a folder; None: the
    embedded zoo): every config when a task has at most ``max_configs``, else ``sample``."""
    zoo = resolve_zoo(zoo)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    for task in tasks or zoo_tasks(zoo):
        family = load_family(zoo / task)
        with evaluation_threads(_cpus()):  # accuracy passes; latency is timed on one thread
            result = demo_task(family, out, k=k, max_configs=max_configs, seed=seed, repeats=repeats, show=show,
                               sample=sample, eval_limit=eval_limit)
        plot_task(result, out / f"pareto_{task}.png")
        result["plot"] = f"pareto_{task}.png"
        results.append(result)
    report = {
        "zoo": zoo_name(zoo),
        "tasks": results,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": _cpus()},
        "engine": "onnxruntime CPU execution provider, 1 intra-op thread, batch 1",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "demo.json").write_text(json.dumps(report, indent=1))
    print_table(results)
    print(f"\nwrote {out / 'demo.json'} and {len(results)} Pareto plot(s) in {report['seconds']} s")
    return report


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
