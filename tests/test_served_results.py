"""Served results are right: the runtime's outputs equal the stitched model's, request by request.

Two onnxruntime "processors" serve mixed tasks (the synthetic partition and the zoo's
signal-cls, partitioned here) from several client threads at once, on plans that hand
off between the processors, reading every block through a block store (verified bytes).
Each request carries its own sample, and its result is compared with the stitched
model its plan names run alone on that sample, to the chain check's tolerance
(docs/model.md): so a tensor mixed up between concurrent requests, or the wrong cut
tensor handed off, fails.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from conftest import ZOO

from backends import get_backend
from loom.model.blockstore import BlockStore
from loom.model.cutting import partition_family
from loom.model.partition import Partition
from loom.model.stitch import StitchedModel
from loom.serving.runtime import Runtime, TaskBinding
from placement.plan import Plan

pytest.importorskip("onnxruntime")

THREADS = 4
PER_THREAD = 24
#: the chain check's tolerance: fp32 absolute; int8 / fp16 relative to the largest |output|
ABS_FP32 = 1e-5
REL = {"int8": 5e-2, "fp16": 3e-2}


def plan_of(task: str, partition: Partition, config: tuple[str, ...], placement: tuple[str, ...]) -> Plan:
    k = len(config)
    return Plan(
        task=task, config=config, placement=placement,
        block_ids=tuple(partition.variants[v][s] for s, v in enumerate(config)),
        latency_ms=float(k), block_ms=(1.0,) * k, transfer_ms=(0.0,) * (k - 1), accuracy=0.9, memory_bytes=0,
    )


def assert_close(got: np.ndarray, want: np.ndarray, precisions: set[str], where: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, where
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    rel = [REL[p] for p in precisions if p in REL]
    if rel:
        scale = max(float(np.max(np.abs(want))), 1e-12)
        assert diff / scale <= max(rel), f"{where}: max abs diff {diff} is {diff / scale:.3g} of max |output|"
    else:
        assert diff <= ABS_FP32, f"{where}: max abs diff {diff}"


@pytest.fixture(scope="module")
def zoo_partition(tmp_path_factory: pytest.TempPathFactory) -> Partition:
    return partition_family(ZOO / "signal-cls", tmp_path_factory.mktemp("zoo-part") / "signal-cls", k=3,
                            verify_samples=8)


def serve_all(rt: Runtime, work: list[tuple[str, dict[str, np.ndarray]]]) -> list[Future]:
    """Submit ``work`` from THREADS client threads at once (interleaved); the futures in ``work``'s order."""
    futures: list[Future | None] = [None] * len(work)
    start = threading.Barrier(THREADS)

    def client(t: int) -> None:
        start.wait()
        for i in range(t, len(work), THREADS):
            task, feeds = work[i]
            futures[i] = rt.submit(task, feeds)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert all(f is not None for f in futures)
    return futures  # type: ignore[return-value]


def test_served_outputs_equal_the_stitched_models(synth_partition, zoo_partition, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlockStore(tmp_path / "store")
    store.add_partition(synth_partition)
    store.add_partition(zoo_partition)
    reads: list[str] = []
    read = store.read
    monkeypatch.setattr(store, "read", lambda bid: reads.append(bid) or read(bid))
    parts = {"synth": synth_partition, "zoo": zoo_partition}
    # task -> (partition, config, placement): each binding has one plan, so each result's plan is known
    specs = {
        "synth-a": ("synth", ("dense", "int8", "fp16"), ("a", "b", "a")),
        "synth-b": ("synth", ("fp16", "dense", "dense"), ("b", "a", "a")),
        "synth-c": ("synth", ("dense", "dense", "dense"), ("a", "b", "b")),
        "zoo-a": ("zoo", ("dense", "structured-50", "dense"), ("b", "a", "b")),
        "zoo-b": ("zoo", ("int8", "unstructured-80", "fp16"), ("a", "a", "b")),
    }
    plans = {t: plan_of(t, parts[p], c, pl) for t, (p, c, pl) in specs.items()}
    bindings = [
        TaskBinding(t, [plan], {b: store.file(b) for b in plan.block_ids}, latency_ms=60_000, accuracy_floor=0.0)
        for t, plan in plans.items()
    ]
    rng = np.random.default_rng(7)
    zoo_x = np.load(ZOO / "signal-cls" / "eval.npz")["x"].astype(np.float32)
    tasks = list(specs)
    work: list[tuple[str, dict[str, np.ndarray]]] = []
    for i in range(THREADS * PER_THREAD):
        task = tasks[i % len(tasks)]
        if specs[task][0] == "zoo":
            x = zoo_x[i % len(zoo_x)][None] + np.float32(1e-3 * i)  # distinct even where eval repeats
        else:
            x = rng.standard_normal((1 + i % 2, 1, 8, 8)).astype(np.float32)
        work.append((task, {"input": x}))
    backends = {p: get_backend("onnxruntime") for p in ("a", "b")}
    with Runtime(backends=backends, tasks=bindings, adaptive=False, block_store=store) as rt:
        futures = serve_all(rt, work)
        results = [f.result(timeout=60) for f in futures]
        stats = rt.stats()
    assert stats["resident"]["a"] and stats["resident"]["b"]
    loaded = {b for plan in plans.values() for b in plan.block_ids}
    assert set(reads) == loaded  # every block came from the store, its bytes hashed at the load
    truth = {t: StitchedModel(parts[p], c) for t, (p, c, _pl) in specs.items()}
    try:
        for i, ((task, feeds), got) in enumerate(zip(work, results, strict=True)):
            part = parts[specs[task][0]]
            precisions = {part.blocks[b].precision for b in plans[task].block_ids}
            want = truth[task].run(feeds)
            assert set(got) == set(want), f"request {i} ({task})"
            for name in want:
                assert_close(got[name], want[name], precisions, f"request {i} ({task}, {name})")
    finally:
        for model in truth.values():
            model.close()
