"""Device profiles (YAML, validation, links) and the per-processor workers and placed chains."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

import backends
from backends.base import Backend
from loom.core.errors import BackendError, BackendUnavailableError, ConfigError
from loom.processors.device import DeviceProfile, load_device_profile, parse_device_profile
from loom.processors.workers import PlacedChain, Worker, WorkerPool

NCPU = os.cpu_count() or 1
#: a second core where the machine has one, so two processors really differ
CORE_B = 1 if NCPU > 1 else 0


def profile_dict(**changes) -> dict:
    data = {
        "name": "test",
        "processors": [
            {"name": "a", "kind": "cpu", "backend": "onnxruntime", "options": {"intra_op_threads": 1}, "cores": [0]},
            {"name": "b", "kind": "npu", "backend": "null", "options": {"latency_ms": 0.0}, "cores": [CORE_B]},
        ],
        "links": [{"between": ["a", "b"], "bandwidth_gbps": 2.0, "latency_us": 40.0}],
    }
    data.update(changes)
    return data


def write_profile(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- profiles ---------------------------------------------------------------------------------
def test_host_profile_loads():
    host = load_device_profile("host")
    assert host.name == "host"
    assert host.processor_names == ["cpu0-ort", "cpu1-ov", "cpu1-tvm"]
    assert [p.backend for p in host.processors] == ["onnxruntime", "openvino", "tvm"]
    assert host.processor("cpu0-ort").cores == [0] and host.processor("cpu1-ov").cores == [1]
    assert host.processor("cpu1-ov").options["precision"] == "f32"
    link = host.link("cpu1-ov", "cpu0-ort")
    assert link.latency_us > 0 and link.bandwidth_gbps > 0
    assert host.transfer_ms("cpu0-ort", "cpu0-ort", 10**9) == 0.0


def test_name_or_path(tmp_path):
    from loom.core.paths import REPO_ROOT

    by_path = load_device_profile(REPO_ROOT / "profiles" / "host.yaml")
    assert by_path == load_device_profile("host")
    with pytest.raises(ConfigError, match="no device profile named 'nope'.*host"):
        load_device_profile("nope")
    with pytest.raises(ConfigError, match="no such file"):
        load_device_profile(tmp_path / "missing.yaml")


def test_link_costs(tmp_path):
    dev = load_device_profile(write_profile(tmp_path, profile_dict()))
    # 40 us + 2e6 bytes / 2 GB/s = 0.04 ms + 1 ms
    assert dev.transfer_ms("a", "b", 2_000_000) == pytest.approx(1.04)
    assert dev.transfer_ms("b", "a", 0) == pytest.approx(0.04)
    assert dev.link("a", "a").transfer_ms(10**9) == 0.0
    with pytest.raises(ConfigError, match="no processor 'zz'"):
        dev.link("a", "zz")
    dev.processors[1].dispatch_us = 100.0
    # b;b;a;b: enters on b, then two hand-offs of 2e6 and 0 bytes
    assert dev.chain_overhead_ms(["b", "b", "a", "b"], [2_000_000, 0]) == pytest.approx(0.1 + 1.04 + 0.04)
    assert dev.chain_overhead_ms(["a", "a"]) == 0.0
    three = profile_dict()
    three["processors"].append({"name": "c", "kind": "gpu", "backend": "null"})
    dev3 = parse_device_profile(three, source="inline")
    with pytest.raises(ConfigError, match="no link between 'a' and 'c'"):
        dev3.link("a", "c")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["links"][0].update(bandwidth_gbps="fast"), ["links[0].bandwidth_gbps"]),
        (lambda d: d["processors"][1].update(backend="tvm-nope"),
         ["processors[1].backend", "unknown backend 'tvm-nope'", "onnxruntime", "openvino", "null"]),
        (lambda d: d["links"][0].update(between=["a", "zz"]), ["links[0].between", "'zz'"]),
        (lambda d: d["processors"][0].update(corez=[0]), ["processors[0].corez: unknown field"]),
        (lambda d: d["processors"][0].update(kind="tpu"), ["processors[0].kind"]),
        (lambda d: d["processors"][0]["options"].update(thread=2), ["processors[0].options.thread", "intra_op_threads"]),
        (lambda d: d["processors"][0]["options"].update(cores=[0]), ["processors[0].options.cores"]),
        (lambda d: d["processors"][1].update(name="a"), ["processors[1].name", "earlier processor"]),
        (lambda d: d["links"][0].update(latency_us=-1), ["links[0].latency_us"]),
        (lambda d: d.update(processors=[]), ["processors"]),
    ],
)
def test_malformed_profiles_name_the_field(tmp_path, edit, expected):
    data = profile_dict()
    edit(data)
    path = write_profile(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_device_profile(path)
    message = str(info.value)
    assert str(path) in message
    for text in expected:
        assert text in message


def test_every_problem_in_one_error(tmp_path):
    data = profile_dict()
    data["processors"][0]["kind"] = "tpu"
    data["processors"][1]["backend"] = "nope"
    data["links"].append({"between": ["a", "ghost"], "bandwidth_gbps": 1, "latency_us": 1})
    data["extra"] = 1
    with pytest.raises(ConfigError) as info:
        load_device_profile(write_profile(tmp_path, data))
    message = str(info.value)
    assert "4 problem(s)" in message
    for field in ("processors[0].kind", "processors[1].backend", "links[1].between", "extra: unknown field"):
        assert field in message


class _Unavailable(Backend):
    name = "unavailable"

    @classmethod
    def is_available(cls):
        return False, "no such accelerator on this machine"

    def unsupported_ops(self, model):
        return []

    def load(self, model, *, block_id=None):
        raise AssertionError("never loaded")

    def run(self, block, feeds):
        raise AssertionError("never run")

    def release(self, block):
        pass


@pytest.fixture
def unavailable_backend(monkeypatch):
    monkeypatch.setitem(backends.REGISTRY, "unavailable", f"{__name__}:_Unavailable")
    yield "unavailable"
    backends._classes.pop("unavailable", None)


def test_make_backend(tmp_path, unavailable_backend):
    data = profile_dict()
    data["processors"].append({"name": "dla", "kind": "npu", "backend": unavailable_backend})
    dev = parse_device_profile(data, source="inline")
    null = dev.make_backend("b")
    assert null.name == "null" and null.cores == [CORE_B]
    with pytest.raises(BackendUnavailableError, match="processor 'dla'.*no such accelerator"):
        dev.make_backend("dla")
    with WorkerPool(dev) as pool, pytest.raises(BackendUnavailableError, match="processor 'dla'"):
        pool["dla"]


# -- workers --------------------------------------------------------------------------------------
def null_backend(cores=None, **options) -> Backend:
    return backends.get_backend("null", cores=cores, **options)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="thread pinning is Linux-only")
def test_worker_runs_jobs_on_its_pinned_thread():
    before = os.sched_getaffinity(0)
    with Worker("p", null_backend(cores=[CORE_B])) as w:
        affinity, thread = w.submit(lambda: (os.sched_getaffinity(0), threading.current_thread())).result(10)
        assert affinity == {CORE_B} and w.affinity == {CORE_B} and w.pinned
        assert thread is not threading.current_thread() and thread.name == "loom-worker-p"
    assert os.sched_getaffinity(0) == before  # only the worker's thread was pinned


def test_worker_propagates_exceptions_and_keeps_going():
    with Worker("p", null_backend()) as w:
        bad = w.submit(lambda: 1 / 0)
        good = w.submit(lambda x: x + 1, 41)
        with pytest.raises(ZeroDivisionError):
            bad.result(10)
        assert good.result(10) == 42
        order: list[int] = []
        futures = [w.submit(order.append, i) for i in range(20)]
        for f in futures:
            f.result(10)
        assert order == list(range(20))
    assert not w.alive
    with pytest.raises(RuntimeError, match="closed"):
        w.submit(lambda: None)


def test_worker_runs_blocks(synth_partition):
    bid = synth_partition.variants["dense"][0]
    with Worker("p", backends.get_backend("onnxruntime", cores=[0])) as w:
        block = w.load(synth_partition.block_path(bid), block_id=bid).result(30)
        x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
        out = w.run(block, {"input": x}).result(30)
        assert set(out) == set(block.output_names)
        w.release(block).result(10)
        with pytest.raises(BackendError, match="released"):
            w.run(block, {"input": x}).result(10)


def two_ort_device() -> DeviceProfile:
    data = profile_dict()
    data["processors"][1] = {"name": "b", "kind": "cpu", "backend": "onnxruntime", "cores": [CORE_B]}
    return parse_device_profile(data, source="inline")


def test_placed_chain_matches_stitched_model(synth_partition, synth_family):
    from loom.model.stitch import StitchedModel

    config = ("int8", "dense", "structured-25-pt")
    x, _ = synth_family.eval_data(4)
    with StitchedModel(synth_partition, config) as ref_model:
        want = ref_model.run({"input": x})["logits"]
    with WorkerPool(two_ort_device()) as pool:
        with PlacedChain(synth_partition, config, ("a", "a", "b"), pool) as chain:
            assert [s.processor for s in chain.segments] == ["a", "b"]
            assert [s.slots for s in chain.segments] == [[0, 1], [2]]
            got = chain.run({"input": x})
            np.testing.assert_allclose(got["logits"], want, atol=1e-5)
            env = chain.run({"input": x}, keep_all=True)
            (t,) = chain.transfers(env)
            cut = synth_partition.cuts[1]
            assert (t.src, t.dst, t.slot, list(t.tensors)) == ("a", "b", 2, cut)
            assert t.nbytes == sum(env[n].nbytes for n in cut)
        with PlacedChain(synth_partition, config, ("b", "b", "b"), pool) as chain:
            assert len(chain.segments) == 1 and chain.transfers(chain.run({"input": x}, keep_all=True)) == []


def test_placed_chain_propagates_failures_and_shares_blocks(synth_partition):
    failing = synth_partition.variants["dense"][1]
    data = profile_dict()
    data["processors"][1]["options"] = {"fail_on": [failing]}
    dev = parse_device_profile(data, source="inline")
    x = np.zeros((1, 1, 8, 8), np.float32)
    resident: dict = {}
    with WorkerPool(dev) as pool:
        chain = PlacedChain(synth_partition, ["dense"] * 3, ("a", "b", "a"), pool, resident=resident)
        with pytest.raises(BackendError, match="simulated failure"):
            chain.run({"input": x}, timeout=30)
        assert len(resident) == 3
        again = PlacedChain(synth_partition, ["dense", "int8", "dense"], ("a", "b", "a"), pool, resident=resident)
        assert len(resident) == 4  # only the missing block was loaded
        assert set(again.run({"input": x}, timeout=30)) == {"logits"}
        with pytest.raises(ConfigError, match="unknown processor"):
            PlacedChain(synth_partition, ["dense"] * 3, ("a", "b", "c"), pool)
        for (proc, _), block in resident.items():
            pool[proc].release(block).result(10)
