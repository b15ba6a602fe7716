"""Integrity on the bytes that run: every load of a stored block hashes the bytes it hands the engine.

A block file changed after an earlier load (of the same block, by the same process and
the same ``BlockStore``) fails the next load, by name; the simulator never reads files.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest

from backends import get_backend
from backends.null import NullBackend
from loom.app.sim_runtime import SimPool
from loom.core.errors import BackendError, BlockIntegrityError
from loom.model.blockstore import BlockStore
from loom.serving.cache import BlockCache
from loom.serving.pool import WorkerPool
from loom.serving.runtime import Runtime, TaskBinding
from placement.plan import Plan

CONFIG = ("dense", "int8", "fp16")


@pytest.fixture
def store(synth_partition, tmp_path: Path) -> BlockStore:
    """A copy of the synthetic partition's blocks (never tamper the shared fixture's files)."""
    s = BlockStore(tmp_path / "store")
    s.add_partition(synth_partition, link=False)
    return s


def tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def pool_kwargs(store: BlockStore | None, backends: dict) -> dict:
    return dict(
        device=None, backends=backends, processors=list(backends), preloader=None, block_store=store,
        block_bytes={}, now=lambda: 0.0, seq=itertools.count(), on_wake=lambda _p, _d: None,
        plans=lambda: [], closed=lambda: False, prefetch_max_load_ms=5.0,
    )


def test_read_hashes_the_bytes_every_time(store: BlockStore, synth_partition) -> None:
    bid = synth_partition.variants["dense"][1]
    data = store.read(bid)
    assert hashlib.sha256(data).hexdigest() == bid == store.blocks[bid].sha256
    assert store.path(bid) == store.file(bid)  # verified once, and cached by ``path``
    tamper(store.file(bid))
    with pytest.raises(BlockIntegrityError) as err:
        store.read(bid)  # the same store, after a good read: refused all the same
    assert bid in str(err.value) and str(store.file(bid)) in str(err.value)
    store.file(bid).unlink()
    with pytest.raises(BlockIntegrityError, match="missing"):
        store.read(bid)


def test_a_block_changed_after_its_load_fails_its_next_load(store: BlockStore, synth_partition) -> None:
    """Load, tamper, evict, load again: the cache's second load of the block is refused by name."""
    bid = synth_partition.variants["dense"][0]
    pool = WorkerPool(**pool_kwargs(store, {"a": get_backend("onnxruntime")}))
    pool.worker("a")
    try:
        cache = pool.caches["a"]
        block = cache.get(bid)
        feeds = {"input": np.ones((1, 1, 8, 8), np.float32)}
        cache.backend.run(block, feeds)
        tamper(store.file(bid))
        assert cache.get(bid) is block  # resident: its verified bytes are what runs
        cache.evict(bid)
        with pytest.raises(BlockIntegrityError) as err:
            cache.get(bid)
        assert bid in str(err.value) and str(store.file(bid)) in str(err.value)
        assert not cache.is_resident(bid)
        # a fresh cache in the same process, on the same store: refused too
        fresh = BlockCache("b", NullBackend(), pool.source)
        with pytest.raises(BlockIntegrityError, match=bid):
            fresh.get(bid)
    finally:
        pool.shutdown()


def test_a_runtime_refuses_a_block_changed_after_another_runtime_loaded_it(store: BlockStore,
                                                                          synth_partition) -> None:
    ids = tuple(synth_partition.variants[v][s] for s, v in enumerate(CONFIG))
    plan = Plan(task="t", config=CONFIG, placement=("a", "b", "a"), block_ids=ids, latency_ms=3.0,
                block_ms=(1.0,) * 3, transfer_ms=(0.0,) * 2, accuracy=0.9, memory_bytes=0)
    binding = TaskBinding("t", [plan], {b: store.file(b) for b in ids}, latency_ms=60_000, accuracy_floor=0.0)
    x = {"input": np.ones((1, 1, 8, 8), np.float32)}

    def runtime(preload: bool) -> Runtime:
        backends = {p: get_backend("onnxruntime") for p in ("a", "b")}
        return Runtime(backends=backends, tasks=[binding], adaptive=False, block_store=store, preload=preload)

    with runtime(True) as rt:
        before = rt.submit("t", x).result(timeout=30)
        tamper(store.file(ids[1]))
        # its loaded block keeps serving: it was built from the bytes verified at its load
        after = rt.submit("t", x).result(timeout=30)
        assert np.array_equal(before["logits"], after["logits"])
    with pytest.raises(BlockIntegrityError, match=ids[1]):
        runtime(True)  # preloading refuses it
    with runtime(False) as rt:
        with pytest.raises(BackendError, match=ids[1]) as err:
            rt.submit("t", x).result(timeout=30)  # a load on demand refuses it, in the request
        assert isinstance(err.value.__cause__, BlockIntegrityError)


def test_the_simulated_pool_reads_no_file(store: BlockStore, synth_partition, monkeypatch) -> None:
    """The simulator's pool resolves ids to paths it never opens, even with a store that holds them."""
    bid = synth_partition.variants["dense"][0]
    monkeypatch.setattr(store, "read", lambda b: pytest.fail(f"read {b}"))
    pool = SimPool(sim=None, **pool_kwargs(store, {"a": NullBackend()}))
    assert pool.source(bid) == Path(bid)
    real = WorkerPool(**pool_kwargs(store, {"a": NullBackend()}))
    with pytest.raises(pytest.fail.Exception, match=bid):
        real.source(bid)
