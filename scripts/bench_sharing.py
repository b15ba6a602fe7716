"""Cross-task sharing: two tasks whose families share backbone blocks, switched and held.

``python scripts/bench_sharing.py --zoo edge --out out/bench_sharing.json``. For every pair
of tasks of the zoo that share blocks in one block store (the edge zoo's ``fashion-cls``
and ``fashion-group`` share every block before the head), measures

- **switching** from one task's config to the other's on the onnxruntime backend, both
  ways: *differential* (release the blocks only the first uses, load the ones only the
  second uses) against *monolithic* (release the first task's whole model, load the
  second's), warm and cold page cache, median over repeats;
- **memory** of holding both tasks resident: peak RSS growth (psutil, each in a fresh
  process) of loading the union of both configs' blocks against loading both whole
  models, and the bytes on disk either way.

Uniform configs of variants both tasks have (dense, fp16, ...) are the pairs: the same
compression of the same backbone, a different head.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_check import zoo_folder_and_tasks  # noqa: E402

from loom.core.paths import zoo_name  # noqa: E402
from loom.core.progress import say  # noqa: E402


def head_cuts(family: Any, k: int) -> list[list[str]]:
    """K - 1 cuts whose last is the deepest aligned one (before the head, when the pooled
    features align): every byte but the head's is then in blocks the tasks can share."""
    from loom.model.align import align, choose_cuts

    aligned = sorted(align(family).aligned, key=lambda c: c.macs_before)
    if not aligned:
        raise SystemExit(f"error: {family.path}: no aligned cut")
    deepest = aligned[-1]
    rest = [c for c in aligned if c.macs_before < deepest.macs_before]
    first = choose_cuts(rest, k - 1) if k > 2 and rest else []
    return [list(c.tensors) for c in first] + [list(deepest.tensors)]


def partitions(zoo: Path, tasks: list[str], work: Path, k: int, mode: str) -> dict[str, Any]:
    """Each task partitioned into ``work/<task>``, all into one store ``work/blockstore``;
    ``mode``: ``balanced`` (the MAC-balanced cuts the demo and serving use) or ``head``."""
    from loom.model.cutting import partition_family
    from loom.model.family import load_family
    from loom.model.partition import load_partition

    parts = {}
    for t in tasks:
        folder = work / t
        if (folder / "partition.yaml").is_file():
            parts[t] = load_partition(folder)
        else:
            family = load_family(zoo / t)
            cuts = head_cuts(family, k) if mode == "head" else None
            say(f"partitioning {t} (K={k}, {mode} cuts) into {folder}")
            parts[t] = partition_family(family, folder, k=k, cuts=cuts)
    return parts


def switching(switchers: dict[str, Any], pairs: list[tuple[tuple[str, tuple], tuple[str, tuple]]], *,
              repeats: int) -> list[dict[str, Any]]:
    """Each cross-task switch ``repeats`` times both ways (``switching.Switcher``), warm then cold."""
    from switching import summarize_runs

    rows = []
    for cold in (False, True):
        for (ta, ca), (tb, cb) in pairs:
            runs = [switchers[ta].measure(ca, cb, cold=cold, monolithic_first=bool(i % 2), to=switchers[tb])
                    for i in range(repeats)]
            row = summarize_runs(runs)
            rows.append({**row, "from": [ta, *ca], "to": [tb, *cb]})
            d, m = row["differential_s"], row["monolithic_s"]
            say(f"{'cold' if cold else 'warm'} {'|'.join(rows[-1]['from'])} -> {'|'.join(rows[-1]['to'])}: "
                f"differential {1e3 * d:.1f} ms, monolithic {1e3 * m:.1f} ms"
                + (f" ({m / d:.1f}x)" if d else " (nothing to load)"))
    return rows


_RSS_CHILD = """
import json, sys, psutil, gc
sys.path.insert(0, {root!r})
import onnxruntime
from backends import get_backend
b = get_backend("onnxruntime")
gc.collect()
p = psutil.Process()
before = p.memory_info().rss
held = [b.load(path, block_id=str(i)) for i, path in enumerate({paths!r})]
print(json.dumps({{"rss_growth_bytes": p.memory_info().rss - before}}))
"""


def rss_growth(paths: list[Path]) -> int:
    """RSS growth of loading ``paths`` on the onnxruntime backend, in a fresh process."""
    code = _RSS_CHILD.format(root=str(Path(__file__).resolve().parent.parent), paths=[str(p) for p in paths])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["rss_growth_bytes"])


def memory(parts: dict, configs: dict[str, tuple], switchers: dict[str, Any], *, repeats: int) -> dict[str, Any]:
    ids = {parts[t].variants[v][s]: parts[t] for t, c in configs.items() for s, v in enumerate(c)}
    union = [part.block_path(bid) for bid, part in ids.items()]  # a block shared by both tasks: once
    wholes = [switchers[t].merged_path(c) for t, c in configs.items()]
    blocks = statistics.median(rss_growth(union) for _ in range(repeats))
    mono = statistics.median(rss_growth(wholes) for _ in range(repeats))
    return {"configs": {t: list(c) for t, c in configs.items()}, "blocks_resident": len(union),
            "rss_growth_blocks_bytes": blocks, "rss_growth_monolithic_bytes": mono,
            "all_resident_share_of_monolithic_sum": blocks / mono if mono else None,
            "disk_bytes_blocks": sum(p.stat().st_size for p in union),
            "disk_bytes_monolithic": sum(p.stat().st_size for p in wholes), "repeats": repeats}


def measure_mode(parts: dict[str, Any], tasks: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Switches between every pair of tasks that share blocks (uniform configs of
    ``args.variants``), and the memory of the first pair resident."""
    from switching import Switcher

    from backends import get_backend

    result: dict[str, Any] = {"cuts": {t: p.cuts for t, p in parts.items()},
                              "slot_macs_share": {t: p.slot_macs_share for t, p in parts.items()}}
    pairs = []
    for i, ta in enumerate(tasks):
        for tb in tasks[i + 1:]:
            if not set(parts[ta].blocks) & set(parts[tb].blocks):
                continue
            for v in (v for v in args.variants if v in parts[ta].variants and v in parts[tb].variants):
                ca, cb = (v,) * parts[ta].k, (v,) * parts[tb].k
                pairs += [((ta, ca), (tb, cb)), ((tb, cb), (ta, ca))]
    if not pairs:
        raise SystemExit("error: no two tasks share a block: nothing to measure")
    backend = get_backend("onnxruntime")
    with contextlib.ExitStack() as stack:  # each task's merged models, written once, deleted after
        switchers = {t: stack.enter_context(Switcher(parts[t], backend)) for t in tasks}
        rows = switching(switchers, pairs, repeats=args.repeats)
        first = pairs[0]
        result["memory"] = memory(parts, {first[0][0]: first[0][1], first[1][0]: first[1][1]}, switchers,
                                  repeats=3)
    result["pairs"] = rows
    warm = [r["speedup"] for r in rows if not r["cold"] and r["speedup"]]
    cold = [r["speedup"] for r in rows if r["cold"] and r["speedup"]]
    result["switch"] = {"cross_task_speedup_vs_monolithic": statistics.median(warm) if warm else None,
                        "cross_task_speedup_vs_monolithic_cold": statistics.median(cold) if cold else None,
                        "definition": "median over task pairs and variants of monolithic_s / differential_s "
                                      "(release + load on onnxruntime, medians over repeats)"}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="edge")
    ap.add_argument("--out", default="out/bench_sharing.json")
    ap.add_argument("--work", default=None, help="partition folder (default: out/sharing-<zoo>)")
    ap.add_argument("--tasks", nargs="*", help="the tasks to partition (default: every task of the zoo); only those that "
                    "share blocks are switched, so on the edge zoo `--tasks fashion-cls fashion-group` "
                    "skips partitioning the text and OCR tasks (most of a 10-minute run)")
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=["dense", "fp16", "unstructured-30"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cut-modes", nargs="*", default=["balanced", "head"], choices=["balanced", "head"],
                    help="balanced: the MAC-balanced cuts the demo uses; head: the last cut before the head")
    args = ap.parse_args(argv)
    folder, tasks = zoo_folder_and_tasks(args.zoo, args.tasks)
    name = zoo_name(folder)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"zoo": name, "tasks": tasks, "k": args.k, "by_cut_mode": {}}
    for mode in args.cut_modes:
        work = Path(args.work or f"out/sharing-{Path(name).name}") / mode
        result["by_cut_mode"][mode] = measure_mode(partitions(folder, tasks, work, args.k, mode), tasks, args)
    main_mode = "head" if "head" in result["by_cut_mode"] else args.cut_modes[0]
    result["switch"] = {**result["by_cut_mode"][main_mode]["switch"], "cut_mode": main_mode}
    result["memory"] = {**result["by_cut_mode"][main_mode]["memory"], "cut_mode": main_mode}
    result["settings"] = {"repeats": args.repeats, "variants": args.variants, "cut_modes": args.cut_modes,
                          "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                          "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    for mode, r in result["by_cut_mode"].items():
        m, sw = r["memory"], r["switch"]
        print(f"{mode} cuts: cross-task switch {sw['cross_task_speedup_vs_monolithic']:.1f}x faster than monolithic "
              f"(warm), {sw['cross_task_speedup_vs_monolithic_cold']:.1f}x (cold); both tasks resident: blocks "
              f"{m['rss_growth_blocks_bytes'] / 2**20:.1f} MB RSS vs whole models "
              f"{m['rss_growth_monolithic_bytes'] / 2**20:.1f} MB ({m['all_resident_share_of_monolithic_sum']:.0%}); "
              f"disk {m['disk_bytes_blocks'] / 2**20:.1f} vs {m['disk_bytes_monolithic'] / 2**20:.1f} MB")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
