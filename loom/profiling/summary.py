"""``loom profile``'s report: block latency per task and processor, and the link calibration.

``summarize`` reduces a dataset (one fingerprint's rows) to a table and the calibration's
figures; ``format_summary`` prints them as the CLI shows them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loom.profiling.dataset import ProfileDataset


def _cells(blocks: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """task -> processor -> the ok rows and the counts of unsupported and failed ones."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for r in blocks:
        cell = table.setdefault(r["task"], {}).setdefault(r["processor"], {"ok": [], "unsupported": 0, "error": 0})
        if r["status"] == "ok":
            cell["ok"].append(r)
        else:
            cell[r["status"]] += 1
    return table


def _table_row(task: str, proc: str, cell: dict[str, Any]) -> dict[str, Any]:
    ok = cell["ok"]
    lat = [r["latency_ms_median"] for r in ok]
    dense = [r["latency_ms_median"] for r in ok if "dense" in r["variants"].split(";")]
    return {
        "task": task, "processor": proc, "blocks_ok": len(ok), "unsupported": cell["unsupported"],
        "errors": cell["error"],
        "median_block_ms": float(np.median(lat)) if lat else None,
        "dense_chain_sum_ms": float(sum(dense)) if dense else None,
        "median_load_ms": float(np.median([r["load_ms"] for r in ok])) if ok else None,
        "median_memory_kb": float(np.median([r["memory_bytes"] for r in ok])) / 1024 if ok else None,
    }


def summarize(data: ProfileDataset, *, fingerprint: str | None = None) -> dict[str, Any]:
    """Block latency per task and processor, counts, composition and link calibration.

    Rows of one fingerprint only (default: the latest run's), so that a mixed dataset is
    not averaged across machines.
    """
    runs = data.meta.get("runs") or [{}]
    fid = fingerprint or runs[-1].get("fingerprint_id") or data.meta.get("fingerprint_id")
    table = _cells([r for r in data.blocks if r["fingerprint"] == fid])
    rows = [_table_row(task, proc, cell)
            for task, by_proc in sorted(table.items()) for proc, cell in sorted(by_proc.items())]
    return {
        "rows": {"blocks": len(data.blocks), "configs": len(data.configs)},
        "wall_s": data.meta.get("wall_s_total"),
        "block_table": rows,
        "link_calibration": data.meta.get("link_calibration", {}),
    }


def _f(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _block_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"{summary['rows']['blocks']} block rows, {summary['rows']['configs']} config rows, "
             f"{_f(summary['wall_s'], '.0f')} s of profiling"]
    lines.append(f"{'task':<12}{'processor':<12}{'ok':>4}{'unsup':>6}{'err':>4}{'median block ms':>17}"
                 f"{'dense chain ms':>16}{'load ms':>9}{'mem KB':>8}")
    for r in summary["block_table"]:
        lines.append(f"{r['task']:<12}{r['processor']:<12}{r['blocks_ok']:>4}{r['unsupported']:>6}{r['errors']:>4}"
                     f"{_f(r['median_block_ms']):>17}{_f(r['dense_chain_sum_ms']):>16}"
                     f"{_f(r['median_load_ms'], '.1f'):>9}{_f(r['median_memory_kb'], '.0f'):>8}")
    return lines


def _calibration_lines(cal: dict[str, Any]) -> list[str]:
    lines = [f"composition over {cal['n_configs']} placed configs (measured end to end vs predicted):"]
    for name, q in cal["quality"].items():
        if "mape_pct" in q:
            lines.append(f"  {name:<26} MAPE {q['mape_pct']:6.2f}%   within +-10%: {100 * q['within_10pct']:5.1f}%"
                         f"   median error {q['median_error_pct']:+.2f}%")
    for task, q in cal.get("quality_by_task", {}).items():
        a, b = q["sum_of_blocks"], q["calibrated_leave_one_out"]
        lines.append(f"    {task:<24} n={q['n']:<3} MAPE {a['mape_pct']:6.2f}% -> {b['mape_pct']:6.2f}%   "
                     f"within +-10%: {100 * a['within_10pct']:5.1f}% -> {100 * b['within_10pct']:5.1f}%")
    for proc, d in cal.get("processors", {}).items():
        lines.append(f"  dispatch into {proc}: {d['dispatch_us']} us per request starting there "
                     f"({d['n_configs']} configs)")
    for key, link in cal["links"].items():
        bw = "not measurable" if link["bandwidth_gbps"] is None else f"{link['bandwidth_gbps']} GB/s"
        lines.append(f"  link {key}: latency {link['latency_us']} us per hand-off, bandwidth {bw} "
                     f"({link['n_configs']} configs, {link['bytes_range']} bytes)")
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as ``loom profile`` prints it: the block table, then the calibration."""
    lines = _block_lines(summary)
    cal = summary["link_calibration"]
    if cal.get("n_configs"):
        lines += _calibration_lines(cal)
    return "\n".join(lines)
