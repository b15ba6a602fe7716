"""The benchmarks' headline figures, zoo beside zoo: one table from the JSON files they wrote.

Reads ``<dir>/<zoo>-<bench>.json`` for each zoo and benchmark (``bench_stitch``,
``bench_estimators``, ``bench_serving``, ``bench_memory``, ``bench_sim``, ``bench_sharing``:
names ``stitch``, ``estimators``, ``serving``, ``memory``, ``sim``, ``sharing``), takes
each one's headline figures (the issues' aims), prints them as a Markdown table with one
column per zoo, and writes them as JSON. A figure a file does not hold is shown as ``-``;
a missing file is named. Figures compare only within a column's machine and run.

    python scripts/bench_report.py out/bench-all --zoos edge embedded --out out/bench-all/report.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

BENCHES = ("stitch", "estimators", "serving", "memory", "sim", "sharing")

Figures = dict[str, Any]


def _get(d: Any, *path: Any) -> Any:
    for key in path:
        found = key in d if isinstance(d, Mapping) else (
            isinstance(d, list) and isinstance(key, int) and -len(d) <= key < len(d))
        if not found:
            return None
        d = d[key]
    return d


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if isinstance(x, int | float)]
    return statistics.fmean(xs) if xs else None


def stitch(d: Mapping[str, Any]) -> Figures:
    out: Figures = {}
    for mode in ("chained", "merged"):
        for k in (2, 3, 4):
            xs = [r["overhead"] for r in d.get("rows", []) if r.get("k") == k and r.get("mode") == mode]
            out[f"{mode} overhead, K={k} median (%)"] = 100 * statistics.median(xs) if xs else None
    return out


def estimators(d: Mapping[str, Any]) -> Figures:
    tasks = d.get("tasks", [])
    out: Figures = {
        "latency within ±10% (mean over tasks, %)": _pct(_mean([t.get("latency_within_10pct") for t in tasks])),
        "latency MAPE (mean over tasks, %)": _mean([t.get("latency_mape") for t in tasks]),
        "latency, unseen task MAPE (mean, %)": _mean([t.get("latency_unseen_task_mape") for t in tasks]),
        "accuracy MAE (mean over tasks, points)": _mean([t.get("accuracy_mae_pts") for t in tasks]),
        "accuracy Spearman (mean over tasks)": _mean([t.get("accuracy_spearman") for t in tasks]),
        "profiling time / exhaustive (mean, %)": _pct(_mean([t.get("profiling_share") for t in tasks])),
    }
    for t in tasks:
        out[f"latency within ±10%, {t.get('task')} (%)"] = _pct(t.get("latency_within_10pct"))
    return out


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _violation(cell: Mapping[str, Any], policy: str) -> float | None:
    s = cell.get(policy)
    if s is None:
        return None
    v = s.get("slo_violation_rate")
    return v.get("median") if isinstance(v, Mapping) else v


def serving(d: Mapping[str, Any]) -> Figures:
    out: Figures = {"best static plan's capacity (req/s)": _get(d, "settings", "capacity_rps")}
    cells = d.get("cells")
    if cells is None:  # a file from before repeats: one run per cell
        cells = {}
        for r in d.get("runs", []):
            cells.setdefault(f"{r['load']}/{r['slo']}", {})[r["policy"]] = r
    for name, cell in cells.items():
        sl = _violation(cell, "sparseloom")
        others = {p: _violation(cell, p) for p in cell if p != "sparseloom"}
        others = {p: v for p, v in others.items() if v is not None}
        best = min(others, key=others.get) if others else None
        out[f"{name}: sparseloom violations (%)"] = _pct(sl)
        out[f"{name}: best other (%)"] = None if best is None else f"{100 * others[best]:.1f} ({best})"
    for p, rps in (d.get("capacity_rps") or {}).items():
        out[f"capacity {p} (req/s)"] = rps
    for c, rps in (d.get("measured_bound_rps") or {}).items():
        if c.startswith("1.0/loose"):
            share = _get(d, "ratios", c, "goodput_share_of_measured_bound", "sparseloom")
            out["1.0/loose: measured bound (req/s)"] = rps
            out["1.0/loose: sparseloom goodput / measured bound (%)"] = _pct(share)
    for comp, us in (d.get("overhead_us") or {}).items():
        if us is not None:
            out[f"overhead, {comp} (µs per unit)"] = us
    return out


def memory(d: Mapping[str, Any]) -> Figures:
    out: Figures = {
        "switch speedup vs monolithic, warm (mean)": _get(d, "switch", "mean_speedup_vs_monolithic"),
        "switch across tasks vs monolithic, warm": _get(d, "switch", "cross_task_speedup_vs_monolithic"),
        "switch across tasks vs monolithic, cold": _get(d, "switch", "cross_task_speedup_vs_monolithic_cold"),
    }
    for name, aim in (d.get("aims") or {}).items():
        out[f"aim {name}"] = aim.get("met")
    for policy, e in (d.get("memory_saved_at_equal_violation") or {}).items():
        if isinstance(e, Mapping):
            out[f"memory saved at equal violations, {policy}"] = e.get("saved_share", e.get("saved"))
    return out


def sim(d: Mapping[str, Any]) -> Figures:
    rows = d.get("validation", [])
    gaps = [abs(r["measured_violation"] - r["simulated_violation"]) for r in rows
            if r.get("measured_violation") is not None and r.get("simulated_violation") is not None]
    raw = [abs(r["measured_violation"] - r["raw_simulated_violation"]) for r in rows
           if r.get("measured_violation") is not None and r.get("raw_simulated_violation") is not None]
    return {"simulated vs measured violations, mean absolute gap (points)": _pct(_mean(gaps)),
            "raw simulation, mean absolute gap (points)": _pct(_mean(raw)),
            "simulator speed (requests/s)": d.get("sim_requests_per_s")}


def sharing(d: Mapping[str, Any]) -> Figures:
    out: Figures = {}
    for mode, r in (d.get("by_cut_mode") or {}).items():
        out[f"{mode} cuts: switch across tasks vs monolithic, warm"] = _get(r, "switch", "cross_task_speedup_vs_monolithic")
        out[f"{mode} cuts: switch across tasks vs monolithic, cold"] = _get(
            r, "switch", "cross_task_speedup_vs_monolithic_cold")
        out[f"{mode} cuts: both tasks resident / sum of monolithic (%)"] = _pct(
            _get(r, "memory", "all_resident_share_of_monolithic_sum"))
    return out


EXTRACT: dict[str, Callable[[Mapping[str, Any]], Figures]] = {
    "stitch": stitch, "estimators": estimators, "serving": serving, "memory": memory, "sim": sim, "sharing": sharing,
}


def report(folder: Path, zoos: list[str]) -> dict[str, Any]:
    """{bench: {figure: {zoo: value}}}, and the files that were missing."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    missing: list[str] = []
    for bench in BENCHES:
        for zoo in zoos:
            path = folder / f"{zoo}-{bench}.json"
            if not path.is_file():
                missing.append(str(path))
                continue
            data = json.loads(path.read_text())
            for figure, value in EXTRACT[bench](data).items():
                table.setdefault(bench, {}).setdefault(figure, {})[zoo] = value
    return {"zoos": zoos, "figures": table, "missing": missing}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "met" if v else "not met"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def markdown(rep: Mapping[str, Any]) -> str:
    zoos = rep["zoos"]
    lines = []
    for bench, figures in rep["figures"].items():
        lines += [f"\n### {bench}", "", "| figure | " + " | ".join(zoos) + " |", "|---" * (len(zoos) + 1) + "|"]
        for figure, by_zoo in figures.items():
            lines.append(f"| {figure} | " + " | ".join(_fmt(by_zoo.get(z)) for z in zoos) + " |")
    if rep["missing"]:
        lines += ["", "missing: " + ", ".join(rep["missing"])]
    return "\n".join(lines).lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="where the benchmarks' JSON files are, named <zoo>-<bench>.json")
    ap.add_argument("--zoos", nargs="+", default=["edge", "embedded"])
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    rep = report(Path(args.folder), args.zoos)
    print(markdown(rep))
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
