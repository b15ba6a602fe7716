"""The runtime's overhead meter (loom/serving/overhead.py) on simulated processors.

Counts are checked against the requests, segments, blocks and hand-offs served; the times
only for being positive. Nothing asserts how large they are.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.null import NullBackend
from loom.serving.overhead import COMPONENTS, OVERHEAD, OverheadMeter
from loom.serving.runtime import Runtime, TaskBinding
from tests.test_runtime import Records, all_placements, make_plan, task_blocks, x

N = 30


def _serve(tmp_path: Path, meter: OverheadMeter | None, *, adaptive: bool) -> Records:
    ms = {"a": 0.2, "b": 0.2}
    paths = {**task_blocks(tmp_path, "t1", ["v"], 3), **task_blocks(tmp_path, "t2", ["v"], 2)}
    if adaptive:  # any placement: some requests hand off, some do not
        t1 = all_placements("t1", "v", 3, ms)
        t2 = all_placements("t2", "v", 2, ms)
    else:  # one plan each: t1 hands off twice (a -> b -> a), t2 once
        t1 = [make_plan("t1", ("v",) * 3, ("a", "b", "a"), ms)]
        t2 = [make_plan("t2", ("v",) * 2, ("b", "a"), ms)]
    tasks = [TaskBinding("t1", t1, paths, latency_ms=500, accuracy_floor=0.5),
             TaskBinding("t2", t2, paths, latency_ms=500, accuracy_floor=0.5)]
    records = Records()
    with Runtime(backends={p: NullBackend(latency_ms=v) for p, v in ms.items()}, tasks=tasks, adaptive=adaptive,
                 on_record=records, meter=meter) as rt:
        futures = [rt.submit("t1" if j % 3 else "t2", x()) for j in range(N)]
        for f in futures:
            f.result(timeout=30)
    assert len(records.items) == N and all(r.error is None for r in records.items)
    return records


def _hand_offs(placement: tuple[str, ...]) -> int:
    return sum(a != b for a, b in zip(placement, placement[1:], strict=False))


@pytest.mark.parametrize("adaptive", [False, True])
def test_counts_match_what_was_served(tmp_path: Path, adaptive: bool) -> None:
    meter = OverheadMeter()
    records = _serve(tmp_path, meter, adaptive=adaptive)
    rep = meter.report()
    counts = rep["counts"]
    hand_offs = sum(_hand_offs(r.placement) for r in records.items)
    blocks = sum(len(r.config) for r in records.items)
    assert counts["decision"] == counts["submit"] == counts["completion"] == N
    assert counts["hand_off"] == hand_offs
    assert counts["begin"] == hand_offs + N  # one segment more than hand-offs per request
    assert counts["block"] == counts["backend_run"] == blocks
    if not adaptive:
        assert hand_offs == 20 * 2 + 10 * 1  # t1 (20 requests) hands off twice, t2 (10) once
    # every component took some CPU, and the report is per unit of each
    assert all(meter.ns[c] > 0 for c in COMPONENTS)
    assert all(rep["raw_us"][c] > 0 for c in COMPONENTS)
    assert all(rep["overhead_us"][c] is not None and rep["overhead_us"][c] >= 0 for c in COMPONENTS)
    assert all(rep[k][c] is not None and rep[k][c] >= 0 for k in ("p50_us", "p99_us") for c in COMPONENTS)
    assert rep["per_request_us"] > 0 and rep["timer_us"] > 0
    assert rep["candidates_per_decision"] == pytest.approx(1.0 if not adaptive else (8 * 20 + 4 * 10) / N)
    assert rep["priced_per_decision"] >= 1.0


def test_reset_forgets(tmp_path: Path) -> None:
    meter = OverheadMeter(timer_ns=0)
    _serve(tmp_path, meter, adaptive=False)
    meter.reset()
    rep = meter.report()
    assert all(v == 0 for v in rep["counts"].values())
    assert all(v is None for v in rep["overhead_us"].values()) and rep["per_request_us"] is None
    assert all(v is None for v in rep["p50_us"].values())
    assert rep["priced_per_decision"] is None


def test_off_records_nothing(tmp_path: Path) -> None:
    # a meter the runtime is not given sees nothing, and the runtime holds none
    meter = OverheadMeter()
    records = _serve(tmp_path, None, adaptive=True)
    assert len(records.items) == N
    assert all(v == 0 for v in meter.counts.values()) and all(v == 0 for v in meter.ns.values())
    assert set(OVERHEAD) < set(COMPONENTS)


def test_off_makes_no_clock_readings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import loom.serving.runtime as runtime

    calls = []
    monkeypatch.setattr(runtime, "cpu_ns", lambda: calls.append(1) or 0)
    _serve(tmp_path, None, adaptive=True)
    assert calls == []
    _serve(tmp_path / "on", OverheadMeter(timer_ns=0), adaptive=True)
    assert calls  # the same sites read the clock when a meter is given
