"""The runtime's own CPU cost per request, component by component (opt-in).

An ``OverheadMeter`` given to ``Runtime(meter=...)`` accumulates ``time.thread_time_ns()``
deltas and counts per component (``decision``, ``submit``, ``begin``, ``block``,
``backend_run``, ``hand_off``, ``completion``), net of the clock readings' own cost, with
means, medians and p99 per unit. Without a meter the runtime pays one ``None`` check per
site. What each component holds, and what is not counted: docs/serving.md, "Overhead".
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

__all__ = ["COMPONENTS", "OVERHEAD", "OverheadMeter", "cpu_ns"]

#: the thread's CPU clock the meter's deltas are taken on (nanoseconds)
cpu_ns = time.thread_time_ns

#: every component, in the order of a request's way
COMPONENTS = ("decision", "submit", "begin", "block", "backend_run", "hand_off", "completion")

#: the components that are the runtime's own cost (``backend_run`` is the model's work)
OVERHEAD = ("decision", "submit", "begin", "block", "hand_off", "completion")


def _timer_cost_ns(rounds: int = 5, n: int = 2000) -> float:
    """CPU ns of one ``cpu_ns()`` reading: the median over a few rounds of ``n`` readings."""
    costs = []
    for _ in range(rounds):
        t0 = cpu_ns()
        for _ in range(n):
            cpu_ns()
        costs.append((cpu_ns() - t0) / n)
    return statistics.median(costs)


class OverheadMeter:
    """Accumulates the runtime's CPU time per component; ``report`` gives µs per unit."""

    def __init__(self, *, timer_ns: float | None = None, samples: int = 20_000) -> None:
        """``timer_ns``: the cost of one clock reading (measured here when not given);
        ``samples``: intervals kept per component for the percentiles."""
        self.timer_ns = _timer_cost_ns() if timer_ns is None else float(timer_ns)
        self.samples = samples
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget everything measured so far (say, after a warm-up)."""
        with self._lock:
            self.ns: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
            self.counts: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
            #: clock readings inside the measured intervals, per component (their cost is taken off)
            self.readings: dict[str, float] = dict.fromkeys(COMPONENTS, 0.0)
            #: per component, (ns, units, readings) of the first ``samples`` intervals
            self._kept: dict[str, list[tuple[int, int, float]]] = {c: [] for c in COMPONENTS}
            self.decisions = 0
            self.candidates = 0
            self.priced = 0

    # -- what the runtime calls -------------------------------------------------------------
    def add(self, component: str, ns: int, n: int = 1, readings: float = 1.0) -> None:
        """``n`` units of ``component`` took ``ns`` of CPU, ``readings`` clock readings' worth included."""
        with self._lock:
            self._count(component, ns, n, readings)

    def _count(self, component: str, ns: int, n: int, readings: float) -> None:
        self.ns[component] += ns
        self.counts[component] += n
        self.readings[component] += readings
        kept = self._kept[component]
        if len(kept) < self.samples:
            kept.append((ns, n, readings))

    def admitted(self, t0: int, t1: int, t2: int, t3: int, candidates: int, priced: int) -> None:
        """One ``submit``: entered at ``t0``, the decision from ``t1`` to ``t2``, left at ``t3``;
        ``candidates`` offered to the decision, ``priced`` pricings it did."""
        with self._lock:
            self._count("decision", t2 - t1, 1, 1)
            # t1 and t2 lie wholly inside the submit's interval, minus the decision's share
            self._count("submit", (t3 - t0) - (t2 - t1), 1, 2)
            self.decisions += 1
            self.candidates += candidates
            self.priced += priced

    def ran_blocks(self, segment_ns: int, run_ns: int, blocks: int) -> None:
        """A segment's ``blocks`` ran in ``segment_ns`` of CPU, ``run_ns`` of it inside the backend."""
        with self._lock:
            # the segment's own pair of readings, and the run's pairs (each half outside its run)
            self._count("block", segment_ns - run_ns, blocks, 1 + blocks)
            self._count("backend_run", run_ns, blocks, blocks)

    # -- what a report reads ----------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """µs of CPU per unit of each component (net of the clock's own cost, and raw), counts,
        µs per completed request in all, and the candidates offered and priced per decision."""
        with self._lock:
            ns, counts, readings = dict(self.ns), dict(self.counts), dict(self.readings)
            decisions, candidates, priced = self.decisions, self.candidates, self.priced
            kept = {c: list(v) for c, v in self._kept.items()}

        def per(c: str, net: bool) -> float | None:
            if not counts[c]:
                return None
            total = ns[c] - (readings[c] * self.timer_ns if net else 0.0)
            return max(0.0, total) / counts[c] / 1e3

        def quantile(c: str, q: float) -> float | None:
            units = sorted(max(0.0, ns_ - r * self.timer_ns) / n / 1e3 for ns_, n, r in kept[c] if n)
            return units[min(len(units) - 1, int(q * len(units)))] if units else None

        requests = counts["completion"]
        total_ns = sum(ns[c] - readings[c] * self.timer_ns for c in OVERHEAD)
        return {
            "overhead_us": {c: per(c, True) for c in COMPONENTS},
            "raw_us": {c: per(c, False) for c in COMPONENTS},
            "p50_us": {c: quantile(c, 0.5) for c in COMPONENTS},
            "p99_us": {c: quantile(c, 0.99) for c in COMPONENTS},
            "counts": counts,
            "per_request_us": max(0.0, total_ns) / requests / 1e3 if requests else None,
            "candidates_per_decision": candidates / decisions if decisions else None,
            "priced_per_decision": priced / decisions if decisions else None,
            "timer_us": self.timer_ns / 1e3,
        }
