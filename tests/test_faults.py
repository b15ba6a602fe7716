"""Injected faults: nothing lost, nothing hangs, nothing silently wrong (the serving layer).

A wrapper around the null backend hangs once, raises every Nth call, returns a wrong shape
or runs 10x slow. Every future must resolve, ``stats()["in_flight"]`` return to 0, ``close``
return in bounded time while a call hangs, the hung processor be reported unhealthy and
avoided, and bad inputs be refused at the door. Timeouts are generous upper bounds only:
the tests wait on events and assert order and state, not speed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from backends.base import Backend, LoadedBlock
from backends.null import NullBackend
from loom.core.errors import BackendError, InputError, LoomError, OverloadError, RuntimeClosedError
from loom.serving.runtime import Runtime, TaskBinding
from tests.test_runtime import WIDTH, Records, all_placements, make_plan, task_blocks, x

#: generous upper bound for anything that should take milliseconds (a loaded 2-core machine)
BOUND_S = 10.0


class Faulty(Backend):
    """The null backend with one injected fault on its runs."""

    name = "faulty"

    def __init__(self, latency_ms: float = 1.0, *, hang_once: bool = False, fail_every: int = 0,
                 wrong_shape: bool = False, slow: float = 1.0) -> None:
        self.inner = NullBackend(latency_ms=latency_ms)
        self.hang_once, self.fail_every, self.wrong_shape, self.slow = hang_once, fail_every, wrong_shape, slow
        #: set when a run starts hanging; the run returns when ``unhang`` is set
        self.hung = threading.Event()
        self.unhang = threading.Event()
        self.calls = 0
        self._lock = threading.Lock()

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, "test wrapper"

    def unsupported_ops(self, model: onnx.ModelProto) -> list[str]:
        return self.inner.unsupported_ops(model)

    def load(self, model: onnx.ModelProto | str | Path, *, block_id: str | None = None) -> LoadedBlock:
        return self.inner.load(model, block_id=block_id)

    def release(self, block: LoadedBlock) -> None:
        self.inner.release(block)

    def run(self, block: LoadedBlock, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.calls += 1
            n = self.calls
            hang = self.hang_once and not self.hung.is_set()
            if hang:
                self.hung.set()
        if hang:
            self.unhang.wait(60)  # the test sets it at its end, so the thread ends too
        if self.fail_every and n % self.fail_every == 0:
            raise RuntimeError(f"injected failure on call {n}")
        t0 = time.perf_counter()
        out = self.inner.run(block, feeds)
        if self.slow > 1:
            time.sleep((time.perf_counter() - t0) * (self.slow - 1))
        if self.wrong_shape:
            out = {k: np.zeros((3, 7, 5), v.dtype) for k, v in out.items()}
        return out


def wait_until(cond: Callable[[], bool], timeout: float = BOUND_S) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def outcome(f: Future) -> Any:
    """The future's result or its exception, within the bound (a hang fails the test)."""
    try:
        return f.result(timeout=BOUND_S)
    except LoomError as exc:
        return exc


def one_task(tmp_path: Path, ms: dict[str, float], *, latency_ms: float = 500, spec: bool = False) -> TaskBinding:
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    inputs = {"x": ("float32", ("batch", WIDTH))} if spec else None
    return TaskBinding("t", all_placements("t", "v", 2, ms), paths, latency_ms, 0.0, inputs=inputs)


# -- inputs checked at the door ---------------------------------------------------------------------
BAD_INPUTS = [
    (None, "mapping"),
    (np.ones((1, WIDTH), np.float32), "mapping"),
    ({"x": [[1.0] * WIDTH]}, "numpy array"),
    ({}, "missing ['x']"),
    ({"x": np.ones((1, WIDTH), np.float32), "z": np.ones(1, np.float32)}, "unknown ['z']"),
    ({"x": np.ones((1, WIDTH), np.float64)}, "dtype float64"),
    ({"x": np.ones(WIDTH, np.float32)}, "rank 1"),
    ({"x": np.ones((1, WIDTH + 1), np.float32)}, "axis 1"),
]


@pytest.mark.parametrize(("inputs", "says"), BAD_INPUTS)
def test_bad_inputs_raise_at_the_door(tmp_path: Path, inputs: Any, says: str) -> None:
    rt = Runtime(backends={"a": NullBackend(latency_ms=0.5)}, tasks=[one_task(tmp_path, {"a": 0.5}, spec=True)])
    try:
        with pytest.raises(InputError, match="task 't'") as info:
            rt.submit("t", inputs)
        assert says in str(info.value) and isinstance(info.value, ValueError)
        stats = rt.stats()
        assert stats["in_flight"] == 0 and stats["counts"]["submitted"] == 0
        # the symbolic batch dim takes any size; the runtime serves on
        assert rt.submit("t", x(3)).result(timeout=BOUND_S)["y"].shape == (3, WIDTH)
    finally:
        t0 = time.monotonic()
        rt.close()
        assert time.monotonic() - t0 < BOUND_S


def test_without_a_spec_only_a_mapping_of_arrays(tmp_path: Path) -> None:
    with Runtime(backends={"a": NullBackend(latency_ms=0.5)}, tasks=[one_task(tmp_path, {"a": 0.5})]) as rt:
        for bad in (None, np.ones((1, WIDTH), np.float32), {"x": 1.0}):
            with pytest.raises(InputError):
                rt.submit("t", bad)  # type: ignore[arg-type]
        assert rt.stats()["in_flight"] == 0
        assert rt.submit("t", {"x": np.ones((1, WIDTH), np.float64)}).result(timeout=BOUND_S) is not None


def test_a_failure_after_registration_ends_through_the_future(tmp_path: Path) -> None:
    rt = Runtime(backends={"a": NullBackend(latency_ms=0.5)}, tasks=[one_task(tmp_path, {"a": 0.5})],
                 memory_budget_mb=100)
    assert rt.preloader is not None

    def broken(*_: Any) -> None:
        raise RuntimeError("hotness tracker broke")

    rt.preloader.record_use = broken  # type: ignore[method-assign]
    f = rt.submit("t", x())
    with pytest.raises(RuntimeError, match="hotness tracker broke"):
        f.result(timeout=BOUND_S)
    assert rt.stats()["in_flight"] == 0
    rt.close()


# -- faults in backend calls ------------------------------------------------------------------------
@pytest.mark.parametrize("fault", [{"fail_every": 3}, {"wrong_shape": True}, {"slow": 10.0}])
def test_every_future_resolves_under_faults(tmp_path: Path, fault: dict[str, Any]) -> None:
    backends = {"a": Faulty(1.0, **fault), "b": Faulty(1.0, **fault)}
    records = Records()
    with Runtime(backends=backends, tasks=[one_task(tmp_path, {"a": 1.0, "b": 1.0})], on_record=records) as rt:
        futures = [rt.submit("t", x()) for _ in range(12)]
        results = [outcome(f) for f in futures]
        assert wait_until(lambda: rt.stats()["in_flight"] == 0)
    assert len(records.items) == 12
    if "fail_every" in fault:
        errors = [r for r in results if isinstance(r, Exception)]
        assert errors and all("injected failure" in str(e) for e in errors)
        assert len(errors) == sum(r.status == "error" for r in records.items)
    else:
        assert all(isinstance(r, dict) for r in results)


# -- a call that hangs ------------------------------------------------------------------------------
def test_close_cancel_returns_while_a_call_hangs(tmp_path: Path) -> None:
    hanging = Faulty(1.0, hang_once=True)
    rt = Runtime(backends={"a": hanging}, tasks=[one_task(tmp_path, {"a": 1.0})])
    rt.scheduler.stuck_floor_s = 1e3  # not yet detected as stuck: the requests queue behind it
    try:
        first = rt.submit("t", x())
        assert hanging.hung.wait(BOUND_S)
        queued = [rt.submit("t", x()) for _ in range(3)]
        t0 = time.monotonic()
        rt.close(cancel=True)
        assert time.monotonic() - t0 < 3.0  # the call hangs for up to 60 s
        for f in [first, *queued]:
            assert isinstance(outcome(f), RuntimeClosedError)
        stats = rt.stats()
        assert stats["in_flight"] == 0 and "abandoned" in stats["unhealthy"]["a"]
    finally:
        hanging.unhang.set()


def test_close_drains_what_it_can_and_ends_what_waits_on_a_stuck_call(tmp_path: Path) -> None:
    hanging = Faulty(1.0, hang_once=True)
    rt = Runtime(backends={"a": hanging}, tasks=[one_task(tmp_path, {"a": 1.0})])
    rt.scheduler.stuck_floor_s = 1e3  # not yet detected as stuck: the requests queue behind it
    try:
        futures = [rt.submit("t", x())]
        assert hanging.hung.wait(BOUND_S)
        futures += [rt.submit("t", x()) for _ in range(3)]  # queued behind it (violate: they wait)
        rt.scheduler.stuck_floor_s = 0.2
        t0 = time.monotonic()
        rt.close()
        assert time.monotonic() - t0 < BOUND_S
        for f in futures:
            err = outcome(f)
            assert isinstance(err, RuntimeClosedError) and "unhealthy" in str(err)
        assert rt.stats()["in_flight"] == 0 and "a" in rt.stats()["unhealthy"]
    finally:
        hanging.unhang.set()


@pytest.mark.parametrize("latency_ms", [500.0, 3.5])  # on time, and late (violate): both avoid it
def test_a_hung_processor_is_unhealthy_and_avoided(tmp_path: Path, latency_ms: float) -> None:
    hanging = Faulty(1.0, hang_once=True)
    backends = {"a": hanging, "b": Faulty(2.0)}
    records = Records()
    task = one_task(tmp_path, {"a": 1.0, "b": 2.0}, latency_ms=latency_ms)
    rt = Runtime(backends=backends, tasks=[task], on_record=records)
    rt.scheduler.stuck_floor_s = 0.2
    try:
        first = rt.submit("t", x())
        assert hanging.hung.wait(BOUND_S)
        assert wait_until(lambda: "a" in rt.stats()["unhealthy"])
        for _ in range(5):  # one at a time: late ones stay within the late lane's bound
            assert rt.submit("t", x()).result(timeout=BOUND_S)["y"].shape == (1, WIDTH)
        assert not first.done()
        served = [r for r in records.items if r.id != 0]
        assert len(served) == 5 and all(set(r.placement) == {"b"} for r in served)
        assert all(r.status == ("late" if latency_ms < 4 else "ok") for r in served)  # b's plans take 4 ms
        hanging.unhang.set()  # the call returns: the processor is healthy again
        assert first.result(timeout=BOUND_S)["y"].shape == (1, WIDTH)
        assert wait_until(lambda: not rt.stats()["unhealthy"])
        assert rt.stats()["in_flight"] == 0
    finally:
        hanging.unhang.set()
        rt.close()


def test_reject_refuses_what_only_a_hung_processor_could_serve(tmp_path: Path) -> None:
    hanging = Faulty(1.0, hang_once=True)
    rt = Runtime(backends={"a": hanging}, tasks=[one_task(tmp_path, {"a": 1.0})], on_unservable="reject")
    rt.scheduler.stuck_floor_s = 0.2
    try:
        first = rt.submit("t", x())
        assert hanging.hung.wait(BOUND_S)
        assert wait_until(lambda: "a" in rt.stats()["unhealthy"])
        with pytest.raises(OverloadError):
            rt.submit("t", x()).result(timeout=BOUND_S)
        hanging.unhang.set()
        assert first.result(timeout=BOUND_S) is not None
        assert rt.submit("t", x()).result(timeout=BOUND_S) is not None  # healthy again
    finally:
        hanging.unhang.set()
        rt.close()


def test_a_plan_made_by_hand_keeps_serving_after_a_hang(tmp_path: Path) -> None:
    """A fixed plan (non-adaptive) on the hung processor is shed under violate, not queued forever."""
    hanging = Faulty(1.0, hang_once=True)
    paths = task_blocks(tmp_path, "t", ["v"], 2)
    plan = make_plan("t", ("v", "v"), ("a", "a"), {"a": 1.0})
    rt = Runtime(backends={"a": hanging}, tasks=[TaskBinding("t", [plan], paths, 500, 0.0)], adaptive=False)
    rt.scheduler.stuck_floor_s = 0.2
    try:
        first = rt.submit("t", x())
        assert hanging.hung.wait(BOUND_S)
        assert wait_until(lambda: "a" in rt.stats()["unhealthy"])
        assert isinstance(outcome(rt.submit("t", x())), OverloadError)
        hanging.unhang.set()
        assert first.result(timeout=BOUND_S) is not None
    finally:
        hanging.unhang.set()
        rt.close()


def test_a_wrong_shaped_result_is_an_error_naming_the_block_not_a_result(tmp_path: Path) -> None:
    backends = {"a": Faulty(1.0, wrong_shape=True), "b": Faulty(1.0, wrong_shape=True)}
    task = one_task(tmp_path, {"a": 1.0, "b": 1.0}, spec=True)
    task = replace(task, outputs={"y": ("float32", ("batch", WIDTH))})
    with Runtime(backends=backends, tasks=[task]) as rt:
        results = [outcome(rt.submit("t", x())) for _ in range(4)]
    assert all(isinstance(r, BackendError) for r in results)
    assert all("returned a wrong result" in str(r) and "processor" in str(r) and "(3, 7, 5)" in str(r)
               for r in results)


def test_a_right_result_passes_the_output_check(tmp_path: Path) -> None:
    task = replace(one_task(tmp_path, {"a": 1.0, "b": 1.0}, spec=True), outputs={"y": ("float32", ("batch", WIDTH))})
    with Runtime(backends={"a": Faulty(1.0), "b": Faulty(1.0)}, tasks=[task]) as rt:
        result = outcome(rt.submit("t", x()))
    assert isinstance(result, dict) and result["y"].shape == (1, WIDTH)
