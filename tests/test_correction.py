"""The online latency corrector: learning, spreading to unseen blocks, recovering, thread safety."""

from __future__ import annotations

import threading

import pytest

from loom.core.errors import ConfigError
from loom.serving.correction import LatencyCorrector


def test_no_observation_no_change() -> None:
    c = LatencyCorrector()
    assert c.corrected_ms("b0", "cpu0", 4.0, now_s=0.0) == 4.0
    assert c.processor_factor("cpu0", now_s=0.0) == 1.0


def test_learns_a_steady_ratio() -> None:
    c = LatencyCorrector(decay=0.9, processor_decay=0.7)
    for i in range(60):
        c.observe("b0", "cpu0", predicted_ms=2.0, measured_ms=4.0, now_s=i * 0.001)
    assert c.corrected_ms("b0", "cpu0", 2.0, now_s=0.06) == pytest.approx(4.0, rel=0.02)
    # the other processor is untouched
    assert c.corrected_ms("b0", "cpu1", 2.0, now_s=0.06) == 2.0


def test_processor_slowdown_corrects_unseen_blocks() -> None:
    c = LatencyCorrector()
    for i in range(20):
        c.observe("seen", "npu", 1.0, 2.0, now_s=i * 0.01)
    # a block never run on npu still gets most of the slowdown
    assert c.corrected_ms("unseen", "npu", 3.0, now_s=0.2) > 3.0 * 1.6
    assert c.corrected_ms("unseen", "cpu", 3.0, now_s=0.2) == 3.0


def test_block_bias_stays_with_its_block() -> None:
    c = LatencyCorrector()
    # two blocks on one processor: one predicted right, one predicted 2x too fast
    for i in range(200):
        c.observe("right", "cpu", 1.0, 1.0, now_s=i * 0.001)
        c.observe("biased", "cpu", 1.0, 2.0, now_s=i * 0.001)
    right = c.multiplier("right", "cpu", now_s=0.2)
    biased = c.multiplier("biased", "cpu", now_s=0.2)
    assert biased / right == pytest.approx(2.0, rel=0.15)
    assert 0.8 < right < 1.25


def test_factor_relaxes_toward_one_without_traffic() -> None:
    c = LatencyCorrector(half_life_s=2.0)
    for i in range(30):
        c.observe("b", "gpu", 1.0, 3.0, now_s=i * 0.01)
    slow = c.processor_factor("gpu", now_s=0.3)
    assert slow > 2.0
    # one half-life of silence halves the log factor; many bring it back near 1
    one = c.processor_factor("gpu", now_s=2.3)
    assert one == pytest.approx(slow**0.5, rel=0.01)
    assert c.processor_factor("gpu", now_s=30.0) < 1.01
    # new evidence (the probe request) takes over again at once
    c.observe("b", "gpu", 1.0, 3.0, now_s=30.0)
    assert c.processor_factor("gpu", now_s=30.0) > 1.3


def test_recovery_with_traffic() -> None:
    c = LatencyCorrector()
    t = 0.0
    for _ in range(30):
        c.observe("b", "cpu", 2.0, 4.0, now_s=t)
        t += 0.005
    for _ in range(60):
        c.observe("b", "cpu", 2.0, 2.0, now_s=t)
        t += 0.005
    assert c.multiplier("b", "cpu", now_s=t) < 1.15


def test_outliers_are_clamped() -> None:
    c = LatencyCorrector(max_ratio=4.0)
    c.observe("b", "cpu", 1.0, 1000.0, now_s=0.0)
    assert c.multiplier("b", "cpu", now_s=0.0) <= 4.0
    c.observe("b", "cpu", 0.0, 1.0, now_s=0.0)  # a zero prediction says nothing
    c.observe("b", "cpu", 1.0, float("nan"), now_s=0.0)


def test_disabled_is_identity() -> None:
    c = LatencyCorrector(enabled=False)
    for i in range(10):
        c.observe("b", "cpu", 1.0, 5.0, now_s=float(i))
    assert c.corrected_ms("b", "cpu", 1.0, now_s=10.0) == 1.0
    assert c.view(10.0).multiplier("b", "cpu") == 1.0
    assert c.snapshot(10.0)["observations"] == 10


def test_view_matches_and_snapshot_reports() -> None:
    c = LatencyCorrector()
    for i in range(10):
        c.observe("b", "cpu", 1.0, 1.5, now_s=i * 0.01)
    v = c.view(0.1)
    assert v.corrected_ms("b", "cpu", 2.0) == pytest.approx(c.corrected_ms("b", "cpu", 2.0, now_s=0.1))
    snap = c.snapshot(0.1)
    assert snap["processors"]["cpu"]["observations"] == 10
    assert snap["blocks"][0]["block_id"] == "b"
    assert snap["blocks"][0]["multiplier"] == pytest.approx(v.multiplier("b", "cpu"))


def test_bad_parameters() -> None:
    with pytest.raises(ConfigError):
        LatencyCorrector(decay=1.0)
    with pytest.raises(ConfigError):
        LatencyCorrector(half_life_s=0)
    with pytest.raises(ConfigError):
        LatencyCorrector(max_ratio=1.0)


def test_thread_safe() -> None:
    c = LatencyCorrector(relative=False)  # both processors drift alike here: keep it absolute

    def hammer(k: int) -> None:
        for i in range(2000):
            c.observe(f"b{i % 5}", f"p{k % 2}", 1.0, 2.0, now_s=i * 1e-4)
            c.corrected_ms(f"b{i % 7}", f"p{k % 2}", 1.0, now_s=i * 1e-4)
            if i % 100 == 0:
                c.view(i * 1e-4)
                c.snapshot(i * 1e-4)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.snapshot(0.2)["observations"] == 6 * 2000
    assert c.multiplier("b0", "p0", now_s=0.2) == pytest.approx(2.0, rel=0.05)


def test_time_slicing_shows_in_the_arithmetic_mean_not_the_geometric() -> None:
    # a core shared with a busy process: 9 blocks in 10 at full speed, 1 waits a slice (8x)
    ratios = ([1.0] * 9 + [8.0]) * 40
    found = {}
    for mean in ("arithmetic", "geometric"):
        c = LatencyCorrector(mean=mean, clock=lambda: 0.0)
        seen = []
        for i, r in enumerate(ratios):
            c.observe(f"b{i % 3}", "p", 1.0, r, now_s=0.0)
            seen.append(c.corrected_ms(f"b{i % 3}", "p", 1.0, now_s=0.0))
        found[mean] = sum(seen[-100:]) / 100  # what the scheduler was told, over the last 100 blocks
    # what the processor delivers: 1.7x the predicted time per block on average
    assert 1.3 < found["arithmetic"] < 2.4
    assert found["geometric"] < 1.35
    with pytest.raises(ConfigError, match="mean"):
        LatencyCorrector(mean="median")
