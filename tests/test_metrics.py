"""Request records, their summary, JSONL files, the RSS sampler and the plots."""

from __future__ import annotations

import threading

import pytest

from loom.core.errors import LoomError
from loom.serving.metrics import (
    MetricsCollector,
    RequestRecord,
    RssSampler,
    busy_seconds,
    load_jsonl,
    slo_status,
    summarize,
)
from loom.serving.plots import (
    plot_latency_cdf,
    plot_memory,
    plot_timeline,
    plot_violations_by_policy,
)


def rec(id: int, task: str = "a", status: str = "ok", latency_ms: float | None = 1.0, arrival_s: float = 1.0,
        spans=(), policy: str = "sparseloom", **kw) -> RequestRecord:
    done = status not in ("rejected",)
    return RequestRecord(
        id=id,
        task=task,
        policy=policy,
        arrival_s=arrival_s,
        start_s=arrival_s if done else None,
        end_s=arrival_s + (latency_ms or 0) / 1e3 if done else None,
        latency_ms=latency_ms if done else None,
        latency_bound_ms=5.0,
        accuracy_floor=0.9,
        status=status,
        spans=list(spans),
        **kw,
    )


def test_slo_status():
    assert slo_status(1.0, 2.0, 0.95, 0.9) == ("ok", False)
    assert slo_status(3.0, 2.0, 0.95, 0.9) == ("late", False)
    assert slo_status(1.0, 2.0, 0.85, 0.9) == ("inaccurate", True)
    assert slo_status(3.0, 2.0, 0.85, 0.9) == ("late", True)  # both: late, flag kept
    assert slo_status(2.0, 2.0, 0.9, 0.9) == ("ok", False)  # the bound and floor themselves are met
    assert slo_status(1.0, 2.0, None, 0.9) == ("ok", False)


def test_record_status_checked_and_violated():
    assert not rec(0).violated
    for status in ("late", "inaccurate", "rejected", "error"):
        assert rec(0, status=status).violated
    with pytest.raises(ValueError, match="status"):
        rec(0, status="fine")


def test_summary_on_hand_made_records():
    latencies = [float(i) for i in range(1, 11)]  # 1..10 ms, completed
    statuses = ["ok"] * 6 + ["late"] * 3 + ["inaccurate"]
    records = [rec(i, "a", s, lat) for i, (s, lat) in enumerate(zip(statuses, latencies, strict=True))]
    records += [rec(10, "b", "rejected"), rec(11, "b", "error", 2.0, error="boom"), rec(12, "b", "ok", 4.0)]
    records.append(rec(13, "a", "ok", 100.0, arrival_s=0.5))  # in the warm-up: left out

    col = MetricsCollector()
    threads = [threading.Thread(target=col.record, args=(r,)) for r in records]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(col) == len(records)

    s = col.summary(11.0, warmup_s=1.0)  # 10 s counted
    a, b, overall = s["tasks"]["a"], s["tasks"]["b"], s["overall"]
    assert (a["n"], a["ok"], a["late"], a["inaccurate"]) == (10, 6, 3, 1)
    assert a["slo_violation_rate"] == pytest.approx(0.4)
    assert a["goodput_rps"] == pytest.approx(0.6) and a["throughput_rps"] == pytest.approx(1.0)
    assert a["p50_ms"] == pytest.approx(5.5)  # numpy's linear interpolation over 1..10
    assert a["p95_ms"] == pytest.approx(9.55) and a["p99_ms"] == pytest.approx(9.91)
    assert (b["n"], b["rejected"], b["errors"]) == (3, 1, 1)
    assert b["slo_violation_rate"] == pytest.approx(2 / 3)
    assert b["throughput_rps"] == pytest.approx(0.1)  # errors and rejections did not complete
    assert b["p50_ms"] == pytest.approx(4.0)
    assert overall["n"] == 13 and overall["slo_violation_rate"] == pytest.approx(6 / 13)
    assert overall["goodput_rps"] == pytest.approx(0.7)
    assert s["policies"] == ["sparseloom"]


def test_summary_of_nothing():
    s = summarize([], 10.0)
    assert s["overall"]["n"] == 0 and s["overall"]["slo_violation_rate"] is None
    assert s["overall"]["p99_ms"] is None and s["overall"]["goodput_rps"] == 0.0
    assert s["tasks"] == {} and s["utilization"] == {}
    with pytest.raises(ValueError):
        summarize([], 1.0, warmup_s=1.0)


def test_utilization_merges_overlapping_spans():
    assert busy_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4.0)
    assert busy_seconds([(0, 2), (1, 3)], start_s=1.5, end_s=2.5) == pytest.approx(1.0)
    records = [
        rec(0, spans=[("cpu0", "b1", 0.0, 2.0), ("cpu1", "b2", 2.0, 3.0)]),
        rec(1, spans=[("cpu0", "b1", 1.0, 3.0)]),  # overlaps request 0 on cpu0
        rec(2, spans=[("cpu0", "b3", 8.0, 12.0)]),  # runs past the end: clipped
    ]
    u = summarize(records, 10.0)["utilization"]
    assert u == {"cpu0": pytest.approx(0.5), "cpu1": pytest.approx(0.1)}


def test_jsonl_round_trip(tmp_path):
    records = [
        rec(1, "a", "late", 7.0, config=("int8", "dense", "dense"), placement=("cpu0", "cpu1", "cpu1"),
            plan_accuracy=0.95, below_floor=False, spans=[("cpu0", "blk-1", 1.0, 1.002), ("cpu1", "blk-2", 1.002, 1.007)]),
        rec(0, "b", "rejected", error="no plan meets 0.5 ms"),
    ]
    col = MetricsCollector()
    for r in records:
        col.record(r)
    path = col.write_jsonl(tmp_path / "sub" / "requests.jsonl")
    assert len(path.read_text().splitlines()) == 2
    loaded = load_jsonl(path)
    assert loaded == sorted(records, key=lambda r: r.id)
    assert isinstance(loaded[1].config, tuple) and isinstance(loaded[1].spans[0], tuple)
    assert MetricsCollector.from_jsonl(path).records == loaded
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(LoomError, match="line 1"):
        load_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(LoomError, match="no such file"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_rss_sampler():
    with RssSampler(interval_ms=5) as sampler:
        block = bytearray(32 * 2**20)  # touch memory so there is something to see
        block[::4096] = b"x" * len(block[::4096])
        threading.Event().wait(0.05)
    series = sampler.series
    assert len(series) >= 3  # start, at least one tick, stop
    assert [t for t, _ in series] == sorted(t for t, _ in series)
    assert sampler.peak_mb == max(mb for _, mb in series) > 0
    del block


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path):
    recs = {
        pol: [rec(i, task=t, latency_ms=1.0 + i * k, arrival_s=i * 0.01, policy=pol,
                  spans=[("cpu0", "b1", i * 0.01, i * 0.01 + 0.004), ("cpu1", "b2", i * 0.01 + 0.004, i * 0.01 + 0.006)])
              for i, t in zip(range(40), ["a", "b"] * 20, strict=True)]
        for pol, k in (("sparseloom", 0.05), ("av-p", 0.1))
    }
    rows = [{"policy": p, "slo_violation_rate": v, "group": g}
            for g in ("light", "heavy") for p, v in (("sparseloom", 0.1), ("av-p", 0.3))]
    outs = [
        plot_violations_by_policy(rows, tmp_path / "viol.png"),
        plot_violations_by_policy([{"policy": "sv-ao-np", "slo_violation_rate": 0.5}], tmp_path / "viol1.png"),
        plot_latency_cdf(recs, tmp_path / "cdf.png"),
        plot_latency_cdf(recs, tmp_path / "cdfn.png", normalized=True),
        plot_timeline(recs["sparseloom"], tmp_path / "timeline.png", max_requests=30),
        plot_memory([(0.0, 100.0), (0.5, 140.0), (1.0, 120.0)], tmp_path / "mem.png"),
        plot_memory({"sparseloom": [(0.0, 100.0), (1.0, 120.0)], "av-p": [(0.0, 150.0), (1.0, 160.0)]},
                    tmp_path / "mem2.png"),
    ]
    for out in outs:
        assert _is_png(out), out
