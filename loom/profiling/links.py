"""Link calibration: what a placed chain costs beyond the sum of its blocks.

Fitted on the profiler's placed-config rows: a dispatch cost per chain (by its first
processor) plus, per link, a cost per hand-off and per byte. Why this split, and how
well it predicts, is in ``docs/profiling.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from loom.core.errors import ConfigError
from loom.processors.device import DeviceProfile

MODEL = ("measured_ms = sum_blocks_ms + dispatch[first processor] "
         "+ sum over hand-offs (latency[link] + bytes / bandwidth[link])")
FIT = "least squares of the relative error (rows weighted by 1 / measured), coefficients >= 0"


def parse_transfers(text: str) -> list[tuple[str, str, int, int]]:
    """``a>b@1=4096;b>a@2=512`` -> [(a, b, 1, 4096), (b, a, 2, 512)]."""
    out = []
    for part in filter(None, text.split(";")):
        head, _, nbytes = part.rpartition("=")
        pair, _, slot = head.rpartition("@")
        src, _, dst = pair.partition(">")
        out.append((src, dst, int(slot), int(nbytes)))
    return out


def link_key(a: str, b: str) -> str:
    """A link's name, the same both ways: ``a|b`` with the names sorted."""
    return "|".join(sorted((a, b)))


def segments_of(placement: Sequence[str]) -> list[str]:
    """The processor of each run of consecutive slots: ``a;a;b;a`` -> ``[a, b, a]``."""
    out: list[str] = []
    for p in placement:
        if not out or out[-1] != p:
            out.append(p)
    return out


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0 (a cost cannot be negative): drop the most
    negative coefficient and refit until none is (an active-set method, enough here)."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


def _fit_quality(measured: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    err = (predicted - measured) / measured
    return {
        "mape_pct": round(float(np.mean(np.abs(err))) * 100, 2),
        "within_10pct": round(float(np.mean(np.abs(err) <= 0.10)), 3),
        "median_error_pct": round(float(np.median(err)) * 100, 2),
    }


def _design(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str], np.ndarray]:
    """First processors, links, and the design matrix: a one-hot column per first
    processor, then per link a column of hand-offs and one of bytes handed over."""
    firsts = [r["placement"].split(";")[0] for r in rows]
    procs = sorted(set(firsts))
    links = sorted({link_key(s, d) for r in rows for s, d, _, _ in parse_transfers(r["transfers"])})
    n_p = len(procs)
    x = np.zeros((len(rows), n_p + 2 * len(links)))
    for i, (r, first) in enumerate(zip(rows, firsts, strict=True)):
        x[i, procs.index(first)] = 1.0
        for s, d, _, nbytes in parse_transfers(r["transfers"]):
            j = n_p + 2 * links.index(link_key(s, d))
            x[i, j] += 1.0
            x[i, j + 1] += nbytes
    return procs, links, x


def _fit(x: np.ndarray, y: np.ndarray, measured: np.ndarray, n_p: int) -> tuple[np.ndarray, np.ndarray]:
    """The coefficients on every row, and each row's extra cost predicted leaving it out."""
    # Byte columns in MB so that the fit is well conditioned; scaled back after.
    scale = np.ones(x.shape[1])
    scale[n_p + 1 :: 2] = 1e6
    # Rows weighted by 1 / measured: the fit minimizes relative error. Unweighted, the
    # millisecond-scale noise of the largest models decides every coefficient and the
    # sub-millisecond configs (most of them) come out worse than with no model at all.
    w = 1.0 / np.maximum(measured, 1e-9)

    def fit(keep: np.ndarray) -> np.ndarray:
        return _nonneg_lstsq(x[keep] / scale * w[keep, None], y[keep] * w[keep]) / scale

    everything = np.ones(len(y), dtype=bool)
    loo = np.empty(len(y))
    for i in range(len(y)):
        keep = everything.copy()
        keep[i] = False
        loo[i] = x[i] @ fit(keep)
    return fit(everything), loo


def _link_figures(x: np.ndarray, coef: np.ndarray, n_p: int, links: list[str]) -> dict[str, dict[str, Any]]:
    """Each link's fitted latency and bandwidth in the device profile's units."""
    out = {}
    for j, key in enumerate(links):
        col = n_p + 2 * j
        per_byte_ms = float(coef[col + 1])
        used = x[:, col] > 0
        out[key] = {
            "between": key.split("|"),
            "latency_us": round(float(coef[col]) * 1e3, 2),
            # ms per byte -> 1e9 bytes per second; None: no per-byte cost was measurable
            "bandwidth_gbps": round(1.0 / (per_byte_ms * 1e-3) / 1e9, 3) if per_byte_ms > 0 else None,
            "n_configs": int(used.sum()),
            "bytes_range": [int(x[used, col + 1].min()), int(x[used, col + 1].max())] if used.any() else None,
        }
    return out


def _device_quality(rows: Sequence[dict[str, Any]], measured: np.ndarray, sums: np.ndarray,
                    device: DeviceProfile) -> dict[str, Any]:
    """How well the device profile's own dispatch and link figures predict the rows."""
    try:
        prior = sums + np.array([
            device.chain_overhead_ms(r["placement"].split(";"),
                                     [b for _, _, _, b in parse_transfers(r["transfers"])])
            for r in rows
        ])
        return _fit_quality(measured, prior)
    except ConfigError as exc:  # a placement over a link the profile does not list
        return {"error": str(exc)}


def _quality_by_task(rows: Sequence[dict[str, Any]], measured: np.ndarray, sums: np.ndarray,
                     loo: np.ndarray) -> dict[str, Any] | None:
    """Sum of blocks vs calibrated (leave one out) per task; None with a single task."""
    tasks = np.array([str(r.get("task", "")) for r in rows])
    if len(set(tasks)) <= 1:
        return None
    return {
        t: {"n": int((tasks == t).sum()),
            "sum_of_blocks": _fit_quality(measured[tasks == t], sums[tasks == t]),
            "calibrated_leave_one_out": _fit_quality(measured[tasks == t], loo[tasks == t])}
        for t in sorted(set(tasks))
    }


def calibrate_links(configs: Sequence[dict[str, Any]], device: DeviceProfile | None = None) -> dict[str, Any]:
    """Fit what a placed chain costs beyond the sum of its blocks' isolated medians.

    ``measured - sum_blocks = dispatch[first processor]
    + sum over hand-offs (latency[link] + bytes / bandwidth[link])``.

    Returns the fitted figures in the device profile's units (``dispatch_us`` per
    processor, ``latency_us`` and ``bandwidth_gbps`` per link), and how well the sum
    of blocks alone, the device profile's own figures and the calibrated ones predict
    the measured latency, in-sample and leave-one-out.
    """
    rows = [r for r in configs if r["status"] == "ok" and r["sum_blocks_ms"] is not None]
    if not rows:
        return {"n_configs": 0, "note": "no measured configs"}
    procs, links, x = _design(rows)
    measured = np.array([r["measured_ms_median"] for r in rows])
    sums = np.array([r["sum_blocks_ms"] for r in rows])
    coef, loo_extra = _fit(x, measured - sums, measured, len(procs))
    loo = sums + loo_extra
    result: dict[str, Any] = {
        "n_configs": len(rows),
        "model": MODEL,
        "fit": FIT,
        "processors": {
            p: {"dispatch_us": round(float(coef[k]) * 1e3, 2), "n_configs": int((x[:, k] > 0).sum())}
            for k, p in enumerate(procs)
        },
        "links": _link_figures(x, coef, len(procs), links),
        "quality": {
            "sum_of_blocks": _fit_quality(measured, sums),
            "calibrated_in_sample": _fit_quality(measured, sums + x @ coef),
            "calibrated_leave_one_out": _fit_quality(measured, loo),
        },
    }
    if device is not None:
        result["quality"]["device_profile"] = _device_quality(rows, measured, sums, device)
    by_task = _quality_by_task(rows, measured, sums, loo)
    if by_task is not None:
        result["quality_by_task"] = by_task
    return result
