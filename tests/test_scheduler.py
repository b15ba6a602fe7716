"""Scheduler decisions on hand-made plans: feasibility, backlogs, violate vs reject, correction."""

from __future__ import annotations

import math
import threading
import time

import pytest

from loom.core.errors import ConfigError
from loom.serving.correction import LatencyCorrector
from loom.serving.scheduler import Scheduler, dispatch_ms
from placement.plan import Plan


def plan(
    placement: tuple[str, ...],
    block_ms: tuple[float, ...],
    *,
    accuracy: float = 0.9,
    config: tuple[str, ...] | None = None,
    transfer: float = 0.0,
    dispatch: float = 0.0,
    task: str = "t",
) -> Plan:
    config = config or tuple("v" for _ in placement)
    transfers = tuple(transfer if placement[s] != placement[s + 1] else 0.0 for s in range(len(placement) - 1))
    return Plan(
        task=task, config=config, placement=placement,
        block_ids=tuple(f"{v}.s{s}" for s, v in enumerate(config)),
        latency_ms=sum(block_ms) + sum(transfers) + dispatch, block_ms=block_ms, transfer_ms=transfers,
        accuracy=accuracy, memory_bytes=0,
    )


def choose(s: Scheduler, cands: list[Plan], *, deadline_ms: float = 100.0, floor: float = 0.0,
           adaptive: bool = True, now: float = 0.0):  # noqa: ANN202
    return s.choose("t", cands, now_s=now, deadline_s=now + deadline_ms / 1e3, accuracy_floor=floor,
                    adaptive=adaptive)


def test_feasible_least_busy() -> None:
    s = Scheduler(["a", "b"])
    slow = plan(("b", "b"), (10.0, 10.0))
    fast = plan(("a", "a"), (2.0, 3.0))
    d = choose(s, [slow, fast])
    assert d.feasible and d.plan is fast
    assert d.predicted_finish_s == pytest.approx(0.005)
    assert d.segment_ms == (5.0,)


def test_finish_walks_segments_transfers_and_dispatch() -> None:
    s = Scheduler(["a", "b"])
    p = plan(("a", "b", "b"), (1.0, 2.0, 3.0), transfer=0.5, dispatch=0.25)
    assert dispatch_ms(p) == pytest.approx(0.25)
    d = choose(s, [p])
    assert d.predicted_finish_s == pytest.approx((0.25 + 1.0 + 0.5 + 5.0) / 1e3)
    assert d.segment_ms == (1.0, 5.0)


def test_accuracy_floor_filters() -> None:
    s = Scheduler(["a"])
    cheap = plan(("a",), (1.0,), accuracy=0.7, config=("int8",))
    good = plan(("a",), (4.0,), accuracy=0.95, config=("dense",))
    assert choose(s, [cheap, good], floor=0.5).plan is cheap
    assert choose(s, [cheap, good], floor=0.9).plan is good


def test_ties_go_to_earliest_finish() -> None:
    s = Scheduler(["a", "b"])
    on_a = plan(("a",), (5.0,))
    on_b = plan(("b",), (5.0,))
    s.admit("t", [on_a], now_s=0.0, deadline_s=0.01, accuracy_floor=0.0, adaptive=False)
    # equal busy time: the idle processor finishes first (a's queued job is due earlier)
    assert choose(s, [on_a, on_b]).plan is on_b


def test_moves_off_a_busy_processor() -> None:
    s = Scheduler(["a", "b"])
    on_a = plan(("a", "a"), (2.0, 2.0))
    on_b = plan(("b", "b"), (3.0, 3.0))
    assert choose(s, [on_a, on_b], deadline_ms=20).plan is on_a
    # 30 ms of work queued on a, each job on time, 18 ms of it due before 20 ms: a's plan
    # (4 ms) cannot make a 20 ms deadline
    for k in range(1, 11):
        s.admit("t", [plan(("a",), (3.0,))], now_s=0.0, deadline_s=(3 * k + 0.5) / 1e3, accuracy_floor=0.0,
                adaptive=False)
    assert s.backlog_ms(0.0)["a"] == pytest.approx(30.0)
    d = choose(s, [on_a, on_b], deadline_ms=20)
    assert d.feasible and d.plan is on_b


def test_edf_backlog_counts_only_work_ahead() -> None:
    s = Scheduler(["a"])
    s.admit("t", [plan(("a",), (10.0,))], now_s=0.0, deadline_s=5.0, accuracy_floor=0.0, adaptive=False)
    # a request due before that queued one goes first under EDF: a is free for it now
    assert s.free_at(0.0, deadline_s=1.0)["a"] == pytest.approx(0.0)
    assert s.free_at(0.0, deadline_s=9.0)["a"] == pytest.approx(0.010)
    # a started job is never preempted, and its remaining time shrinks as it runs
    (r,) = s.admit("t", [plan(("a",), (8.0,))], now_s=0.0, deadline_s=6.0, accuracy_floor=0.0, adaptive=False)[1]
    s.start(r, 0.0)
    assert s.free_at(0.002, deadline_s=1.0)["a"] == pytest.approx(0.002 + 0.006)
    s.finish(r)
    s.finish(r)  # idempotent
    assert s.reserved() == {"a": 1}


def test_unservable_violate_picks_earliest_finish() -> None:
    s = Scheduler(["a", "b"], on_unservable="violate")
    p1 = plan(("a",), (50.0,))
    p2 = plan(("b",), (30.0,))
    d = choose(s, [p1, p2], deadline_ms=10)
    assert not d.feasible and d.plan is p2
    assert d.predicted_finish_s == pytest.approx(0.030)


def test_unservable_violate_most_accurate_when_none_meets_floor() -> None:
    s = Scheduler(["a"], on_unservable="violate")
    low = plan(("a",), (1.0,), accuracy=0.5, config=("x",))
    high = plan(("a",), (9.0,), accuracy=0.8, config=("y",))
    d = choose(s, [low, high], floor=0.9)
    assert not d.feasible and d.plan is high


def test_unservable_reject() -> None:
    s = Scheduler(["a"], on_unservable="reject")
    d, reserved = s.admit("t", [plan(("a",), (50.0,))], now_s=0.0, deadline_s=0.01, accuracy_floor=0.0,
                          adaptive=True)
    assert d.plan is None and not d.feasible and reserved == []
    assert math.isinf(d.predicted_finish_s)
    assert s.reserved() == {"a": 0}


def test_non_adaptive_always_first() -> None:
    s = Scheduler(["a", "b"])
    first = plan(("a",), (50.0,))
    better = plan(("b",), (1.0,))
    d = choose(s, [first, better], deadline_ms=10, adaptive=False)
    assert d.plan is first and not d.feasible
    d = choose(s, [first, better], deadline_ms=100, adaptive=False)
    assert d.plan is first and d.feasible
    # reject applies to fixed plans too: it is the runtime's admission rule
    r = Scheduler(["a", "b"], on_unservable="reject")
    assert choose(r, [first, better], deadline_ms=10, adaptive=False).plan is None


def test_no_candidates() -> None:
    d = choose(Scheduler(["a"]), [])
    assert d.plan is None and not d.feasible


def test_bad_on_unservable() -> None:
    with pytest.raises(ConfigError):
        Scheduler(["a"], on_unservable="drop")


def test_correction_moves_the_choice() -> None:
    corr = LatencyCorrector()
    s = Scheduler(["a", "b"], corrector=corr)
    on_a = plan(("a", "a"), (2.0, 2.0))
    on_b = plan(("b", "b"), (3.0, 3.0))
    assert choose(s, [on_a, on_b]).plan is on_a
    for i in range(20):  # a runs 2x slower than predicted
        corr.observe("v.s0", "a", 2.0, 4.0, now_s=i * 0.001)
    d = choose(s, [on_a, on_b], now=0.02)
    assert d.plan is on_b


def test_admit_is_atomic_across_threads() -> None:
    s = Scheduler(["a", "b"])
    on_a = plan(("a",), (10.0,))
    on_b = plan(("b",), (10.0,))
    picks: list[str] = []
    lock = threading.Lock()

    def go() -> None:
        d, _ = s.admit("t", [on_a, on_b], now_s=0.0, deadline_s=0.5, accuracy_floor=0.0, adaptive=True)
        with lock:
            picks.append(d.plan.placement[0])

    threads = [threading.Thread(target=go) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # equal plans and each admission sees the previous ones: the work is split evenly
    assert abs(picks.count("a") - picks.count("b")) <= 1


def test_cheap_with_hundreds_of_candidates() -> None:
    procs = ["p0", "p1", "p2"]
    s = Scheduler(procs, corrector=LatencyCorrector())
    cands = [
        plan((procs[i % 3], procs[(i // 3) % 3], procs[(i // 9) % 3]), (1.0 + i % 7, 2.0, 1.5 + i % 5),
             config=(f"v{i % 10}", f"v{(i // 10) % 10}", f"v{i % 4}"), accuracy=0.8 + (i % 10) / 100)
        for i in range(300)
    ]
    for _ in range(50):
        s.admit("t", cands[:1], now_s=0.0, deadline_s=1.0, accuracy_floor=0.0, adaptive=False)
    t0 = time.perf_counter()
    for _ in range(20):
        choose(s, cands, floor=0.85)
    per_call = (time.perf_counter() - t0) / 20
    assert per_call < 0.05  # generous: it is about 1 ms here


def test_arrays_agree_with_the_loop() -> None:
    import random

    rng = random.Random(7)
    procs = ["p0", "p1", "p2"]
    corr = LatencyCorrector()
    for _ in range(60):
        corr.observe(f"v{rng.randrange(5)}.s{rng.randrange(3)}", rng.choice(procs), 1.0, rng.uniform(0.5, 3.0),
                     now_s=0.0)
    s = Scheduler(procs, corrector=corr)
    for _ in range(30):
        s.admit("t", [plan((rng.choice(procs),), (rng.uniform(1, 5),))], now_s=0.0,
                deadline_s=rng.uniform(0.001, 0.05), accuracy_floor=0.0, adaptive=False)
    for trial in range(40):
        cands = [
            plan(tuple(rng.choice(procs) for _ in range(3)), tuple(rng.uniform(0.5, 8.0) for _ in range(3)),
                 config=tuple(f"v{rng.randrange(5)}" for _ in range(3)), accuracy=rng.uniform(0.6, 1.0),
                 transfer=rng.uniform(0, 1), dispatch=rng.uniform(0, 0.5))
            for _ in range(60)
        ]
        now, deadline, floor = 0.001 * trial, 0.001 * trial + rng.uniform(0.005, 0.04), rng.uniform(0.6, 0.95)
        free = s.free_at(now, deadline_s=deadline)
        view = corr.view(now)
        fast = s._best(cands, now, deadline, floor, free, view, {})
        slow = s._best_loop(cands, now, deadline, floor, free, view, {})
        assert fast[2:] == slow[2:]
        for a, b in zip(fast[:2], slow[:2], strict=True):
            if a != b:  # only a float tie may differ
                pa = s._price(a, cands[a], now, free, view, {})
                pb = s._price(b, cands[b], now, free, view, {})
                assert pa.busy_ms == pytest.approx(pb.busy_ms) and pa.finish_s == pytest.approx(pb.finish_s)


def test_a_planned_mix_is_followed_by_its_shares() -> None:
    s = Scheduler(["a", "b"])
    fast = plan(("a",), (1.0,), config=("x",))
    slow = plan(("b",), (2.0,), config=("x",))
    s.set_mix("t", {(fast.config, fast.placement): 0.75, (slow.config, slow.placement): 0.25})
    picks = [choose(s, [fast, slow], now=i * 1.0).plan for i in range(40)]  # idle between requests
    assert picks.count(fast) == 30 and picks.count(slow) == 10  # greedy alone would take `fast` 40 times
    s.set_mix("t", None)
    assert all(choose(s, [fast, slow], now=100.0 + i).plan is fast for i in range(5))


def test_a_mix_falls_back_to_any_on_time_plan_and_rejects_when_none_is() -> None:
    s = Scheduler(["a", "b"])
    quick = plan(("a",), (1.0,), config=("q",))
    late = plan(("b",), (50.0,), config=("l",))
    s.set_mix("t", {(late.config, late.placement): 0.9, (quick.config, quick.placement): 0.1})
    d = choose(s, [quick, late], deadline_ms=10.0)
    assert d.plan is quick and d.feasible  # the share says `late`, the deadline says no
    s2 = Scheduler(["a", "b"], on_unservable="reject")
    s2.set_mix("t", {(late.config, late.placement): 1.0})
    # no plan of the mix is on time: a candidate outside it that is serves the request
    d = choose(s2, [quick, late], deadline_ms=10.0)
    assert d.plan is quick and d.feasible
    # and when no candidate at all is on time, the request is rejected
    d = choose(s2, [late], deadline_ms=10.0)
    assert d.plan is None and not d.feasible


def test_wake_up_tail_is_tracked_and_delays_an_idle_processor_only_when_asked() -> None:
    from loom.serving.correction import LatencyCorrector

    s = Scheduler(["a", "b"], corrector=LatencyCorrector())
    for i in range(400):  # 4 in 5 wake-ups are quick, 1 in 5 waits 4 ms: the p90 is 4 ms
        s.observe_wake("a", 0.004 if i % 5 == 0 else 0.0001, now_s=i * 0.001)
    now = 0.4
    assert 1.0 < s.wake_ms(now)["a"] < 4.5
    assert s.free_at(now) == {"a": now, "b": now}  # tracked, not used
    s.wake_aware = True
    free = s.free_at(now)
    assert free["a"] > now and free["b"] == now
    # a processor left alone relaxes back (half-life 5 s)
    assert s.free_at(now + 30)["a"] - (now + 30) < 0.05 * (free["a"] - now)
    # without an enabled corrector nothing is learned
    off = Scheduler(["a"], corrector=LatencyCorrector(enabled=False))
    off.observe_wake("a", 0.004, now_s=0.0)
    assert off.wake_ms(0.0) == {}
