"""How well the learned estimators replace exhaustive profiling, per task of the zoo.

On the host device profile (real processors: onnxruntime on core 0, OpenVINO on core 1):

1. **Training data, timed**: ``profile_device`` measures every block of the task on
   every processor plus a few placed configs (link calibration); ``loom fit``'s way
   measures the accuracy of a budget of stitched configs (5% of the space, at most 50)
   chosen by active sampling, after one tapped run per variant for the cut
   compatibilities. ``profiling_s`` is the wall time of all of that.
2. **Held-out latency**: a seeded random sample of placed configs (config x placement)
   that no training step measured (``--heldout``), measured end to end through the
   pinned workers, against the plan latency the estimator predicts (blocks from
   ``LatencyEstimator``, hand-offs and dispatch from the calibrated ``LinkModel``).
   ``--exhaustive-task`` measures *every* placed config of one task instead: the
   exhaustive latency profile, timed (27,000 on an edge task, over an hour); otherwise
   its cost is extrapolated from the sample. Also: the same prediction from an
   estimator that never saw the task (leave-one-task-out).
3. **Accuracy**: the ground truth is the originals plus a seeded random sample of
   ``--truth-configs`` stitched configs (``0``: every config; cached under
   ``out/bench/truth``), whose measuring time extrapolates to the exhaustive accuracy
   cost; the estimator's MAE and Spearman over the truth configs it did not measure.
4. **Learning curve**: accuracy MAE against the number of measured configs for
   active, stratified and random sampling (mean over seeds), plotted.

``exhaustive_s`` = every config's accuracy + every placed config's latency, each
measured or extrapolated (``exhaustive_measured`` and ``accuracy_truth`` say which).

``--zoo``: the edge zoo by default (``make zoo-edge``), ``embedded`` (the toy zoo) or a
zoo folder; the JSON says which (``zoo``).

    python scripts/bench_estimators.py --out out/bench_estimators.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_check import zoo_folder_and_tasks  # noqa: E402

from estimators.accuracy import config_features  # noqa: E402
from estimators.latency import LatencyEstimator  # noqa: E402
from estimators.plans import LinkModel, latency_table, plan_latency  # noqa: E402
from estimators.sampling import active_sample, random_sample, stratified_sample  # noqa: E402
from loom.core.paths import zoo_name  # noqa: E402
from loom.core.progress import say  # noqa: E402
from loom.model.family import load_family  # noqa: E402
from loom.model.partition import Partition  # noqa: E402
from loom.model.stitch import evaluate_configs  # noqa: E402
from loom.processors.device import load_device_profile  # noqa: E402
from loom.profiling.chains import measure_placed_configs  # noqa: E402
from loom.profiling.dataset import partition_ref  # noqa: E402
from loom.profiling.fitting import (  # noqa: E402
    AccuracySample,
    accuracy_budget,
    compatibility,
    fit_accuracy,
    latency_rows,
    partition_features,
    processor_rows,
    sample_accuracy,
)
from loom.profiling.links import calibrate_links  # noqa: E402
from loom.profiling.partitions import ensure_partitions  # noqa: E402
from loom.profiling.profile import profile_device  # noqa: E402

Config = tuple[str, ...]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


# -- accuracy ground truth ----------------------------------------------------------------------
def truth_configs(part: Partition, n: int, seed: int) -> list[Config]:
    """The configs whose accuracy is the ground truth: all of them when ``n`` is 0 or the
    space is no larger, else the originals plus a seeded random sample of ``n`` stitched ones."""
    names = sorted(part.variants)
    every = list(itertools.product(names, repeat=part.k))
    stitched = [c for c in every if len(set(c)) > 1]
    if not n or n >= len(stitched):
        return every
    rng = random.Random(f"{seed}:{part.task}:truth")
    return [tuple([v] * part.k) for v in names] + sorted(rng.sample(stitched, n))


def accuracy_truth(part: Partition, cache_dir: Path, n: int = 0, seed: int = 0) -> tuple[dict[Config, float], float, float]:
    """The accuracy of the ground-truth configs (``truth_configs``), the seconds measuring them
    took, and those seconds extrapolated to every config of the space (cached: all three)."""
    path = cache_dir / f"{part.task}.json"
    names = sorted(part.variants)
    configs = truth_configs(part, n, seed)
    space = len(names) ** part.k
    if path.is_file():
        data = json.loads(path.read_text())
        if (sorted(data["variants"]) == names and data["k"] == part.k and data.get("partition") == partition_ref(part.root)
                and sorted(tuple(r["config"]) for r in data["configs"]) == sorted(configs)):
            return ({tuple(r["config"]): r["accuracy"] for r in data["configs"]}, float(data["seconds"]),
                    float(data.get("seconds_all", data["seconds"])))
    how = "exhaustive" if len(configs) == space else f"a seeded random sample of the {space}"
    say(f"{part.task}: measuring the accuracy of {len(configs)} configs ({how}; cached afterwards)")
    t0 = time.perf_counter()
    acc = evaluate_configs(part, configs, part.family())
    seconds = time.perf_counter() - t0
    # prefix sharing makes a full sweep cheaper per config than a sample: extrapolate from
    # the block runs a full sweep needs (V + V^2 + ... + V^K slot runs) against this one's
    sample_runs = sum(len({c[: s + 1] for c in configs}) for s in range(part.k))
    all_runs = sum(len(names) ** (s + 1) for s in range(part.k))
    seconds_all = seconds * all_runs / sample_runs
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"task": part.task, "k": part.k, "variants": names, "seconds": seconds,
                                "seconds_all": seconds_all, "partition": partition_ref(part.root),
                                "configs": [{"config": list(c), "accuracy": a} for c, a in acc.items()]}))
    return dict(acc), seconds, seconds_all


def accuracy_errors(est_rows: list, truth: dict[Config, float], pred: np.ndarray) -> tuple[float, float]:
    y = np.array([truth[c] for c in est_rows])
    return float(np.mean(np.abs(pred - y)) * 100), spearman(pred, y)


def curve_sample(strategy: str, names: list[str], k: int, pool: list[Config], n: int, seed: int) -> list[Config]:
    """``n`` configs of ``pool`` (the stitched configs whose accuracy is known) by ``strategy``.

    ``stratified`` balances variants over slots across the whole space; on a sampled truth
    only the configs of the pool can be used, so its order is kept for those and the rest
    is topped up at random from the pool.
    """
    if strategy == "random":
        return random_sample(pool, n, seed)
    members = set(pool)
    order = [c for c in stratified_sample(names, k, len(names) ** k, seed, include_uniform=False) if c in members]
    chosen = order[:n]
    if len(chosen) < n:
        taken = set(chosen)
        chosen += [c for c in random_sample(pool, len(pool), seed) if c not in taken][: n - len(chosen)]
    return chosen


def learning_curve(part: Partition, truth: dict[Config, float], compat: Any, sizes: list[int], seeds: int) -> list[dict]:
    family = part.family()
    info = {v.name: v for v in family.variants}
    names = list(part.variants)
    known = {tuple([v] * part.k): float(info[v].accuracy) for v in names}
    stitched = [c for c in truth if len(set(c)) > 1]
    rows_of = {c: config_features(c, info, compat) for c in truth}
    out = []
    for n in sizes:
        for strategy in ("active", "stratified", "random"):
            maes, rhos = [], []
            for seed in range(seeds):
                if strategy == "active":
                    res = active_sample(stitched, rows_of, lambda cs: [truth[c] for c in cs], n, seed=seed, known=known)
                    measured = dict(zip(res.configs, res.values, strict=True))
                else:
                    measured = {c: truth[c] for c in curve_sample(strategy, names, part.k, stitched, n, seed)}
                sample = AccuracySample(measured=measured, known=known, strategy=strategy, seconds=0.0)
                est = fit_accuracy(family, sample, compat, random_state=seed)
                test = [c for c in stitched if c not in measured]
                mae, rho = accuracy_errors(test, truth, est.predict([rows_of[c] for c in test]))
                maes.append(mae)
                rhos.append(rho)
            out.append({"task": part.task, "n": n, "strategy": strategy, "mae_pts": float(np.mean(maes)),
                        "spearman": float(np.mean(rhos))})
            say(f"{part.task}: n={n} {strategy}: MAE {np.mean(maes):.2f} pts, Spearman {np.mean(rhos):.3f}")
    return out


# -- latency -----------------------------------------------------------------------------------
def predict_pairs(est: LatencyEstimator, links: LinkModel, part: Partition, procs: dict, pairs: list) -> np.ndarray:
    feats = partition_features(part)
    table = latency_table(est, feats, procs)
    out = []
    for config, placement in pairs:
        ids = [part.variants[v][s] for s, v in enumerate(config)]
        out.append(plan_latency(ids, list(placement), table, {b: feats[b]["act_out_bytes"] for b in ids}, links).total_ms)
    return np.array(out)


def latency_metrics(pred: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    rel = (pred - measured) / measured
    return {"within_10pct": float(np.mean(np.abs(rel) <= 0.10)), "mape": float(np.mean(np.abs(rel)) * 100),
            "spearman": spearman(pred, measured), "median_error_pct": float(np.median(rel) * 100)}


def all_pairs(part: Partition, procs: list[str]) -> list[tuple[Config, tuple[str, ...]]]:
    names = sorted(part.variants)
    return [(c, pl) for c in itertools.product(names, repeat=part.k) for pl in itertools.product(procs, repeat=part.k)]


# -- the benchmark -------------------------------------------------------------------------------
def run(args: argparse.Namespace, zoo: Path, tasks: list[str]) -> dict[str, Any]:
    device = load_device_profile(args.device)
    procs = device.processor_names
    families = [load_family(zoo / t) for t in tasks]
    partitions = ensure_partitions(families, args.partitions, k=args.k)
    work = Path(args.work)
    proc_rows = processor_rows(device)

    # 1. training profiles, one folder per task so that each task's profiling time is its own
    prof_s: dict[str, float] = {}
    datasets = {}
    for part in partitions:
        folder = work / "profile" / part.task
        t0 = time.perf_counter()
        datasets[part.task] = profile_device([part], device, folder, warmup=args.warmup, repeats=args.repeats,
                                             config_samples=args.calib_configs, seed=args.seed, resume=False)
        prof_s[part.task] = time.perf_counter() - t0
    block_rows = {t: latency_rows(d, device) for t, d in datasets.items()}
    all_configs = [r for d in datasets.values() for r in d.configs if r["status"] == "ok"]
    links = LinkModel.from_calibration(calibrate_links(all_configs, device))
    rows = [r for t in tasks for r in block_rows[t].rows]
    y = np.concatenate([block_rows[t].latency_ms for t in tasks])
    t0 = time.perf_counter()
    latency_est = LatencyEstimator().fit(rows, y)
    fit_s = time.perf_counter() - t0

    # the task whose every placed config is measured, if one is asked for ("cheapest": the one
    # whose placed configs run fastest); the others' exhaustive cost is extrapolated
    per_run_ms = {t: float(np.median([r["measured_ms_median"] for r in d.configs if r["status"] == "ok"]))
                  for t, d in datasets.items()}
    smallest = (min(per_run_ms, key=per_run_ms.get) if args.exhaustive_task == "cheapest"
                else args.exhaustive_task)

    results, curves = [], []
    for part in partitions:
        task = part.task
        family = part.family()
        trained_on = {(r["config"], r["placement"]) for r in datasets[task].configs}
        # 2. held-out placed configs, measured
        pairs = all_pairs(part, procs)
        exhaustive = task == smallest
        if not exhaustive:
            rng = random.Random(f"{args.seed}:{task}:heldout")
            pool = [p for p in pairs if (";".join(p[0]), ";".join(p[1])) not in trained_on]
            pairs = rng.sample(pool, min(args.heldout, len(pool)))
        say(f"{task}: measuring {len(pairs)} placed configs end to end" + (" (all of them: exhaustive)" if exhaustive else ""))
        t0 = time.perf_counter()
        measured_rows = measure_placed_configs(part, pairs, device, warmup=args.warmup, repeats=args.repeats)
        lat_wall = time.perf_counter() - t0
        ok = [(r, p) for r, p in zip(measured_rows, pairs, strict=True) if r["status"] == "ok"]
        held = [p for r, p in ok if (";".join(p[0]), ";".join(p[1])) not in trained_on]
        measured = np.array([r["measured_ms_median"] for r, p in ok if p in set(held)])
        pred = predict_pairs(latency_est, links, part, proc_rows, held)
        lat = latency_metrics(pred, measured)
        # leave this task out of the latency estimator
        others = [t for t in tasks if t != task]
        if others:
            loto = LatencyEstimator().fit([r for t in others for r in block_rows[t].rows],
                                          np.concatenate([block_rows[t].latency_ms for t in others]))
            lat_unseen = latency_metrics(predict_pairs(loto, links, part, proc_rows, held), measured)
        else:
            lat_unseen = {}
        per_pair_s = lat_wall / max(1, len(measured_rows))
        n_pairs_total = len(part.variants) ** part.k * len(procs) ** part.k
        lat_exhaustive_s = lat_wall if exhaustive else per_pair_s * n_pairs_total

        # 3. accuracy: ground truth, then the budgeted sample with real measurement
        truth, truth_s, acc_exhaustive_s = accuracy_truth(part, work / "truth", args.truth_configs, args.seed)
        space = len(part.variants) ** part.k
        n = args.samples or accuracy_budget(space)
        t0 = time.perf_counter()
        compat = compatibility(part, family)
        compat_s = time.perf_counter() - t0
        sample = sample_accuracy(part, family, n, strategy=args.strategy, seed=args.seed, compat=compat, progress=say)
        t0 = time.perf_counter()
        acc_est = fit_accuracy(family, sample, compat, random_state=args.seed)
        acc_fit_s = time.perf_counter() - t0
        info = {v.name: v for v in family.variants}
        test = [c for c in truth if len(set(c)) > 1 and c not in sample.measured]
        mae, rho = accuracy_errors(test, truth, acc_est.predict([config_features(c, info, compat) for c in test]))
        floor = [min(info[v].accuracy for v in c) for c in test]
        base_mae, base_rho = accuracy_errors(test, truth, np.array(floor))

        profiling_s = prof_s[task] + compat_s + sample.seconds + acc_fit_s + fit_s / len(tasks)
        exhaustive_s = acc_exhaustive_s + lat_exhaustive_s
        results.append({
            "task": task,
            "latency_within_10pct": lat["within_10pct"], "latency_mape": lat["mape"],
            "latency_spearman": lat["spearman"], "latency_median_error_pct": lat["median_error_pct"],
            "latency_heldout_configs": len(held),
            "latency_unseen_task_mape": lat_unseen.get("mape"), "latency_unseen_task_within_10pct": lat_unseen.get("within_10pct"),
            "accuracy_mae_pts": mae, "accuracy_spearman": rho, "accuracy_measured_configs": len(sample.measured),
            "accuracy_heldout_configs": len(test), "accuracy_strategy": args.strategy,
            "accuracy_truth": {"configs": len(truth), "space": space, "seconds": truth_s,
                               "sampled": len(truth) < space},
            "baseline_min_piece_mae_pts": base_mae, "baseline_min_piece_spearman": base_rho,
            "profiling_s": profiling_s, "exhaustive_s": exhaustive_s, "exhaustive_measured": exhaustive,
            "profiling_share": profiling_s / exhaustive_s,
            "profiling_breakdown_s": {"blocks_and_link_calibration": prof_s[task], "cut_compatibility": compat_s,
                                      "accuracy_sample": sample.seconds, "fits": acc_fit_s + fit_s / len(tasks)},
            "exhaustive_breakdown_s": {"accuracy_all_configs": acc_exhaustive_s,
                                       "accuracy_all_configs_measured": len(truth) == space, "latency_all_placed_configs": lat_exhaustive_s,
                                       "placed_configs": n_pairs_total, "per_placed_config_s": per_pair_s},
        })
        if not args.no_curve:
            # on a sampled truth the curve draws from the sample: keep half of it for testing
            pool = sum(1 for c in truth if len(set(c)) > 1)
            curves += learning_curve(part, truth, compat, [m for m in args.curve if m <= pool // 2], args.seeds)
    return {"zoo": zoo_name(zoo), "tasks": results, "learning_curve": curves,
            "settings": {"device": device.name, "k": args.k, "warmup": args.warmup, "repeats": args.repeats,
                         "calib_configs": args.calib_configs, "heldout": args.heldout, "seed": args.seed,
                         "machine": platform.processor() or platform.machine(), "exhaustive_task": smallest}}


def print_table(result: dict[str, Any]) -> None:
    head = (f"{'task':<12} {'lat<=10%':>8} {'MAPE%':>6} {'rho':>5} {'unseen%':>7} {'accMAE':>6} {'rho':>5} "
            f"{'minMAE':>6} {'prof s':>7} {'exh s':>8} {'share':>6}  exhaustive")
    print(head)
    for r in result["tasks"]:
        unseen = r["latency_unseen_task_mape"]
        print(f"{r['task']:<12} {r['latency_within_10pct']:>8.1%} {r['latency_mape']:>6.1f} {r['latency_spearman']:>5.2f} "
              f"{(unseen if unseen is not None else float('nan')):>7.1f} {r['accuracy_mae_pts']:>6.2f} "
              f"{r['accuracy_spearman']:>5.2f} {r['baseline_min_piece_mae_pts']:>6.2f} {r['profiling_s']:>7.1f} "
              f"{r['exhaustive_s']:>8.0f} {r['profiling_share']:>6.2%}  "
              f"{'measured' if r['exhaustive_measured'] else 'extrapolated'}")


def plot_curve(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({c["task"] for c in curves})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for strategy, style in (("active", "o-"), ("stratified", "s--"), ("random", "^:")):
            pts = sorted((c["n"], c["mae_pts"]) for c in curves if c["task"] == task and c["strategy"] == strategy)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=strategy)
        ax.set_title(task)
        ax.set_xlabel("measured stitched configs")
        ax.set_ylabel("accuracy MAE (points)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/bench_estimators.json")
    ap.add_argument("--device", default="host")
    ap.add_argument("--zoo", default="edge", help="edge (default), embedded, or a zoo folder")
    ap.add_argument("--tasks", nargs="*")
    ap.add_argument("-k", "--k", type=int, default=3)
    ap.add_argument("--partitions", default="out/partitions")
    ap.add_argument("--work", default="out/bench", help="training profiles and the accuracy ground truth (cache)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--calib-configs", type=int, default=10, help="placed configs per task profiled for link calibration")
    ap.add_argument("--heldout", type=int, default=80, help="held-out placed configs measured per task (not the exhaustive one)")
    ap.add_argument("--exhaustive-task", help="a task whose every placed config is measured ('cheapest': the task "
                    "whose configs run fastest; an hour or more on the edge zoo); default: none, the cost is "
                    "extrapolated from the held-out sample")
    ap.add_argument("--truth-configs", type=int, default=100,
                    help="stitched configs in the accuracy ground truth, a seeded random sample (0: every config)")
    ap.add_argument("--samples", type=int, help="measured stitched configs (default: 5%% of the space, at most 50)")
    ap.add_argument("--strategy", choices=["active", "stratified", "random"], default="active")
    ap.add_argument("--curve", type=lambda s: [int(x) for x in s.split(",")], default=[10, 25, 50, 100])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-curve", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    zoo, tasks = zoo_folder_and_tasks(args.zoo, args.tasks)
    result = run(args, zoo, tasks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    if result["learning_curve"]:
        plot = out.with_name(out.stem + "_learning_curve.png")
        plot_curve(result["learning_curve"], plot)
        print(f"wrote {out} and {plot}")
    else:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
