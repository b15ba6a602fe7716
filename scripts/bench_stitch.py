"""Latency of chained and merged stitched execution against the monolithic variant.

For each task of the zoo and K = 2, 3, 4, and several variants, measures in one
process, batch 1, onnxruntime CPU with one thread:

- monolithic: the variant's own ONNX file in one session;
- chained: the variant's K blocks, each its own session, run one after another
  through the ``onnxruntime`` backend (what a placement across processors runs);
- merged: the K blocks merged back into one graph by ``merge_config``.

The three modes are timed in interleaved rounds (mono, chained, merged, mono, ...)
so that drift on a shared machine hits them alike; each figure is the median over
rounds of per-round medians. Writes ``{"rows": [{"task", "k", "variant", "mode",
"overhead"}], "zoo"}`` (overhead = latency ratio - 1) and prints a table. ``--zoo``: the
edge zoo by default (``make zoo-edge``), ``embedded`` (the toy zoo) or a zoo folder.

    python scripts/bench_stitch.py --out out/bench_stitch.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_check import zoo_folder_and_tasks  # noqa: E402

from backends import get_backend  # noqa: E402
from loom.core.onnxutil import load_model  # noqa: E402
from loom.core.paths import zoo_name  # noqa: E402
from loom.core.progress import Progress  # noqa: E402
from loom.core.runref import session  # noqa: E402
from loom.model.cutting import partition_family  # noqa: E402
from loom.model.family import load_family  # noqa: E402
from loom.model.stitch import StitchedModel, merge_config  # noqa: E402
from loom.profiling.measure import time_call  # noqa: E402

# the embedded zoo's and the edge zoo's (a variant a family lacks is skipped)
DEFAULT_VARIANTS = ["dense", "unstructured-80", "structured-50", "unstructured-40", "structured-20", "int8", "fp16"]


def bench(zoo: Path, tasks: list[str], ks: list[int], variants: list[str], rounds: int, repeats: int) -> dict:
    rows = []
    backend = get_backend("onnxruntime", intra_op_threads=1)
    total = len(tasks) * len(ks)
    bar = Progress(total, "bench_stitch")
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            family = load_family(zoo / task)
            feeds = family.eval_feeds(1)[0]
            names = [v for v in variants if v in family.variant_names]
            for k in ks:
                part = partition_family(family, Path(tmp) / f"{task}-k{k}", k=k)
                for v in names:
                    mono = session(load_model(family.variant_path(v)), name=v)
                    merged = session(merge_config(part, [v] * k), name=f"{v} merged")
                    chain = StitchedModel(part, [v] * k, backends=backend)
                    fns = {
                        "monolithic": lambda s=mono, f=feeds: s.run(None, f),
                        "chained": lambda c=chain, f=feeds: c.run(f),
                        "merged": lambda s=merged, f=feeds: s.run(None, f),
                    }
                    med: dict[str, list[float]] = {m: [] for m in fns}
                    for _ in range(rounds):
                        for mode, fn in fns.items():
                            med[mode].append(time_call(fn, warmup=2, repeats=repeats).median_ms)
                    chain.close()
                    base = statistics.median(med["monolithic"])
                    for mode in ("chained", "merged"):
                        lat = statistics.median(med[mode])
                        rows.append({
                            "task": task, "k": k, "variant": v, "mode": mode,
                            "overhead": round(lat / base - 1, 4),
                            "latency_ms": round(lat, 4), "monolithic_ms": round(base, 4),
                        })
                bar.update()
    return {"rows": rows}


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for mode in ("chained", "merged"):
        vals = [r["overhead"] for r in rows if r["mode"] == mode]
        out[mode] = {"mean_overhead": round(statistics.mean(vals), 4), "median_overhead": round(statistics.median(vals), 4),
                     "max_overhead": round(max(vals), 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--zoo", default="edge", help="edge (default), embedded, or a zoo folder")
    ap.add_argument("--tasks", nargs="*")
    ap.add_argument("--k", nargs="*", type=int, default=[2, 3, 4])
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    zoo, tasks = zoo_folder_and_tasks(args.zoo, args.tasks)
    t0 = time.perf_counter()
    result = {"zoo": zoo_name(zoo), **bench(zoo, tasks, args.k, args.variants, args.rounds, args.repeats)}
    result["summary"] = summarize(result["rows"])
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor()}
    result["method"] = (f"batch 1, onnxruntime CPU EP, 1 intra-op thread; {args.rounds} interleaved rounds of "
                        f"{args.repeats} timed runs; median of per-round medians")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'task':<12}{'k':>3}  {'variant':<18}{'mono ms':>9}{'chained':>10}{'merged':>10}")
    by = {}
    for r in result["rows"]:
        by.setdefault((r["task"], r["k"], r["variant"]), {})[r["mode"]] = r
    for (task, k, v), m in by.items():
        print(f"{task:<12}{k:>3}  {v:<18}{m['chained']['monolithic_ms']:>9.3f}"
              f"{m['chained']['overhead']:>+10.1%}{m['merged']['overhead']:>+10.1%}")
    for mode, s in result["summary"].items():
        print(f"{mode}: mean overhead {s['mean_overhead']:+.1%}, median {s['median_overhead']:+.1%}, max {s['max_overhead']:+.1%}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
