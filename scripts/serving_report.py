"""bench_serving's rows and what it makes of them: one row per run, medians and spreads over the
repeats per cell and policy, the ratios (on medians), and the printed table."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from loom.app.run import RunResult

#: what is summarized over the repeats, per cell and policy
SUMMARIZED = ("slo_violation_rate", "goodput_rps", "throughput_rps", "p99_ms")


def row_of(run: RunResult, *, cell: str, load: float, slo: str, offered: float, repeat: int) -> dict[str, Any]:
    o = run.summary["overall"]
    return {"cell": cell, "load": load, "slo": slo, "repeat": repeat, "policy": run.policy, "offered_rps": offered,
            "slo_violation_rate": o["slo_violation_rate"], "goodput_rps": o["goodput_rps"],
            "throughput_rps": o["throughput_rps"], "p50_ms": o["p50_ms"], "p99_ms": o["p99_ms"],
            "peak_rss_mb": run.peak_rss_mb, "n": o["n"], "utilization": run.summary["utilization"],
            "errors": run.errors, "by_task": {t: {"slo_violation_rate": v["slo_violation_rate"], "p99_ms": v["p99_ms"]}
                                              for t, v in run.summary["tasks"].items()}}


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median, min and max of the values that are not None (all None when none is)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def median(values: Sequence[float | None]) -> float | None:
    return spread(values)["median"]


def summarize_cells(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{cell: {policy: {metric: {"median", "min", "max"}, "repeats": n}}}`` over the runs' repeats."""
    cells: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for r in runs:
        cells.setdefault(r["cell"], {}).setdefault(r["policy"], []).append(r)
    return {cell: {pol: {**{m: spread([r[m] for r in rs]) for m in SUMMARIZED}, "repeats": len(rs)}
                   for pol, rs in by_policy.items()}
            for cell, by_policy in cells.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def ratios_of(cells: Mapping[str, Mapping[str, Any]], bounds: Mapping[str, float],
              measured: Mapping[str, float]) -> dict[str, Any]:
    """Per cell with sparseloom: its violation reduction and goodput ratio against every other policy,
    its goodput as a share of the fluid bound, and every policy's as a share of the measured bound,
    all on the medians over the repeats."""
    out: dict[str, Any] = {}
    for key, cell in cells.items():
        if "sparseloom" not in cell:
            continue
        viol = {p: s["slo_violation_rate"]["median"] for p, s in cell.items()}
        good = {p: s["goodput_rps"]["median"] for p, s in cell.items()}
        sl_v, sl_g = viol["sparseloom"], good["sparseloom"]
        others = [p for p in cell if p != "sparseloom"]
        out[key] = {
            "violation_reduction_vs": {p: None if sl_v is None or not viol[p] else 1 - sl_v / viol[p] for p in others},
            "goodput_ratio_vs": {p: ratio(sl_g, good[p]) for p in others},
            "goodput_share_of_bound": ratio(sl_g, bounds.get(key)),
            "goodput_share_of_measured_bound": {p: ratio(g, measured.get(key)) for p, g in good.items()},
        }
    return out


def _pct(s: Mapping[str, float | None]) -> str:
    if s["median"] is None:
        return "-"
    return f"{s['median']:.1%} [{s['min']:.1%}–{s['max']:.1%}]"


def _num(s: Mapping[str, float | None], fmt: str = ".1f") -> str:
    if s["median"] is None:
        return "-"
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}–{s['max']:{fmt}}]"


def print_report(result: Mapping[str, Any]) -> None:
    """The table (median [min–max] over the repeats), the ratios, the capacities and the drift run."""
    cells, bounds, measured = result["cells"], result["goodput_bound_rps"], result["measured_bound_rps"]
    print(f"{result['repeats']} repeat(s) per cell; median [min–max]")
    print(f"{'cell':<11} {'policy':<19} {'violations':>24} {'goodput /s':>22} {'p99 ms':>22}")
    for key, cell in cells.items():
        for pol, s in cell.items():
            print(f"{key:<11} {pol:<19} {_pct(s['slo_violation_rate']):>24} {_num(s['goodput_rps']):>22} "
                  f"{_num(s['p99_ms'], '.2f'):>22}")
    for key, rt in result["ratios"].items():
        red = ", ".join(f"{p} {v:+.0%}" for p, v in rt["violation_reduction_vs"].items() if v is not None)
        gp = ", ".join(f"{p} {v:.2f}x" for p, v in rt["goodput_ratio_vs"].items() if v is not None)
        share = rt["goodput_share_of_bound"]
        print(f"{key}: violations down vs {red}; goodput vs {gp}; "
              f"{'-' if share is None else f'{share:.0%}'} of the fluid bound {bounds[key]:.1f}/s")
        if measured.get(key) is not None:
            shares = ", ".join(f"{p} {v:.0%}" for p, v in rt["goodput_share_of_measured_bound"].items() if v is not None)
            print(f"{key}: measured bound (closed loop, median) {measured[key]:.0f}/s; goodput as a share of it: {shares}")
    if result.get("capacity_rps"):
        caps = ", ".join(f"{p} {v:.0f}/s" for p, v in result["capacity_rps"].items())
        print(f"capacity (<= 10% violations, loose SLO): {caps}")
    for r in result.get("drift", {}).get("runs", []):
        during, share = r["violation_rate_during_contention"], r["share_on_slowed_processor_during"]
        print(f"drift, correction {'on ' if r['correction'] else 'off'}: violations {r['slo_violation_rate']:.1%} "
              f"overall, {'-' if during is None else f'{during:.1%}'} during contention, "
              f"{'-' if share is None else f'{share:.0%}'} of requests on the slowed processor")
