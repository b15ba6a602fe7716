"""The runtime's own CPU cost per request, component by component (opt-in).

An ``OverheadMeter`` given to ``Runtime(meter=...)`` accumulates ``time.thread_time_ns()``
deltas (CPU time of the thread doing the work, so that waiting on a lock, a queue or a
sleeping backend costs nothing) and counts, per component:

- ``decision``: ``Scheduler.admit``: the candidates priced, a plan chosen, its segments
  reserved (per request; with how many candidates were offered and priced);
- ``submit``: the rest of ``Runtime.submit`` on the caller's thread: the inputs checked,
  the request registered, the preloader told, segment 0 queued (per request);
- ``begin``: a segment's job starting on its worker: the deadline check, its reservation
  marked started (per segment);
- ``block``: a block run *outside* the backend's own ``run``: the block fetched from the
  cache (a load, when it is not resident, counts here too), its feeds picked, the spans
  and the corrector fed, the segment's blocks held and released (per block run);
- ``backend_run``: the backend's ``run`` itself, on the worker's thread (per block run):
  not overhead, the reference it is compared to (for an engine whose threads are not the
  caller's, it holds only the caller's share);
- ``hand_off``: a segment that is not the last ending: its reservation released, the
  prefetch check, the next segment queued on its processor (per hand-off);
- ``completion``: the last segment ending: its reservation released, the prefetch check,
  the outputs checked, the ``RequestRecord`` built and given to ``on_record``, the future
  resolved (per completed request; a request ending in a backend error counts here too).

Not counted: the worker loop's own queue operations and wake-up report
(``loom.serving.edf``), and requests refused by an exception out of ``submit`` (a request
the scheduler rejects counts in ``decision`` and ``submit``, which emits its record).

Each reading of the thread clock costs CPU too (a system call, ~0.5 µs on a VM), and a
measured interval holds part of its own readings: the meter measures that cost when made
(``timer_ns``) and reports each component net of the readings inside it (``overhead_us``)
as well as raw (``raw_us``). Means are swayed by rare long intervals (a garbage
collection runs in whichever call allocates when it falls due), so the report also gives
the median and p99 per unit (``p50_us``, ``p99_us``) over the first ``samples`` intervals
of each component (a block's interval is its segment's, per block). When no meter is
given the runtime's hot path pays one ``None`` check per site and nothing else; with one,
a few readings per segment. Thread-safe: the workers report concurrently.
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
