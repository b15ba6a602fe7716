"""The wiring from an SLO config to a running system: plans, serving a trace, comparing policies.

A synthetic family on a two-processor device (onnxruntime on a core, and a simulated NPU
that refuses Gemm), real inference on the CPU side, estimators fitted from a real (tiny)
profile; the runs are short and nothing here depends on the machine's speed.
"""

from __future__ import annotations

import json

import pytest
import yaml
from test_profile import FAST, device_yaml

from loom.app.config import POLICIES, load_slo_config
from loom.app.deployment import Deployment, task_space
from loom.app.run import run_trace
from loom.app.serve import bench, describe_plans, serve
from loom.core.errors import ConfigError
from loom.processors.device import load_device_profile
from loom.profiling.fitting import fit_estimates
from loom.profiling.profile import profile_device


@pytest.fixture(scope="module")
def setup(synth_family, synth_partition, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    dev_path = device_yaml(root)
    device = load_device_profile(dev_path)
    data = profile_device([synth_partition], device, root / "data", **FAST)
    est = fit_estimates([synth_partition], data, device, samples=5, strategy="stratified")
    est.save(root / "est")
    return root, dev_path, est


def write_config(root, dev_path, synth_family, synth_partition, **overrides) -> str:
    cfg = {
        "device": str(dev_path),
        "policy": "sparseloom",
        "estimators": str(root / "est"),
        "partitions": str(synth_partition.root.parent),
        "k": synth_partition.k,
        "tasks": [{"name": "synthetic", "family": str(synth_family.root), "latency_ms": 50.0,
                   "accuracy_floor": 0.0, "arrival": {"process": "poisson", "rate_rps": 40},
                   "slo_changes": [{"at_s": 0.6, "latency_ms": 40.0}]}],
        "run": {"duration_s": 1.2, "seed": 3, "warmup_s": 0.1},
        **overrides,
    }
    path = root / f"slo-{len(list(root.glob('slo-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_task_space_leaves_out_what_a_processor_cannot_run(setup, synth_partition):
    _, _, est = setup
    space = task_space(est, "synthetic")
    assert space.processors == ["cpu", "npu"] and space.k == synth_partition.k
    last = {b for b in synth_partition.blocks if synth_partition.blocks[b].slot == synth_partition.k - 1}
    # the simulated NPU refuses Gemm, which only the last slot has
    assert all(not space.can_run(b, "npu") for b in last)
    assert all(space.can_run(b, "cpu") for b in synth_partition.blocks)
    plan = space.make_plan(["dense"] * space.k, ["npu"] * (space.k - 1) + ["cpu"])
    assert plan.latency_ms > sum(plan.block_ms)  # the hand-off and the dispatch cost count


def test_every_policy_gets_runnable_candidates(setup, synth_family, synth_partition):
    root, dev, _ = setup
    dep = Deployment.from_config(write_config(root, dev, synth_family, synth_partition))
    for name in POLICIES:
        plans = dep.candidates(name)["synthetic"]
        assert plans, name
        for p in plans:
            assert all(dep.spaces["synthetic"].can_run(b, proc) for b, proc in zip(p.block_ids, p.placement, strict=True))
        if name.startswith("sv-") or name.startswith("av-"):
            assert all(p.is_uniform for p in plans), name
        if name.endswith("-np"):
            assert all(p.on_one_processor for p in plans), name


def test_a_run_resolves_every_request_and_applies_slo_changes(setup, synth_family, synth_partition):
    root, dev, _ = setup
    dep = Deployment.from_config(write_config(root, dev, synth_family, synth_partition))
    run = run_trace(dep, "sparseloom", progress=False)
    assert run.records and len({r.id for r in run.records}) == len(run.records)
    assert all(r.status in ("ok", "late", "inaccurate", "rejected", "error") for r in run.records)
    assert not run.errors
    bounds = {r.latency_bound_ms for r in run.records}
    assert bounds == {50.0, 40.0}  # the change at 0.6 s took effect during the run
    assert all(r.latency_bound_ms == 40.0 for r in run.records if r.arrival_s > 0.7)
    assert run.summary["overall"]["n"] > 0 and run.peak_rss_mb > 0
    assert all(r.spans for r in run.records if r.status != "rejected")


def test_reject_policy_ends_requests_with_an_explicit_error(setup, synth_family, synth_partition):
    root, dev, _ = setup
    cfg = write_config(root, dev, synth_family, synth_partition, on_unservable="reject")
    dep = Deployment.from_config(cfg)
    dep.config.tasks[0].latency_ms = 1e-3  # nothing can finish in a microsecond
    dep.config.tasks[0].slo_changes = []
    run = run_trace(dep, "av-p", duration_s=0.5, progress=False)
    assert run.records and all(r.status == "rejected" for r in run.records)
    assert run.errors == {"SloUnservableError": len(run.records)}


def test_serve_and_bench_write_reports_and_plots(setup, synth_family, synth_partition, tmp_path):
    root, dev, _ = setup
    cfg = write_config(root, dev, synth_family, synth_partition)
    report = serve(cfg, out_dir=tmp_path / "serve", duration_s=0.6)
    assert report["policy"] == "sparseloom" and not report["simulated"]
    assert (tmp_path / "serve" / "trace-sparseloom.jsonl").stat().st_size > 0
    assert json.loads((tmp_path / "serve" / "report.json").read_text())["result"]["n"] > 0
    out = bench(cfg, out_dir=tmp_path / "bench", policies=["sv-ao-np", "sparseloom"], duration_s=0.6)
    assert [r["policy"] for r in out["runs"]] == ["sv-ao-np", "sparseloom"]
    for name in ("violations.png", "latency_cdf.png", "timeline-sv-ao-np.png"):
        assert (tmp_path / "bench" / name).stat().st_size > 1000


def test_plan_and_cli(setup, synth_family, synth_partition, capsys):
    from loom.cli import main

    root, dev, _ = setup
    cfg = write_config(root, dev, synth_family, synth_partition)
    out = describe_plans(cfg, policy="av-p")
    assert out["policy"] == "av-p" and out["tasks"]["synthetic"]["plans"]
    assert main(["plan", cfg]) == 0
    assert "candidate plans" in capsys.readouterr().out
    bad = write_config(root, dev, synth_family, synth_partition, policy="fastest")
    assert main(["plan", bad]) == 2
    assert "policy" in capsys.readouterr().err


def test_a_family_whose_task_differs_is_named(setup, synth_family, synth_partition):
    root, dev, _ = setup
    cfg = write_config(root, dev, synth_family, synth_partition)
    with open(cfg) as f:
        data = yaml.safe_load(f)
    data["tasks"][0]["name"] = "other"
    with pytest.raises(ConfigError, match="task 'other' names family"):
        Deployment.from_config(load_slo_config_from(data, root))


def load_slo_config_from(data, root):
    path = root / "renamed.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_slo_config(path)


def test_blocks_are_served_from_the_store_and_a_tampered_one_is_refused(setup, synth_family, synth_partition,
                                                                         tmp_path):
    import shutil

    from loom.core.errors import BlockIntegrityError

    root, dev_path, _est = setup
    parts = tmp_path / "partitions"
    shutil.copytree(synth_partition.root, parts / "synthetic")
    shutil.copytree(synth_partition.store_root, parts / "synthetic" / synth_partition.store)  # its block store
    dep = Deployment.from_config(write_config(root, dev_path, synth_family, synth_partition,
                                              partitions=str(parts)))
    # one block identity: serving reads the partition's own store, nothing is copied
    assert dep.store is not None and dep.store.root.resolve() == (parts / "blockstore").resolve()
    assert dep.store.root.resolve() == dep.partitions["synthetic"].store_root.resolve()
    assert set(dep.store.blocks) >= set(synth_partition.blocks) - set(dep.store.aliases)
    with dep.runtime("sv-lo-np") as rt:
        assert rt.block_store is dep.store
    # one stored file changes after the store recorded it: the next load refuses it by name
    victim = dep.store.resolve(dep.candidates("av-np")["synthetic"][0].block_ids[0])
    (dep.store.root / dep.store.blocks[victim].file).write_bytes(b"not the block")
    dep.store._verified.clear()  # a new process would not have verified it yet
    with pytest.raises(BlockIntegrityError, match=victim):
        dep.runtime("av-np")
    # the id is the sha256 of the bytes the partition wrote
    assert victim in synth_partition.blocks


def test_estimates_from_another_machine_are_said_loudly(setup, synth_family, synth_partition, capsys):
    import json

    root, dev_path, _est = setup
    dep = Deployment.from_config(write_config(root, dev_path, synth_family, synth_partition))
    assert dep.machine_mismatch == []  # measured here, by the setup
    meta_path = dep.dataset_dir() / "meta.json"
    original = meta_path.read_text()
    meta = json.loads(original)
    meta["fingerprint"]["cpu_model"] = "Some Other CPU"
    # a feature set this CPU does not have, whatever it has (an AVX2-only CPU has exactly ["avx2"])
    here = meta["fingerprint"]["cpu_features"]
    meta["fingerprint"]["cpu_features"] = ["avx512_vnni"] if here != ["avx512_vnni"] else ["avx2"]
    try:
        meta_path.write_text(json.dumps(meta))
        capsys.readouterr()
        dep = Deployment.from_config(write_config(root, dev_path, synth_family, synth_partition))
    finally:
        meta_path.write_text(original)
    assert any(p.startswith("cpu_model") and "Some Other CPU" in p for p in dep.machine_mismatch)
    assert any(p.startswith("cpu_features") for p in dep.machine_mismatch)
    err = capsys.readouterr().err
    assert "WARNING" in err and "another machine" in err and "loom profile --device" in err
