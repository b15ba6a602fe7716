"""What a run measures: one record per request, their summary, JSONL files, memory samples.

A request's ``status`` is one of ``ok``, ``late``, ``inaccurate``, ``rejected``, ``error``
(every one but ``ok`` is an SLO violation; see ``slo_status``). Times ``*_s`` are seconds
on the runtime's clock, latencies ``*_ms`` milliseconds, memory MiB. The plots are in
``loom.serving.plots``; design notes: docs/serving.md.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from loom.core.errors import LoomError

Status = Literal["ok", "late", "inaccurate", "rejected", "error"]
STATUSES: tuple[str, ...] = ("ok", "late", "inaccurate", "rejected", "error")
#: Statuses of requests that ran to the end (their latency is a real latency).
COMPLETED: tuple[str, ...] = ("ok", "late", "inaccurate")
#: (processor, block_id, start_s, end_s): one block of a request run on a processor.
Span = tuple[str, str, float, float]


def slo_status(
    latency_ms: float, latency_bound_ms: float, plan_accuracy: float | None, accuracy_floor: float
) -> tuple[Status, bool]:
    """``(status, below_floor)`` of a completed request; lateness wins over inaccuracy.

    A plan of unknown accuracy (None) is not held against the request.
    """
    below = plan_accuracy is not None and plan_accuracy < accuracy_floor
    if latency_ms > latency_bound_ms:
        return "late", below
    return ("inaccurate" if below else "ok"), below


@dataclass
class RequestRecord:
    """One request, from arrival to its end.

    ``status``: ``ok`` (in time, plan at or above the floor), ``late`` (after its bound;
    ``below_floor`` keeps whether the plan was also below the floor), ``inaccurate`` (in
    time, plan below the floor), ``rejected`` (no plan could serve it and the config says
    ``reject``), ``error`` (failed; ``error`` holds the message).
    """

    id: int
    task: str
    policy: str
    arrival_s: float
    #: when it was dispatched to its first processor (None: never dispatched)
    start_s: float | None
    #: when its result (or failure) was ready (None: never ran)
    end_s: float | None
    #: end - arrival, queueing included (None for rejected requests)
    latency_ms: float | None
    latency_bound_ms: float
    accuracy_floor: float
    #: predicted accuracy of the plan it ran on (None: no plan)
    plan_accuracy: float | None = None
    #: variant per slot of the stitched config it ran on
    config: tuple[str, ...] | None = None
    #: processor per slot
    placement: tuple[str, ...] | None = None
    status: Status = "ok"
    #: the plan was below the floor (also set when the status is ``late``)
    below_floor: bool = False
    error: str | None = None
    spans: list[Span] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A typo'd status would silently count as a violation of an unknown kind.
        if self.status not in STATUSES:
            raise ValueError(f"request {self.id}: status {self.status!r} is not one of {STATUSES}")

    @property
    def violated(self) -> bool:
        return self.status != "ok"

    @property
    def completed(self) -> bool:
        return self.status in COMPLETED

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RequestRecord:
        data = dict(data)
        for key in ("config", "placement"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        data["spans"] = [(str(p), str(b), float(s), float(e)) for p, b, s, e in data.get("spans") or []]
        return cls(**data)


# -- summaries ----------------------------------------------------------------------------------
def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def _group_summary(records: Sequence[RequestRecord], seconds: float) -> dict[str, Any]:
    counts = {s: 0 for s in STATUSES}
    for r in records:
        counts[r.status] += 1
    n = len(records)
    completed = counts["ok"] + counts["late"] + counts["inaccurate"]
    lat = [r.latency_ms for r in records if r.completed and r.latency_ms is not None]
    return {
        "n": n,
        "ok": counts["ok"],
        "late": counts["late"],
        "inaccurate": counts["inaccurate"],
        "below_floor": sum(1 for r in records if r.below_floor),
        "rejected": counts["rejected"],
        "errors": counts["error"],
        # None, not 0: with no request there is no rate to claim
        "slo_violation_rate": (n - counts["ok"]) / n if n else None,
        "goodput_rps": counts["ok"] / seconds,
        "throughput_rps": completed / seconds,
        "p50_ms": _percentile(lat, 50),
        "p95_ms": _percentile(lat, 95),
        "p99_ms": _percentile(lat, 99),
    }


def busy_seconds(intervals: Iterable[tuple[float, float]], start_s: float = -math.inf, end_s: float = math.inf) -> float:
    """Length of the union of intervals, clipped to ``[start_s, end_s]``.

    Overlapping spans on one processor (two blocks in flight, or clocks that disagree by a
    hair) count once: a processor is busy or not.
    """
    clipped = sorted((max(a, start_s), min(b, end_s)) for a, b in intervals)
    total, cur_a, cur_b = 0.0, None, None
    for a, b in clipped:
        if b <= a:
            continue
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return total


def utilization(records: Iterable[RequestRecord], start_s: float, end_s: float) -> dict[str, float]:
    """Per processor: the fraction of ``[start_s, end_s]`` it spent running blocks."""
    per_proc: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        for proc, _block, a, b in r.spans:
            per_proc.setdefault(proc, []).append((a, b))
    window = end_s - start_s
    return {p: busy_seconds(iv, start_s, end_s) / window for p, iv in sorted(per_proc.items())}


def summarize(records: Sequence[RequestRecord], duration_s: float, *, warmup_s: float = 0.0) -> dict[str, Any]:
    """Per-task and overall figures of a run of ``duration_s`` seconds.

    Requests arriving before ``warmup_s`` are left out, rates divide by
    ``duration_s - warmup_s``, utilization covers ``[warmup_s, duration_s]``.
    Returns ``{"duration_s", "warmup_s", "policies", "overall": {...}, "tasks": {task:
    {...}}, "utilization": {processor: fraction}}``; each group has n, ok, late,
    inaccurate, below_floor, rejected, errors, slo_violation_rate (None when n = 0),
    goodput_rps, throughput_rps, p50_ms/p95_ms/p99_ms (of completed requests; None when
    there are none).
    """
    seconds = duration_s - warmup_s
    if not seconds > 0:
        raise ValueError(f"duration_s ({duration_s}) must exceed warmup_s ({warmup_s})")
    kept = [r for r in records if r.arrival_s >= warmup_s]
    by_task: dict[str, list[RequestRecord]] = {}
    for r in kept:
        by_task.setdefault(r.task, []).append(r)
    return {
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "policies": sorted({r.policy for r in kept}),
        "overall": _group_summary(kept, seconds),
        "tasks": {t: _group_summary(rs, seconds) for t, rs in sorted(by_task.items())},
        "utilization": utilization(kept, warmup_s, duration_s),
    }


# -- collection and files -----------------------------------------------------------------------
class MetricsCollector:
    """Thread-safe sink for ``RequestRecord``s (workers record from their own threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []

    def record(self, rec: RequestRecord) -> None:
        with self._lock:
            self._records.append(rec)

    @property
    def records(self) -> list[RequestRecord]:
        """A snapshot, in the order recorded."""
        with self._lock:
            return list(self._records)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def summary(self, duration_s: float, *, warmup_s: float = 0.0) -> dict[str, Any]:
        """See ``summarize``."""
        return summarize(self.records, duration_s, warmup_s=warmup_s)

    def write_jsonl(self, path: str | Path) -> Path:
        """One JSON object per request, sorted by id; returns the path."""
        return write_jsonl(self.records, path)

    @classmethod
    def from_jsonl(cls, path: str | Path) -> MetricsCollector:
        collector = cls()
        for rec in load_jsonl(path):
            collector.record(rec)
        return collector


def write_jsonl(records: Iterable[RequestRecord], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w") as f:
        for rec in sorted(records, key=lambda r: r.id):
            f.write(json.dumps(rec.to_json(), allow_nan=False) + "\n")
    tmp.replace(path)  # readers never see half a file
    return path


def load_jsonl(path: str | Path) -> list[RequestRecord]:
    """Records written by ``write_jsonl``; a ``LoomError`` names the file and line of a bad one."""
    path = Path(path)
    if not path.is_file():
        raise LoomError(f"{path}: no such file")
    out: list[RequestRecord] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(RequestRecord.from_json(json.loads(line)))
        except (ValueError, TypeError, KeyError) as exc:
            raise LoomError(f"{path}: line {lineno}: not a request record: {exc}") from exc
    return out


# -- memory --------------------------------------------------------------------------------------
class RssSampler:
    """Samples this process's resident memory (psutil RSS, MiB) from a background thread.

    Use as a context manager or with ``start()``/``stop()``. ``series`` holds
    ``(t_s, mb)`` with t from the start; one sample is taken at start and one at stop, so
    even a short run has a peak. ``peak_mb`` misses spikes shorter than the interval.
    """

    def __init__(self, interval_ms: float = 20.0) -> None:
        if not interval_ms > 0:
            raise ValueError(f"interval_ms must be > 0, got {interval_ms}")
        import psutil

        self.interval_s = interval_ms / 1e3
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._series: list[tuple[float, float]] = []

    def _sample(self) -> None:
        mb = self._proc.memory_info().rss / 2**20
        with self._lock:
            self._series.append((time.perf_counter() - self._t0, mb))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> RssSampler:
        if self._thread is not None:
            raise RuntimeError("RssSampler already started")
        self._t0 = time.perf_counter()
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def series(self) -> list[tuple[float, float]]:
        with self._lock:
            return list(self._series)

    @property
    def peak_mb(self) -> float:
        with self._lock:
            return max((mb for _, mb in self._series), default=0.0)
