"""The runtime on simulated processors (NullBackend: modelled latencies, zero outputs).

Assertions count requests and compare modelled figures; none depends on how fast this
machine is beyond "a few ms of sleep take a few ms".
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.null import NullBackend
from loom.core.errors import BackendError, ConfigError, RuntimeClosedError, SloUnservableError
from loom.serving.correction import LatencyCorrector
from loom.serving.edf import EdfWorker as _EdfWorker
from loom.serving.metrics import RequestRecord
from loom.serving.runtime import Runtime, TaskBinding
from placement.plan import Plan

WIDTH = 4


def write_block(path: Path, slot: int, k: int) -> Path:
    """Slot ``s`` reads ``h{s}`` (``x`` for the first) and writes ``h{s+1}`` (``y`` for the last)."""
    src = "x" if slot == 0 else f"h{slot}"
    dst = "y" if slot == k - 1 else f"h{slot + 1}"
    inits = []
    if slot % 2:
        inits.append(numpy_helper.from_array(np.ones([WIDTH], np.float32), "c"))
        node = helper.make_node("Add", [src, "c"], [dst])
    else:
        node = helper.make_node("Relu", [src], [dst])
    graph = helper.make_graph(
        [node], f"block{slot}",
        [helper.make_tensor_value_info(src, TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info(dst, TensorProto.FLOAT, ["batch", WIDTH])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def block_id(task: str, variant: str, slot: int) -> str:
    return f"{task}.{variant}.s{slot}"


def task_blocks(folder: Path, task: str, variants: list[str], k: int) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {
        block_id(task, v, s): write_block(folder / f"{block_id(task, v, s)}.onnx", s, k)
        for v in variants
        for s in range(k)
    }


def make_plan(task: str, config: tuple[str, ...], placement: tuple[str, ...], ms: dict[str, float],
              accuracy: float = 0.9) -> Plan:
    """A plan whose predictions are the processors' modelled latencies (``ms`` per processor)."""
    block_ms = tuple(ms[p] for p in placement)
    return Plan(
        task=task, config=config, placement=placement,
        block_ids=tuple(block_id(task, v, s) for s, v in enumerate(config)),
        latency_ms=sum(block_ms), block_ms=block_ms, transfer_ms=(0.0,) * (len(config) - 1),
        accuracy=accuracy, memory_bytes=0,
    )


def all_placements(task: str, variant: str, k: int, ms: dict[str, float], accuracy: float = 0.9) -> list[Plan]:
    return [make_plan(task, (variant,) * k, pl, ms, accuracy) for pl in itertools.product(sorted(ms), repeat=k)]


class Records:
    def __init__(self) -> None:
        self.items: list[RequestRecord] = []
        self._lock = threading.Lock()

    def __call__(self, rec: RequestRecord) -> None:
        with self._lock:
            self.items.append(rec)


def x(n: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.ones((n, WIDTH), np.float32)}


# -- serving ----------------------------------------------------------------------------------------
def test_many_threads_every_future_resolves(tmp_path: Path) -> None:
    ms = {"a": 1.0, "b": 1.5}
    backends = {p: NullBackend(latency_ms=v) for p, v in ms.items()}
    paths = {**task_blocks(tmp_path, "t1", ["v"], 2), **task_blocks(tmp_path, "t2", ["v"], 3)}
    tasks = [
        TaskBinding("t1", all_placements("t1", "v", 2, ms), paths, latency_ms=200, accuracy_floor=0.5),
        TaskBinding("t2", all_placements("t2", "v", 3, ms), paths, latency_ms=300, accuracy_floor=0.5),
    ]
    records = Records()
    futures: list[Future] = []
    lock = threading.Lock()
    with Runtime(backends=backends, tasks=tasks, on_record=records) as rt:
        assert set(rt.stats()["resident"]["a"]) == set(paths)  # every block preloaded everywhere

        def client(i: int) -> None:
            for j in range(50):
                f = rt.submit("t1" if (i + j) % 2 else "t2", x(2))
                with lock:
                    futures.append(f)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outs = [f.result(timeout=30) for f in futures]
        stats = rt.stats()
    assert len(outs) == 400
    assert all(set(o) == {"y"} and o["y"].shape == (2, WIDTH) for o in outs)
    assert len(records.items) == 400
    assert len({r.id for r in records.items}) == 400
    assert all(r.status in ("ok", "late") and r.error is None for r in records.items)
    for r in records.items[:20]:
        assert len(r.spans) == len(r.config)
        assert [s[0] for s in r.spans] == list(r.placement)
        assert r.arrival_s <= r.start_s <= r.spans[0][2] <= r.spans[-1][3] <= r.end_s
    assert stats["in_flight"] == 0 and stats["counts"]["submitted"] == 400
    assert stats["correction"]["observations"] > 0
    assert set(stats["queues"]) == {"a", "b"}


def test_segments_pipeline_across_processors(tmp_path: Path) -> None:
    ms = {"a": 3.0, "b": 3.0}
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    tasks = [TaskBinding("t", [make_plan("t", ("v", "v"), ("a", "b"), ms)], paths, 1000, 0.0)]
    records = Records()
    with Runtime(backends={p: NullBackend(latency_ms=v) for p, v in ms.items()}, tasks=tasks,
                 adaptive=False, on_record=records) as rt:
        for f in [rt.submit("t", x()) for _ in range(12)]:
            f.result(timeout=10)
    on_a = {r.id: r.spans[0] for r in records.items}
    on_b = {r.id: r.spans[1] for r in records.items}
    overlaps = sum(
        1 for i, sa in on_a.items() for j, sb in on_b.items() if i != j and sa[2] < sb[3] and sb[2] < sa[3]
    )
    # while b runs one request's second block, a runs the next request's first
    assert overlaps >= 5


def test_output_name_and_unknown_task(tmp_path: Path) -> None:
    ms = {"a": 0.5}
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    tasks = [TaskBinding("t", all_placements("t", "v", 2, ms), paths, 100, 0.0, output_name="y")]
    with Runtime(backends={"a": NullBackend(latency_ms=0.5)}, tasks=tasks) as rt:
        out = rt.submit("t", x(3)).result(timeout=5)
        assert isinstance(out, np.ndarray) and out.shape == (3, WIDTH)
        with pytest.raises(ConfigError, match="unknown task"):
            rt.submit("nope", x())


def test_bad_bindings_fail_at_construction(tmp_path: Path) -> None:
    ms = {"a": 0.5}
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    good = all_placements("t", "v", 2, ms)
    backends = {"a": NullBackend()}
    with pytest.raises(ConfigError, match="unknown processor"):
        Runtime(backends=backends, tasks=[TaskBinding("t", all_placements("t", "v", 2, {"zz": 1.0}), paths, 10, 0)])
    with pytest.raises(ConfigError, match="no file"):
        Runtime(backends=backends, tasks=[TaskBinding("t", good, {}, 10, 0)])
    with pytest.raises(ConfigError, match="no candidate"):
        Runtime(backends=backends, tasks=[TaskBinding("t", [], paths, 10, 0)])
    with pytest.raises(ConfigError):
        Runtime(backends=backends, tasks=[TaskBinding("t", good, paths, 10, 0)], on_unservable="drop")


# -- failures -----------------------------------------------------------------------------------------
def test_backend_failure_fails_only_that_request(tmp_path: Path) -> None:
    paths = {**task_blocks(tmp_path, "good", ["v"], 2), **task_blocks(tmp_path, "bad", ["v"], 2)}
    bad_block = block_id("bad", "v", 1)
    backends = {"a": NullBackend(latency_ms=1.0), "b": NullBackend(latency_ms=1.0, fail_on={bad_block})}
    ms = {"a": 1.0, "b": 1.0}
    tasks = [
        TaskBinding("good", all_placements("good", "v", 2, ms), paths, 500, 0.0),
        TaskBinding("bad", [make_plan("bad", ("v", "v"), ("a", "b"), ms)], paths, 500, 0.0),
    ]
    records = Records()
    with Runtime(backends=backends, tasks=tasks, on_record=records) as rt:
        futures = [(t, rt.submit(t, x())) for _ in range(10) for t in ("good", "bad")]
        for task, f in futures:
            if task == "good":
                assert f.result(timeout=10)["y"].shape == (1, WIDTH)
            else:
                with pytest.raises(BackendError) as info:
                    f.result(timeout=10)
                assert bad_block in str(info.value) and "'b'" in str(info.value)
        # the runtime keeps serving
        assert rt.submit("good", x()).result(timeout=5)["y"].shape == (1, WIDTH)
        assert rt.stats()["counts"]["error"] == 10
    bad = [r for r in records.items if r.task == "bad"]
    assert len(bad) == 10 and all(r.status == "error" and bad_block in r.error for r in bad)
    assert all(r.spans and r.spans[0][0] == "a" for r in bad)  # the first block ran, the second failed
    assert all(r.status != "error" for r in records.items if r.task == "good")


def test_missing_input_is_an_error_not_a_hang(tmp_path: Path) -> None:
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    tasks = [TaskBinding("t", all_placements("t", "v", 2, {"a": 0.5}), paths, 100, 0.0)]
    with Runtime(backends={"a": NullBackend(latency_ms=0.5)}, tasks=tasks) as rt, \
            pytest.raises(BackendError, match="missing input"):
        rt.submit("t", {"wrong": np.ones((1, WIDTH), np.float32)}).result(timeout=5)


def test_broken_record_sink_does_not_stop_serving(tmp_path: Path) -> None:
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    tasks = [TaskBinding("t", all_placements("t", "v", 2, {"a": 0.5}), paths, 100, 0.0)]

    def sink(rec: RequestRecord) -> None:
        raise ValueError("sink broke")

    with Runtime(backends={"a": NullBackend(latency_ms=0.5)}, tasks=tasks, on_record=sink) as rt:
        assert all(f.result(timeout=5) for f in [rt.submit("t", x()) for _ in range(5)])


# -- SLOs -------------------------------------------------------------------------------------------
def test_slo_change_takes_effect_at_once(tmp_path: Path) -> None:
    paths = task_blocks(tmp_path, "t", ["int8", "dense"], 2)
    cheap = make_plan("t", ("int8", "int8"), ("a", "a"), {"a": 1.0}, accuracy=0.7)
    good = make_plan("t", ("dense", "dense"), ("a", "a"), {"a": 2.0}, accuracy=0.95)
    backends = {"a": NullBackend(latency_ms={"*": 1.0, **{block_id("t", "dense", s): 2.0 for s in range(2)}})}
    tasks = [TaskBinding("t", [cheap, good], paths, latency_ms=500, accuracy_floor=0.5)]
    records = Records()
    with Runtime(backends=backends, tasks=tasks, on_unservable="reject", on_record=records) as rt:
        stop = threading.Event()

        def background() -> None:  # other requests keep coming while the SLO changes
            while not stop.is_set():
                with contextlib.suppress(SloUnservableError):
                    rt.submit("t", x()).result(timeout=5)

        bg = threading.Thread(target=background)
        bg.start()
        try:
            for _ in range(5):
                rt.submit("t", x()).result(timeout=5)
            rt.set_slo("t", accuracy_floor=0.9)
            after = [rt.submit("t", x()) for _ in range(5)]
            for f in after:
                f.result(timeout=5)
            rt.set_slo("t", latency_ms=0.01)  # no plan can make 10 us
            with pytest.raises(SloUnservableError):
                rt.submit("t", x()).result(timeout=5)
            rt.set_slo("t", latency_ms=500, accuracy_floor=0.5)
        finally:
            stop.set()
            bg.join()
        with pytest.raises(ConfigError):
            rt.set_slo("t", accuracy_floor=1.5)
        with pytest.raises(ConfigError):
            rt.set_slo("nope", latency_ms=1)
    by_floor = {}
    for r in records.items:
        by_floor.setdefault(r.accuracy_floor, []).append(r)
    # every request admitted after set_slo saw the new floor, and ran the accurate plan
    assert all(r.config == ("dense", "dense") for r in by_floor[0.9] if r.status != "rejected")
    assert sum(1 for r in by_floor[0.9] if r.status != "rejected") >= 5
    assert all(r.config == ("int8", "int8") for r in by_floor[0.5])
    rejected = [r for r in records.items if r.status == "rejected"]
    assert rejected and all(r.latency_ms is None and r.latency_bound_ms == 0.01 for r in rejected)


def test_violate_runs_the_request_late(tmp_path: Path) -> None:
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    tasks = [TaskBinding("t", all_placements("t", "v", 2, {"a": 2.0}), paths, latency_ms=0.5, accuracy_floor=0.0)]
    records = Records()
    with Runtime(backends={"a": NullBackend(latency_ms=2.0)}, tasks=tasks, on_record=records) as rt:
        assert rt.submit("t", x()).result(timeout=5)["y"].shape == (1, WIDTH)
    assert records.items[0].status == "late"


def test_deadline_override_and_set_candidates(tmp_path: Path) -> None:
    ms = {"a": 1.0, "b": 1.0}
    paths = task_blocks(tmp_path, "t", ["v", "w"], 2)
    tasks = [TaskBinding("t", [make_plan("t", ("v", "v"), ("a", "a"), ms)], paths, 100, 0.0)]
    records = Records()
    with Runtime(backends={p: NullBackend(latency_ms=1.0) for p in ms}, tasks=tasks, on_record=records) as rt:
        rt.submit("t", x(), deadline_ms=50).result(timeout=5)
        rt.set_candidates("t", [make_plan("t", ("w", "w"), ("b", "b"), ms)])
        rt.submit("t", x()).result(timeout=5)
        with pytest.raises(ConfigError):
            rt.set_candidates("t", [make_plan("other", ("v", "v"), ("a", "a"), ms)])
    assert records.items[0].latency_bound_ms == 50
    assert records.items[1].placement == ("b", "b") and records.items[1].config == ("w", "w")


# -- online correction ---------------------------------------------------------------------------
def share(records: list[RequestRecord], placement: tuple[str, ...]) -> float:
    return sum(1 for r in records if r.placement == placement) / len(records)


def test_correction_moves_plans_off_a_slowed_processor_and_back(tmp_path: Path) -> None:
    # a is faster than b as modelled; then a's real latency doubles, later it recovers.
    # Latencies of 10-20 ms per block: a loaded machine oversleeps by a few ms, which
    # must stay small against the 5 ms per block that separate the plans.
    ms = {"a": 10.0, "b": 15.0}
    backends = {p: NullBackend(latency_ms=v) for p, v in ms.items()}
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    tasks = [TaskBinding("t", all_placements("t", "v", 2, ms), paths, latency_ms=5000, accuracy_floor=0.0)]
    records = Records()
    # a long half-life while a is slow: no relaxation, hence no probes, during that phase
    corrector = LatencyCorrector(half_life_s=600.0)
    with Runtime(backends=backends, tasks=tasks, correction=corrector, on_record=records) as rt:

        def run(n: int) -> list[RequestRecord]:
            start = len(records.items)
            for _ in range(n):  # one at a time: decisions depend on the correction, not on queues
                rt.submit("t", x()).result(timeout=5)
            return records.items[start:]

        before = run(10)
        assert share(before, ("a", "a")) >= 0.7

        backends["a"].latency_ms = 20.0  # throttled: a is now slower than b
        after = run(30)
        assert share(after[-20:], ("b", "b")) >= 0.7
        assert rt.stats()["correction"]["processors"]["a"]["factor"] > 1.4

        backends["a"].latency_ms = 10.0  # recovered; a gets no traffic, so only relaxation can tell
        corrector.half_life_s = 0.05
        time.sleep(0.5)  # ten half-lives: a's factor is back near 1
        recovered = run(20)
        assert share(recovered[-12:], ("a", "a")) >= 0.7


def test_correction_disabled_keeps_the_plan(tmp_path: Path) -> None:
    ms = {"a": 3.0, "b": 4.5}
    backends = {p: NullBackend(latency_ms=v) for p, v in ms.items()}
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    tasks = [TaskBinding("t", all_placements("t", "v", 2, ms), paths, latency_ms=1000, accuracy_floor=0.0)]
    records = Records()
    with Runtime(backends=backends, tasks=tasks, correction=LatencyCorrector(enabled=False),
                 on_record=records) as rt:
        backends["a"].latency_ms = 6.0
        for _ in range(20):
            rt.submit("t", x()).result(timeout=5)
    assert share(records.items, ("a", "a")) == 1.0


# -- loading --------------------------------------------------------------------------------------
def test_on_demand_load_counts_in_latency(tmp_path: Path) -> None:
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    tasks = [TaskBinding("t", [make_plan("t", ("v", "v"), ("a", "a"), {"a": 0.5})], paths, 1000, 0.0)]
    records = Records()
    with Runtime(backends={"a": NullBackend(latency_ms=0.5, load_ms=30)}, tasks=tasks, preload=False,
                 on_record=records) as rt:
        assert rt.stats()["resident"]["a"] == []
        rt.submit("t", x()).result(timeout=5)
        rt.submit("t", x()).result(timeout=5)
        assert sorted(rt.stats()["resident"]["a"]) == sorted(paths)
    first, second = records.items
    assert first.latency_ms >= 60  # two loads of 30 ms, inside the request
    # the loads are not taken for block latency: the corrector saw runs of ~0.5 ms
    assert second.latency_ms < first.latency_ms


def test_preload_failure_fails_construction(tmp_path: Path) -> None:
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    tasks = [TaskBinding("t", [make_plan("t", ("v", "v"), ("a", "a"), {"a": 0.5})], paths, 1000, 0.0)]
    with pytest.raises(Exception, match="Relu|cannot run"):
        Runtime(backends={"a": NullBackend(unsupported={"Relu"})}, tasks=tasks)


# -- closing --------------------------------------------------------------------------------------
def test_close_drains_queued_work(tmp_path: Path) -> None:
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    tasks = [TaskBinding("t", all_placements("t", "v", 2, {"a": 1.0}), paths, 1000, 0.0)]
    rt = Runtime(backends={"a": NullBackend(latency_ms=1.0)}, tasks=tasks)
    futures = [rt.submit("t", x()) for _ in range(30)]
    rt.close()
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(RuntimeClosedError):
        rt.submit("t", x())
    rt.close()  # idempotent


def test_close_cancel_ends_everything(tmp_path: Path) -> None:
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    tasks = [TaskBinding("t", all_placements("t", "v", 2, {"a": 10.0}), paths, 1000, 0.0)]
    records = Records()
    rt = Runtime(backends={"a": NullBackend(latency_ms=10.0)}, tasks=tasks, on_record=records)
    futures = [rt.submit("t", x()) for _ in range(30)]
    t0 = time.perf_counter()
    rt.close(cancel=True)
    assert time.perf_counter() - t0 < 2.0  # 30 x 20 ms of queued work was not run
    assert all(f.done() for f in futures)
    cancelled = [f for f in futures if isinstance(f.exception(), RuntimeClosedError)]
    assert len(cancelled) >= 20
    assert len(records.items) == 30
    assert sum(1 for r in records.items if r.status == "error" and "closed" in r.error) == len(cancelled)
    with pytest.raises(RuntimeClosedError):
        rt.submit("t", x())


def test_close_with_timeout_cancels_the_rest(tmp_path: Path) -> None:
    paths = task_blocks(tmp_path, "t", ["v"], 1)
    tasks = [TaskBinding("t", [make_plan("t", ("v",), ("a",), {"a": 20.0})], paths, 1000, 0.0)]
    rt = Runtime(backends={"a": NullBackend(latency_ms=20.0)}, tasks=tasks)
    futures = [rt.submit("t", x()) for _ in range(50)]
    rt.close(timeout=0.1)
    assert all(f.done() for f in futures)
    assert any(isinstance(f.exception(), RuntimeClosedError) for f in futures)


# -- the worker queue ------------------------------------------------------------------------------
def test_worker_runs_earliest_deadline_first() -> None:
    worker = _EdfWorker("a", NullBackend())
    gate = threading.Event()
    order: list[str] = []
    worker.put((0.0, 0.0, 0), gate.wait)  # holds the thread while the queue fills
    worker.put((3.0, 0.0, 1), lambda: order.append("late"))
    worker.put((1.0, 0.0, 2), lambda: order.append("early"))
    worker.put((2.0, 0.0, 3), lambda: order.append("mid-low"))
    worker.put((2.0, -5.0, 4), lambda: order.append("mid-high"))  # priority 5 breaks the tie
    worker.put((1.5, 0.0, 5), lambda: 1 / 0)  # a job that raises does not kill the thread
    gate.set()
    worker.close()
    assert order == ["early", "mid-high", "mid-low", "late"]
    with pytest.raises(RuntimeClosedError):
        worker.put((0.0, 0.0, 9), lambda: None)


def test_from_a_device_profile(tmp_path: Path) -> None:
    from loom.processors.device import parse_device_profile

    device = parse_device_profile(
        {
            "name": "sim",
            "processors": [
                {"name": "a", "kind": "cpu", "backend": "null", "options": {"latency_ms": 1.0}},
                {"name": "b", "kind": "npu", "backend": "null", "options": {"latency_ms": 2.0}},
            ],
            "links": [{"between": ["a", "b"], "bandwidth_gbps": 10, "latency_us": 5}],
        },
        source="test",
    )
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    tasks = [TaskBinding("t", all_placements("t", "v", 2, {"a": 1.0, "b": 2.0}), paths, 100, 0.0)]
    records = Records()
    with Runtime(device=device, tasks=tasks, on_record=records) as rt:
        f = rt.submit("t", x())
        assert not f.cancel()  # running from submit on: every request ends with its result
        assert f.result(timeout=5)["y"].shape == (1, WIDTH)
    assert records.items[0].placement == ("a", "a")
