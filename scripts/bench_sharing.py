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
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loom.core.paths import resolve_zoo, zoo_name, zoo_tasks  # noqa: E402
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


def _time_switch(parts: dict, backend: Any, a: tuple[str, tuple], b: tuple[str, tuple], *, cold: bool,
                 merged: dict) -> dict[str, float]:
    from switching import drop_page_cache, warm_page_cache

    (ta, ca), (tb, cb) = a, b
    ids_a = list(dict.fromkeys(parts[ta].variants[v][s] for s, v in enumerate(ca)))
    ids_b = list(dict.fromkeys(parts[tb].variants[v][s] for s, v in enumerate(cb)))
    path = {**{i: parts[ta].block_path(i) for i in ids_a}, **{i: parts[tb].block_path(i) for i in ids_b}}
    missing, drop = [i for i in ids_b if i not in ids_a], [i for i in ids_a if i not in ids_b]
    prep = drop_page_cache if cold else warm_page_cache
    resident = {i: backend.load(path[i], block_id=i) for i in ids_a}
    prep([path[i] for i in missing])
    t0 = time.perf_counter()
    for i in drop:
        backend.release(resident.pop(i))
    for i in missing:
        resident[i] = backend.load(path[i], block_id=i)
    diff = time.perf_counter() - t0
    for blk in resident.values():
        backend.release(blk)
    whole = backend.load(merged[a], block_id="mono-a")
    prep([merged[b]])
    t0 = time.perf_counter()
    backend.release(whole)
    whole = backend.load(merged[b], block_id="mono-b")
    mono = time.perf_counter() - t0
    backend.release(whole)
    return {"differential_s": diff, "monolithic_s": mono, "blocks_loaded": len(missing),
            "blocks_kept": len(ids_a) - len(drop), "bytes_differential": sum(path[i].stat().st_size for i in missing),
            "bytes_monolithic": merged[b].stat().st_size}


def switching(parts: dict, pairs: list[tuple[tuple[str, tuple], tuple[str, tuple]]], merged: dict, *,
              repeats: int) -> list[dict[str, Any]]:
    from backends import get_backend

    backend = get_backend("onnxruntime")
    rows = []
    for cold in (False, True):
        for a, b in pairs:
            runs = [_time_switch(parts, backend, a, b, cold=cold, merged=merged) for _ in range(repeats)]
            d = statistics.median(r["differential_s"] for r in runs)
            m = statistics.median(r["monolithic_s"] for r in runs)
            rows.append({"from": [a[0], *a[1]], "to": [b[0], *b[1]], "cold": cold, "differential_s": d,
                         "monolithic_s": m, "speedup": m / d if d > 0 else None, "repeats": repeats,
                         **{k: runs[0][k] for k in ("blocks_loaded", "blocks_kept", "bytes_differential",
                                                     "bytes_monolithic")}})
            say(f"{'cold' if cold else 'warm'} {'|'.join(rows[-1]['from'])} -> {'|'.join(rows[-1]['to'])}: "
                f"differential {1e3 * d:.1f} ms, monolithic {1e3 * m:.1f} ms ({m / d:.1f}x)")
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


def memory(parts: dict, configs: dict[str, tuple], merged: dict, *, repeats: int) -> dict[str, Any]:
    ids = {parts[t].variants[v][s]: parts[t] for t, c in configs.items() for s, v in enumerate(c)}
    union = [part.block_path(bid) for bid, part in ids.items()]  # a block shared by both tasks: once
    wholes = [merged[(t, c)] for t, c in configs.items()]
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
    from loom.core.onnxutil import save_model
    from loom.model.stitch import merge_config

    result: dict[str, Any] = {"cuts": {t: p.cuts for t, p in parts.items()},
                              "slot_macs_share": {t: p.slot_macs_share for t, p in parts.items()}}
    with tempfile.TemporaryDirectory(prefix="bench-sharing-") as tmp:
        merged: dict[tuple[str, tuple], Path] = {}
        pairs = []
        for i, ta in enumerate(tasks):
            for tb in tasks[i + 1:]:
                if not set(parts[ta].blocks) & set(parts[tb].blocks):
                    continue
                for v in (v for v in args.variants if v in parts[ta].variants and v in parts[tb].variants):
                    ca, cb = (v,) * parts[ta].k, (v,) * parts[tb].k
                    for t, c in ((ta, ca), (tb, cb)):
                        merged[(t, c)] = save_model(merge_config(parts[t], c), Path(tmp) / f"{t}-{v}.onnx")
                    pairs += [((ta, ca), (tb, cb)), ((tb, cb), (ta, ca))]
        if not pairs:
            raise SystemExit("error: no two tasks share a block: nothing to measure")
        rows = switching(parts, pairs, merged, repeats=args.repeats)
        first = pairs[0]
        result["memory"] = memory(parts, {first[0][0]: first[0][1], first[1][0]: first[1][1]}, merged, repeats=3)
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
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=["dense", "fp16", "unstructured-30"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cut-modes", nargs="*", default=["balanced", "head"], choices=["balanced", "head"],
                    help="balanced: the MAC-balanced cuts the demo uses; head: the last cut before the head")
    args = ap.parse_args(argv)
    folder = resolve_zoo(args.zoo)
    name, tasks = zoo_name(folder), zoo_tasks(folder)
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
