"""The hot-subgraph preloader and the runtime's memory budget (NullBackend: modelled bytes)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from backends.null import NullBackend
from loom.serving.preload import HotnessTracker, Preloader, plan_keys, replaceability
from loom.serving.runtime import Runtime, TaskBinding
from loom.serving.scheduler import Scheduler
from placement.plan import Plan
from tests.test_runtime import make_plan, task_blocks, x

BLOCK = 1000  # modelled bytes of every block
MB = 2**20


def plan(task: str, blocks: tuple[str, ...], procs: tuple[str, ...], ms: float = 1.0) -> Plan:
    k = len(blocks)
    return Plan(task=task, config=tuple(f"v{i}" for i in range(k)), placement=procs, block_ids=blocks,
                latency_ms=ms * k, block_ms=(ms,) * k, transfer_ms=(0.0,) * (k - 1), accuracy=0.9,
                memory_bytes=0)


# -- hotness ------------------------------------------------------------------------------------
def test_hotness_decays_and_follows_a_shifting_workload() -> None:
    tr = HotnessTracker(half_life_s=1.0)
    a = plan("t", ("A0", "A1"), ("p", "p"))
    b = plan("t", ("B0", "B1"), ("p", "p"))
    for _ in range(10):
        tr.record_use(a, 0.0)
    s0, s1 = tr.scores(0.0)[("A0", "p")], tr.scores(1.0)[("A0", "p")]
    assert s1 == pytest.approx(s0 / 2)  # one half-life later: half
    assert tr.scores(10.0)[("A0", "p")] < s0 / 1000
    for i in range(5):  # the workload moves to b
        tr.record_use(b, 5.0 + i * 0.1)
    now = tr.scores(6.0)
    assert now[("B0", "p")] > now[("A0", "p")]


def test_replaceability_raises_a_block_many_plans_need() -> None:
    shared = [plan("t", ("S", f"X{i}"), ("p", "p")) for i in range(4)]
    pen = replaceability({"t": shared})
    # S is in every plan (and nothing does without it); X0 has equally fast alternatives
    assert pen[("S", "p")] > pen[("X0", "p")]
    assert pen[("X0", "p")] == pytest.approx(0.25)
    # a block whose best alternative is much slower is harder to replace
    fast, slow = plan("u", ("F",), ("p",), ms=1.0), plan("u", ("G",), ("p",), ms=3.0)
    pen2 = replaceability({"u": [fast, slow]})
    assert pen2[("F", "p")] == pytest.approx(0.5 + 2.0)
    assert pen2[("G", "p")] == pytest.approx(0.5)
    pre = Preloader(10 * BLOCK)
    pre.set_candidates({"t": shared})
    for p in shared:  # used equally often: the shared block is still hotter
        pre.record_use(p, 0.0)
    heat = pre.hotness(0.0)
    assert heat[("S", "p")] > heat[("X0", "p")] * 2


def test_initial_set_respects_the_budget_and_prefers_hot_blocks() -> None:
    plans = [plan("t", ("S", f"X{i}"), ("p", "p")) for i in range(6)]
    sizes = {k: BLOCK for p in plans for k in plan_keys(p)}
    sizes[("X5", "p")] = 5 * BLOCK
    pre = Preloader(3 * BLOCK)
    chosen = pre.initial_set({"t": plans}, {"t": 10.0}, sizes, shares={"t": [5, 1, 1, 1, 1, 1]})
    assert sum(sizes[k] for k in chosen) <= 3 * BLOCK
    assert ("S", "p") in chosen and ("X0", "p") in chosen  # the shared block and the planned favourite
    assert ("X5", "p") not in chosen
    assert pre.initial_set({"t": plans}, {"t": 1.0}, sizes) <= set(sizes)
    assert Preloader(0).initial_set({"t": plans}, {"t": 1.0}, sizes) == set()


def test_make_room_evicts_the_coldest_unprotected() -> None:
    pre = Preloader(2 * BLOCK, margin_bytes=0)
    hot, cold = plan("t", ("H",), ("p",)), plan("t", ("C",), ("p",))
    for _ in range(5):
        pre.record_use(hot, 0.0)
    pre.record_use(cold, 0.0)
    resident = {("H", "p"): BLOCK, ("C", "p"): BLOCK}
    evict, ok = pre.make_room(BLOCK, resident, (), 0.0)
    assert evict == [("C", "p")] and ok
    evict, ok = pre.make_room(BLOCK, resident, [("C", "p"), ("H", "p")], 0.0)
    assert evict == [] and not ok  # everything protected: over budget, and it says so
    pre.note_size(("N", "p"), BLOCK)  # a missing block's size is what the budget knows of it
    assert pre.on_request(plan("t", ("N",), ("p",)), {"p": {"H": BLOCK, "C": BLOCK}}, 0.0) == [("C", "p")]


# -- scheduler ----------------------------------------------------------------------------------
def test_scheduler_prefers_resident_plans_when_a_load_breaks_the_deadline() -> None:
    resident_plan = plan("t", ("R",), ("p",), ms=5.0)
    fast_cold = plan("t", ("C",), ("p",), ms=1.0)
    cands = [fast_cold, resident_plan]
    kw = {"now_s": 0.0, "deadline_s": 0.010, "accuracy_floor": 0.5, "adaptive": True}
    plain = Scheduler(["p"])
    assert plain.choose("t", cands, **kw).plan is fast_cold  # least busy, loads not priced
    aware = Scheduler(["p"], resident=lambda b, p: b == "R", load_ms=lambda b, p: 20.0)
    d = aware.choose("t", cands, **kw)
    assert d.plan is resident_plan and d.feasible
    # a cheap load does not break the deadline: the faster plan stays the choice
    cheap = Scheduler(["p"], resident=lambda b, p: b == "R", load_ms=lambda b, p: 1.0)
    assert cheap.choose("t", cands, **kw).plan is fast_cold
    # the vectorized path (many candidates) prices loads the same way
    many = [fast_cold] * 30 + [resident_plan]
    assert aware.choose("t", many, **kw).plan is resident_plan


def test_under_a_budget_the_mix_takes_only_resident_plans() -> None:
    resident_plan = plan("t", ("R",), ("p",), ms=5.0)
    fast_cold = plan("t", ("C",), ("p",), ms=1.0)
    kw = {"now_s": 0.0, "deadline_s": 0.100, "accuracy_floor": 0.5, "adaptive": True}
    s = Scheduler(["p"], resident=lambda b, p: b == "R", load_ms=lambda b, p: 1.0)
    s.set_mix("t", {(fast_cold.config, fast_cold.placement): 1.0})
    # the cold plan is on time even with its load, but following the mix into a load
    # would evict what others need: the resident plan serves
    assert s.choose("t", [fast_cold, resident_plan], **kw).plan is resident_plan
    # without residency hooks (no budget) the mix is followed
    free = Scheduler(["p"])
    free.set_mix("t", {(fast_cold.config, fast_cold.placement): 1.0})
    assert free.choose("t", [fast_cold, resident_plan], **kw).plan is fast_cold


# -- the runtime under a budget -------------------------------------------------------------------
def three_tasks(tmp_path: Path) -> tuple[list[TaskBinding], dict[str, Path]]:
    ms = {"a": 0.2, "b": 0.2}
    tasks, paths = [], {}
    for t, placement in (("t1", ("a", "b")), ("t2", ("a", "a")), ("t3", ("b", "b"))):
        p = task_blocks(tmp_path / t, t, ["v"], 2)
        paths.update(p)
        tasks.append(TaskBinding(t, [make_plan(t, ("v", "v"), placement, ms)], p, latency_ms=500,
                                 accuracy_floor=0.5))
    return tasks, paths


def backends() -> dict[str, NullBackend]:
    return {p: NullBackend(latency_ms=0.2, memory_bytes=BLOCK, load_ms=1.0) for p in ("a", "b")}


def test_budget_is_never_exceeded_and_evictions_happen(tmp_path: Path) -> None:
    tasks, _paths = three_tasks(tmp_path)  # 6 blocks, 2 per plan; the budget holds 3
    budget, margin = 3 * BLOCK, 0
    with Runtime(backends=backends(), tasks=tasks, adaptive=False,
                 memory_budget_mb=budget / MB, preloader=Preloader(0, margin)) as rt:
        assert rt.stats()["memory"]["resident_bytes"] <= budget + margin
        for i in range(60):
            out = rt.submit(("t1", "t2", "t3")[i % 3], x()).result(timeout=10)
            assert out["y"].shape == (1, 4)
            st = rt.stats()
            assert st["memory"]["resident_bytes"] <= budget + margin
            assert sum(st["resident_bytes"].values()) == st["memory"]["resident_bytes"]
        st = rt.stats()
    assert sum(st["evictions"].values()) > 0
    assert sum(st["loads"].values()) > 6 and sum(st["load_seconds"].values()) > 0
    assert st["counts"]["ok"] + st["counts"]["late"] == 60
    assert st["memory"]["peak_bytes"] <= budget + margin and st["memory"]["over_budget"] == 0


def test_budget_holds_under_concurrent_requests(tmp_path: Path) -> None:
    tasks, _paths = three_tasks(tmp_path)
    budget, margin = 4 * BLOCK, 2 * BLOCK
    futures: list[Future] = []
    lock = threading.Lock()
    with Runtime(backends=backends(), tasks=tasks, adaptive=False,
                 preloader=Preloader(budget, margin)) as rt:

        def client(i: int) -> None:
            for j in range(30):
                f = rt.submit(("t1", "t2", "t3")[(i + j) % 3], x())
                with lock:
                    futures.append(f)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(f.result(timeout=30)["y"].shape == (1, 4) for f in futures)
        st = rt.stats()
    assert len(futures) == 120 and st["counts"]["error"] == 0
    assert st["memory"]["peak_bytes"] <= budget + margin
    assert st["memory"]["resident_bytes"] <= budget + margin


def test_budget_for_everything_never_evicts(tmp_path: Path) -> None:
    tasks, paths = three_tasks(tmp_path)
    with Runtime(backends=backends(), tasks=tasks, adaptive=False, memory_budget_mb=6 * BLOCK / MB,
                 preloader=Preloader(0, sizes={(b, p): BLOCK for b in paths for p in "ab"})) as rt:
        assert rt.stats()["memory"]["resident_bytes"] == 6 * BLOCK  # the initial set is everything
        for i in range(30):
            rt.submit(("t1", "t2", "t3")[i % 3], x()).result(timeout=10)
        st = rt.stats()
    assert sum(st["evictions"].values()) == 0
    assert sum(st["loads"].values()) == 6


def test_initial_set_only_is_loaded_at_start(tmp_path: Path) -> None:
    tasks, paths = three_tasks(tmp_path)
    sizes = {(b, p): BLOCK for b in paths for p in "ab"}
    with Runtime(backends=backends(), tasks=tasks, adaptive=False,
                 preloader=Preloader(2 * BLOCK, sizes=sizes)) as rt:
        st = rt.stats()
        assert sum(len(v) for v in st["resident"].values()) == 2
        assert sum(st["evictions"].values()) == 0


def test_runtime_prefers_the_resident_plan_under_a_tight_deadline(tmp_path: Path) -> None:
    ms = {"a": 1.0}
    paths = task_blocks(tmp_path, "t", ["slow", "fast"], 1)
    slow = make_plan("t", ("slow",), ("a",), {"a": 5.0})
    fast = make_plan("t", ("fast",), ("a",), ms)
    tasks = [TaskBinding("t", [fast, slow], paths, latency_ms=30, accuracy_floor=0.5)]
    be = {"a": NullBackend(latency_ms={"t.slow.s0": 5.0, "*": 1.0}, memory_bytes=BLOCK, load_ms=60.0)}
    # the budget holds one block, and the initial set is the slow plan's (sizes say so)
    sizes = {("t.slow.s0", "a"): BLOCK, ("t.fast.s0", "a"): 2 * BLOCK}
    with Runtime(backends=be, tasks=tasks, preloader=Preloader(BLOCK, sizes=sizes)) as rt:
        assert rt.stats()["resident"]["a"] == ["t.slow.s0"]
        for _ in range(5):
            rt.submit("t", x()).result(timeout=10)
        st = rt.stats()
    # loading the fast block (60 ms) would break the 30 ms bound: the resident plan runs
    assert st["resident"]["a"] == ["t.slow.s0"] and st["counts"]["ok"] == 5
    assert st["loads"]["a"] == 1


def test_idle_workers_prefetch_into_free_budget_only(tmp_path: Path) -> None:
    tasks, paths = three_tasks(tmp_path)
    # the size guess (2 blocks' worth) lets the initial set take 2 pairs; loaded, each
    # measures 1 block, which leaves room that idle workers fill, hottest first
    sizes = {(b, p): 2 * BLOCK for b in paths for p in "ab"}
    budget = 4 * BLOCK
    with Runtime(backends=backends(), tasks=tasks, adaptive=False, preloader=Preloader(budget, sizes=sizes)) as rt:
        assert sum(len(v) for v in rt.stats()["resident"].values()) == 2
        for i in range(30):
            rt.submit(("t1", "t2", "t3")[i % 3], x()).result(timeout=10)
            assert rt.stats()["memory"]["resident_bytes"] <= budget
        st = rt.stats()
    assert st["prefetches"] > 0
    assert st["memory"]["peak_bytes"] <= budget and st["memory"]["over_budget"] == 0


def test_slow_loads_are_not_prefetched(tmp_path: Path) -> None:
    tasks, paths = three_tasks(tmp_path)
    sizes = {(b, p): 2 * BLOCK for b in paths for p in "ab"}
    be = {p: NullBackend(latency_ms=0.2, memory_bytes=BLOCK, load_ms=30.0) for p in ("a", "b")}
    with Runtime(backends=be, tasks=tasks, adaptive=False, preloader=Preloader(4 * BLOCK, sizes=sizes),
                 prefetch_max_load_ms=5.0) as rt:
        for i in range(12):
            rt.submit(("t1", "t2", "t3")[i % 3], x()).result(timeout=10)
        st = rt.stats()
    assert st["prefetches"] == 0
