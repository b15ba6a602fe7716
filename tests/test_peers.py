"""Peers (plain onnxruntime, OpenVINO THROUGHPUT) on the benchmark's trace, and the measured bound.

On the synthetic family of ``test_serve`` (its ``setup`` and ``write_config``): short
runs with real inference; nothing here depends on the machine's speed.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_serve import setup, write_config  # noqa: F401  (setup: the module's fixture)

from loom.app.arrivals import make_trace
from loom.app.deployment import Deployment
from loom.app.peers import PEERS, is_peer, peer_models, peer_server, run_peer
from loom.app.run import run_trace
from loom.app.scenario import measured_bound
from loom.app.serve import bench
from loom.core.errors import ConfigError


@pytest.fixture(scope="module")
def dep(setup, synth_family, synth_partition):  # noqa: F811
    root, dev, _ = setup
    return Deployment.from_config(write_config(root, dev, synth_family, synth_partition))


def test_names():
    assert PEERS == ("ort-plain", "openvino-throughput")
    assert is_peer("ORT_plain") and not is_peer("sparseloom")
    with pytest.raises(ConfigError, match="peers: ort-plain"):
        peer_server(None, "tensorrt-plain")  # type: ignore[arg-type]


def test_peers_choose_the_sv_lo_np_variant(dep, synth_family):
    chosen = dep.candidates("sv-lo-np")["synthetic"][0].config[0]
    m = peer_models(dep)["synthetic"]
    assert m.variant == chosen and m.path == synth_family.variant_path(chosen)
    assert m.accuracy == synth_family.variant(chosen).accuracy


@pytest.mark.parametrize("name", PEERS)
def test_a_peer_serves_the_trace_with_one_record_per_request(dep, name):
    run = run_peer(dep, name, duration_s=1.0, progress=False)
    n_samples = {t: dep.sample_count(t) for t in dep.config.task_names}
    trace = make_trace(dep.config, n_samples, duration_s=1.0)
    assert len(run.records) == len(trace) > 0 and not run.errors
    assert sorted(r.id for r in run.records) == list(range(len(trace)))
    m = peer_models(dep)["synthetic"]
    for r, it in zip(run.records, trace, strict=True):
        assert r.policy == name and r.task == it.task
        assert r.status in ("ok", "late", "inaccurate") and r.latency_ms is not None and r.latency_ms > 0
        assert r.arrival_s <= r.start_s <= r.end_s and r.arrival_s >= it.t_s - 1e-3
        assert r.plan_accuracy == m.accuracy and r.config == (m.variant,) and len(r.spans) == 1
    # the config's SLO change at 0.6 s is applied: the bound, not the variant
    assert {r.latency_bound_ms for r in run.records} == {50.0, 40.0}
    assert all(r.latency_bound_ms == 40.0 for r in run.records if r.arrival_s > 0.7)
    o = run.summary["overall"]
    assert o["n"] > 0 and o["goodput_rps"] > 0 and run.peak_rss_mb > 0
    assert run.summary["policies"] == [name]


@pytest.mark.parametrize("name", PEERS)
def test_peer_outputs_match_onnxruntime(dep, name):
    import onnxruntime as ort

    m = peer_models(dep)["synthetic"]
    ref = ort.InferenceSession(str(m.path), providers=["CPUExecutionProvider"])
    server = peer_server(dep, name)
    futures = [server.submit("synthetic", dep.request_inputs("synthetic", i)) for i in range(12)]
    server.close()
    for i, f in enumerate(futures):
        want = ref.run([m.output_name], dep.request_inputs("synthetic", i))[0]
        if name == "ort-plain":
            np.testing.assert_array_equal(f.result(), want)
        else:  # OpenVINO in f32: the same figures to float rounding
            np.testing.assert_allclose(f.result(), want, rtol=1e-4, atol=1e-4)


def test_bench_takes_peers_and_the_simulator_skips_them(setup, synth_family, synth_partition, tmp_path):  # noqa: F811
    root, dev, _ = setup
    cfg = write_config(root, dev, synth_family, synth_partition)
    out = bench(cfg, out_dir=tmp_path / "real", policies=["sv-lo-np", "ort-plain"], duration_s=0.5)
    assert [r["policy"] for r in out["runs"]] == ["sv-lo-np", "ort-plain"]
    assert out["runs"][1]["n"] > 0 and (tmp_path / "real" / "trace-ort-plain.jsonl").is_file()
    sim = bench(cfg, out_dir=tmp_path / "sim", policies=["sv-lo-np", "openvino-throughput"], duration_s=0.5,
                simulate=True)
    assert [r["policy"] for r in sim["runs"]] == ["sv-lo-np"]
    with pytest.raises(ConfigError, match="policies: .*peers: ort-plain"):
        bench(cfg, out_dir=tmp_path / "bad", policies=["ort-fancy"])


def test_measured_bound_is_positive_and_above_a_low_load_goodput(dep):
    bound = measured_bound(dep, "sparseloom", seconds=0.6, warmup_s=0.2)
    assert bound["measured"] is True and bound["rps"] > 0
    assert bound["by_task_rps"]["synthetic"] == pytest.approx(bound["rps"])
    run = run_trace(dep, "sparseloom", duration_s=0.6, progress=False)  # 40 requests/s
    assert bound["rps"] >= run.summary["overall"]["goodput_rps"]
