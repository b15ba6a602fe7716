"""Overload: late requests queue behind the ones still on time, are shed past a bound, and
goodput holds at three times the capacity (the runtime on simulated time, so no wall clock)."""

from __future__ import annotations

import math

import pytest

from loom.app.arrivals import TraceItem
from loom.app.sim_latency import LatencyModel
from loom.app.sim_runtime import SimRuntime
from loom.serving.runtime import TaskBinding
from loom.serving.scheduler import Scheduler
from placement.plan import Plan


def plan(proc: str, block: str, ms: float) -> Plan:
    return Plan(task="a", config=("v",), placement=(proc,), block_ids=(block,), latency_ms=ms, block_ms=(ms,),
                transfer_ms=(), accuracy=0.9, memory_bytes=0)


def admit(s: Scheduler, p: Plan, *, now_ms: float, bound_ms: float):  # noqa: ANN201
    return s.admit("a", [p], now_s=now_ms / 1e3, deadline_s=(now_ms + bound_ms) / 1e3, accuracy_floor=0.0,
                   adaptive=False)


def test_a_late_request_queues_behind_the_ones_on_time() -> None:
    s = Scheduler(["p"])
    late, (r_late,) = admit(s, plan("p", "b", 10.0), now_ms=0.0, bound_ms=1.0)
    assert late.plan is not None and not late.feasible
    assert r_late.key[0] == math.inf  # behind every request with a deadline
    # a request that can still make its deadline does not wait for the late one
    on_time, (r,) = admit(s, plan("p", "b", 2.0), now_ms=0.0, bound_ms=5.0)
    assert on_time.feasible and on_time.predicted_finish_s == pytest.approx(0.002)
    assert r.key < r_late.key


def test_a_request_predicted_too_late_is_shed() -> None:
    s = Scheduler(["p"])
    s.late_bound_factor = 2.0
    admit(s, plan("p", "b", 4.0), now_ms=0.0, bound_ms=10.0)  # on time: 4 ms of work queued
    d, reservations = admit(s, plan("p", "b", 30.0), now_ms=0.0, bound_ms=5.0)
    # 4 + 30 ms ends 29 ms late; the bound allows 2 x 5 ms: shed, nothing reserved
    assert d.plan is None and d.shed and "shed" in d.reason and reservations == []
    assert s.backlog_ms(0.0)["p"] == pytest.approx(4.0)


def serve(rate_rps: float, *, seconds: float = 3.0, on_unservable: str = "violate",
          actual_ms: float = 1.0) -> SimRuntime:
    binding = TaskBinding(task="a", candidates=[plan("p", "b", 1.0)], block_paths={}, latency_ms=5.0,
                          accuracy_floor=0.0)
    sim = SimRuntime(tasks=[binding], processors=["p"], latency=LatencyModel({("b", "p"): actual_ms}),
                     policy_name="sv-lo-np", adaptive=False, on_unservable=on_unservable)
    n = int(rate_rps * seconds)
    sim.run([TraceItem(i / rate_rps, "a", i, 0) for i in range(n)])
    assert len(sim.records) == n  # every request ends with a result or an explicit error
    return sim


def goodput(sim: SimRuntime) -> int:
    return sum(r.status == "ok" for r in sim.records)


def test_goodput_holds_at_three_times_the_capacity() -> None:
    at_capacity = goodput(serve(900.0))  # 1 ms per request on one processor: ~1,000/s
    overloaded = serve(2700.0)
    assert goodput(overloaded) >= 0.9 * at_capacity
    statuses = {r.status for r in overloaded.records}
    assert statuses <= {"ok", "late", "rejected"} and "rejected" in statuses
    shed = [r for r in overloaded.records if r.status == "rejected"]
    assert all("OverloadError" in r.error and "shed" in r.error for r in shed)


def test_reject_resolves_a_request_whose_deadline_passed_while_it_waited() -> None:
    # the plan says 1 ms, the processor takes 4: admitted on time, then late in the queue
    sim = serve(500.0, seconds=1.0, on_unservable="reject", actual_ms=4.0)
    expired = [r for r in sim.records if r.status == "rejected" and "deadline passed" in (r.error or "")]
    assert expired and all("OverloadError" in r.error for r in expired)
    assert all(r.latency_ms <= 5.0 + 4.0 + 1e-6 for r in sim.records if r.status != "rejected")
