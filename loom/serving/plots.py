"""Plots of a run's records and memory, as PNG files (matplotlib, Agg canvas).

matplotlib is imported inside each function (it costs ~0.3 s) and drawn on a bare
Figure with the Agg canvas: no pyplot, so no global state, no GUI, safe off the main thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loom.serving.metrics import RequestRecord

__all__ = ["plot_latency_cdf", "plot_memory", "plot_timeline", "plot_violations_by_policy"]


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_violations_by_policy(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Bar chart of SLO violation rate (%) per policy.

    ``rows``: dicts with ``policy``, ``slo_violation_rate`` (0..1, None counts as 0) and
    optionally ``group`` (a scenario, a device): with groups, bars are grouped by it,
    one color per policy.
    """
    fig = _figure()
    ax = fig.add_subplot()
    policies = list(dict.fromkeys(str(r["policy"]) for r in rows))
    groups = list(dict.fromkeys(str(r.get("group", "")) for r in rows))
    value = {(str(r.get("group", "")), str(r["policy"])): 100.0 * float(r["slo_violation_rate"] or 0.0) for r in rows}
    width = 0.8 / max(len(policies), 1)
    x = np.arange(len(groups))
    for i, pol in enumerate(policies):
        heights = [value.get((g, pol), 0.0) for g in groups]
        ax.bar(x + (i - (len(policies) - 1) / 2) * width, heights, width, label=pol)
    if groups == [""]:
        ax.set_xticks([])
    else:
        ax.set_xticks(x, groups)
    top = max(value.values(), default=0.0)
    ax.set_ylim(0, max(top * 1.25, 1.0))  # headroom so the legend does not cover bars
    ax.set_ylabel("SLO violations (%)")
    ax.set_title("SLO violation rate by policy")
    if policies:
        ax.legend(fontsize="small", ncols=min(len(policies), 4))
    return _save(fig, path)


def plot_latency_cdf(
    records_by_policy: Mapping[str, Sequence[RequestRecord]], path: str | Path, *, normalized: bool = False
) -> Path:
    """CDF of completed requests' latency per policy.

    ``normalized``: plot latency / bound (tasks with different bounds on one axis; the
    line at 1 is the SLO).
    """
    fig = _figure()
    ax = fig.add_subplot()
    for pol, recs in records_by_policy.items():
        vals = np.sort(
            [
                r.latency_ms / r.latency_bound_ms if normalized else r.latency_ms
                for r in recs
                if r.completed and r.latency_ms is not None
            ]
        )
        if vals.size:
            ax.step(vals, np.arange(1, vals.size + 1) / vals.size, where="post", label=f"{pol} (n={vals.size})")
    if normalized:
        ax.axvline(1.0, color="k", linestyle="--", linewidth=1)
        ax.set_xlabel("latency / latency bound")
    else:
        ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title("Latency CDF (completed requests)")
    if records_by_policy:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_timeline(records: Sequence[RequestRecord], path: str | Path, max_requests: int = 200) -> Path:
    """One lane per processor, each block span a bar colored by task (the first
    ``max_requests`` requests by arrival, so the bars stay readable)."""
    from matplotlib import colormaps

    fig = _figure(9.0, 3.5)
    ax = fig.add_subplot()
    chosen = sorted(records, key=lambda r: (r.arrival_s, r.id))[:max_requests]
    procs = sorted({s[0] for r in chosen for s in r.spans})
    tasks = sorted({r.task for r in chosen})
    cmap = colormaps["tab10"]
    color = {t: cmap(i % 10) for i, t in enumerate(tasks)}
    lane = {p: i for i, p in enumerate(procs)}
    # One broken_barh per (processor, task): hundreds of artists instead of thousands.
    bars: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in chosen:
        for proc, _blk, a, b in r.spans:
            bars.setdefault((proc, r.task), []).append((a, b - a))
    for (proc, task), xranges in bars.items():
        ax.broken_barh(xranges, (lane[proc] - 0.4, 0.8), facecolors=color[task])
    ax.set_yticks(range(len(procs)), procs)
    ax.set_xlabel("time (s)")
    ax.set_title(f"Processor timeline ({len(chosen)} requests)")
    if tasks:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=color[t], label=t) for t in tasks], fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_memory(
    series: Sequence[tuple[float, float]] | Mapping[str, Sequence[tuple[float, float]]], path: str | Path
) -> Path:
    """Resident memory (MiB) over time: one ``RssSampler.series``, or several by label."""
    fig = _figure()
    ax = fig.add_subplot()
    labelled = dict(series) if isinstance(series, Mapping) else {"": series}
    for label, points in labelled.items():
        if not points:
            continue
        t, mb = zip(*points, strict=True)
        peak = max(mb)
        ax.plot(t, mb, label=f"{label} (peak {peak:.0f} MiB)".strip())
    ax.set_xlabel("time (s)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("Resident memory")
    if any(labelled.values()):
        ax.legend(fontsize="small")
    return _save(fig, path)
