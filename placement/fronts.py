"""Pareto filters over (latency, accuracy, memory) points, and the order plans are listed in."""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import Any

import numpy as np

from placement.plan import Plan


def pareto3(lat: Sequence[float], acc: Sequence[float], mem: Sequence[float], *, slack: float = 0.0) -> list[int]:
    """Indices of the Pareto set over (lat min, acc max, mem min); one of each group of equal points.

    A sweep in latency order keeping the 2-D staircase of (memory, accuracy) seen so
    far: a point is dominated iff an earlier one has memory <= and accuracy >= its own.
    O(n log n) apart from list inserts. With ``slack`` > 0, only an accuracy better by
    at least ``slack`` dominates (a looser filter, for estimated accuracies).
    """
    order = sorted(range(len(lat)), key=lambda i: (lat[i], -acc[i], mem[i], i))
    st_mem: list[float] = []  # ascending; st_acc ascending with it (a staircase)
    st_acc: list[float] = []
    keep: list[int] = []
    for i in order:
        m, a = mem[i], acc[i]
        j = bisect_right(st_mem, m) - 1
        if j >= 0 and (st_acc[j] >= a + slack if slack > 0 else st_acc[j] >= a):
            continue
        keep.append(i)
        lo = bisect_left(st_mem, m)
        hi = lo
        while hi < len(st_mem) and st_acc[hi] <= a:
            hi += 1
        del st_mem[lo:hi], st_acc[lo:hi]
        st_mem.insert(lo, m)
        st_acc.insert(lo, a)
    return keep


def pareto2(lat: Sequence[float], mem: Sequence[float]) -> list[int]:
    order = sorted(range(len(lat)), key=lambda i: (lat[i], mem[i], i))
    keep, best = [], math.inf
    for i in order:
        if mem[i] < best:
            keep.append(i)
            best = mem[i]
    return keep


def thin(idx: list[int], lat: Sequence[float], limit: int) -> list[int]:
    """At most ``limit`` of ``idx``, evenly spaced in latency order, keeping both ends."""
    if len(idx) <= limit:
        return idx
    idx = sorted(idx, key=lambda i: (lat[i], i))
    picks = np.unique(np.round(np.linspace(0, len(idx) - 1, limit)).astype(int))
    return [idx[int(p)] for p in picks]


def plan_order(p: Plan) -> tuple[Any, ...]:
    return (p.latency_ms, -p.accuracy, p.memory_bytes, p.config, p.placement)


__all__ = [
    "pareto2", "pareto3", "plan_order", "thin",
]
