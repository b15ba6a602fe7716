"""What a real Python runtime adds around the blocks, measured once to calibrate the simulator.

``HostOverhead.from_records`` takes one real run's per-request spans; the simulator then
draws the start delay, hand-off waits and block slow-down from these samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loom.app.sim_latency import LatencyModel
from loom.core.errors import ConfigError
from loom.serving.metrics import RequestRecord


@dataclass
class HostOverhead:
    """What a real runtime adds around the blocks, as empirical samples from a real run.

    ``start_delay_ms``: the wait before an idle worker starts a request's first segment;
    ``hand_off_ms``: the same wait at a hand-off between processors; ``block_ratio``: a
    block's measured time over its table median. Calibrate on one run and validate on
    others (``scripts/bench_sim.py``); why: ``docs/app.md``.
    """

    start_delay_ms: np.ndarray
    hand_off_ms: np.ndarray
    block_ratio: np.ndarray
    source: str = ""

    @classmethod
    def from_records(cls, records: Sequence[RequestRecord], latency: LatencyModel, *, source: str = "") -> HostOverhead:
        spans_by_proc: dict[str, list[tuple[float, float]]] = {}
        for r in records:
            for proc, _b, s0, s1 in r.spans:
                spans_by_proc.setdefault(proc, []).append((s0, s1))
        starts: dict[str, np.ndarray] = {}
        ends: dict[str, np.ndarray] = {}
        for proc, spans in spans_by_proc.items():
            spans.sort()
            starts[proc] = np.array([a for a, _ in spans])
            ends[proc] = np.maximum.accumulate(np.array([b for _, b in spans]))

        def idle_between(proc: str, t0: float, t1: float) -> bool:
            """No block ran on ``proc`` between t0 and t1 (t1: the start of the segment in question)."""
            j = int(np.searchsorted(starts[proc], t1, side="left")) - 1  # blocks that started before t1
            return j < 0 or ends[proc][j] <= t0

        start, hand, ratio = [], [], []
        for r in records:
            if not r.spans or r.latency_ms is None:
                continue
            first_proc, _b, first_start, _e = r.spans[0]
            if idle_between(first_proc, r.arrival_s, first_start):
                start.append((first_start - r.arrival_s) * 1e3)
            for (p0, _b0, _s0, e0), (p1, _b1, s1, _e1) in zip(r.spans, r.spans[1:], strict=False):
                if p0 != p1 and idle_between(p1, e0, s1):
                    hand.append((s1 - e0) * 1e3)
            for proc, b, s0, s1 in r.spans:
                m = latency.median_ms.get((b, proc))
                if m:
                    ratio.append((s1 - s0) * 1e3 / m)
        if not start or not ratio:
            raise ConfigError("host overhead: the run has no request that started on an idle processor")
        return cls(np.array(start), np.array(hand), np.array(ratio), source=source)

    def draw(self, samples: np.ndarray, rng: np.random.Generator) -> float:
        return float(samples[rng.integers(len(samples))])

    def summary(self) -> dict[str, Any]:
        def q(a: np.ndarray) -> dict[str, float]:
            return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                    "p99": float(np.percentile(a, 99))}
        return {"start_delay_ms": q(self.start_delay_ms),
                "hand_off_ms": q(self.hand_off_ms) if self.hand_off_ms.size else {"n": 0},
                "block_ratio": q(self.block_ratio), "source": self.source}
