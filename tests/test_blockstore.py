"""The block store: dedup by content, integrity on first use, the index, blocks of a config."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from loom.core.errors import BlockIntegrityError, LoomError, ManifestError
from loom.model.blockstore import BlockStore, file_sha256
from loom.model.cutting import partition_family
from loom.model.partition import load_partition

CONFIG = ["dense", "int8", "fp16"]


def _uses(partition) -> int:
    return sum(len(ids) for ids in partition.variants.values())


def test_same_partition_under_two_tasks_is_stored_once(synth_partition, tmp_path):
    p = synth_partition
    store = BlockStore(tmp_path / "store")
    assert store.add_partition(p, task="a") == len(p.blocks)
    assert store.add_partition(p, task="b") == 0
    stats = store.stats()
    on_disk = sum(p.block_path(b).stat().st_size for b in p.blocks)
    assert stats["blocks"] == len(p.blocks) == len(list((tmp_path / "store" / "blocks").glob("*.onnx")))
    assert stats["bytes_on_disk"] == on_disk
    # every use of a block, in both tasks, would have been a file of its own
    per_use = sum(p.block_path(b).stat().st_size for ids in p.variants.values() for b in ids)
    assert stats["bytes_without_dedup"] == 2 * per_use
    assert stats["bytes_saved"] == 2 * per_use - on_disk
    assert stats["uses"] == 2 * _uses(p)
    shared = store.shared_blocks()
    assert set(shared) == set(p.blocks)  # each is used by task a and task b
    for users in shared.values():
        assert {t for t, _, _ in users} == {"a", "b"}


def test_two_partitions_of_one_family_dedup(synth_family, synth_partition, tmp_path):
    again = partition_family(synth_family, tmp_path / "part2", k=3)
    store = BlockStore(tmp_path / "store")
    store.add_partition(synth_partition, task="t1")
    assert store.add_partition(again, task="t2") == 0
    assert store.blocks_of("t1", CONFIG) == store.blocks_of("t2", CONFIG)
    assert store.stats()["blocks"] == len(synth_partition.blocks)


def test_blocks_are_hard_linked_or_copied(synth_partition, tmp_path):
    p = synth_partition
    bid = next(iter(p.blocks))
    linked = BlockStore(tmp_path / "linked")
    linked.add_partition(p)
    copied = BlockStore(tmp_path / "copied")
    copied.add_partition(p, link=False)
    assert os.path.samefile(linked.path(bid), p.block_path(bid))  # same file system here
    assert not os.path.samefile(copied.path(bid), p.block_path(bid))
    assert file_sha256(copied.path(bid)).startswith(bid)


def test_blocks_of_a_config(synth_partition, tmp_path):
    p = synth_partition
    store = BlockStore(tmp_path / "store")
    store.add_partition(p, task="img")
    assert store.blocks_of("img", CONFIG) == [p.variants[v][s] for s, v in enumerate(CONFIG)]
    assert store.blocks_of("img", ["dense"] * 3) == p.variants["dense"]
    with pytest.raises(ManifestError, match="unknown variant"):
        store.blocks_of("img", ["dense", "nope", "dense"])
    with pytest.raises(ManifestError, match="slot"):
        store.blocks_of("img", ["dense"])
    with pytest.raises(ManifestError, match="no task"):
        store.blocks_of("other", CONFIG)
    bid = p.variants["int8"][1]
    assert ("img", "int8", 1) in store.users(bid)


def test_index_round_trip(synth_partition, tmp_path):
    store = BlockStore(tmp_path / "store")
    store.add_partition(synth_partition, task="a")
    store.add_partition(synth_partition, task="b")
    data = json.loads(store.index_path.read_text())
    assert set(data) >= {"format", "blocks", "tasks"}
    some = next(iter(data["blocks"].values()))
    assert len(some["sha256"]) == 64 and some["users"]
    again = BlockStore(tmp_path / "store")
    assert again.blocks == store.blocks
    assert again.tasks == store.tasks
    assert again.stats() == store.stats()
    assert again.blocks_of("b", CONFIG) == store.blocks_of("b", CONFIG)
    assert again.shared_blocks() == store.shared_blocks()


def test_tampered_block_raises_on_first_use(synth_partition, tmp_path):
    store = BlockStore(tmp_path / "store")
    store.add_partition(synth_partition, link=False)  # never tamper the shared fixture
    bid = synth_partition.variants["dense"][1]
    path = store.path(bid)  # verified, cached
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.path(bid) == path  # the cache trusts what it verified
    with pytest.raises(BlockIntegrityError, match=bid):
        store.path(bid, recheck=True)
    fresh = BlockStore(tmp_path / "store")
    with pytest.raises(BlockIntegrityError) as err:
        fresh.path(bid)
    assert bid in str(err.value) and str(path) in str(err.value)
    assert isinstance(err.value, LoomError) and isinstance(err.value, ValueError)
    other = synth_partition.variants["dense"][0]
    assert fresh.path(other).is_file()  # the other blocks are fine


def test_missing_block_file(synth_partition, tmp_path):
    store = BlockStore(tmp_path / "store")
    store.add_partition(synth_partition, link=False)
    bid = synth_partition.variants["fp16"][2]
    (tmp_path / "store" / "blocks" / f"{bid}.onnx").unlink()
    with pytest.raises(BlockIntegrityError, match="missing"):
        BlockStore(tmp_path / "store").path(bid)


def test_add_refuses_a_tampered_partition(synth_partition, tmp_path):
    shutil.copytree(synth_partition.root.parent, tmp_path / "copy")  # the partition and its store
    part = load_partition(tmp_path / "copy" / synth_partition.root.name)
    bid = part.variants["int8"][0]
    f = part.block_path(bid)
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BlockIntegrityError, match=bid):
        BlockStore(tmp_path / "store").add_partition(part)


def test_readd_remove_and_prune(synth_partition, tmp_path):
    store = BlockStore(tmp_path / "store")
    store.add_partition(synth_partition, task="a")
    store.add_partition(synth_partition, task="a")  # replaces, does not double the users
    assert store.stats()["uses"] == _uses(synth_partition)
    store.remove_task("a")
    assert store.shared_blocks() == {}
    assert store.prune() == len(synth_partition.blocks)
    assert store.stats()["blocks"] == 0
    assert synth_partition.block_path(next(iter(synth_partition.blocks))).is_file()  # a link went, not the file


def test_store_partition_view_runs_like_the_partition(synth_family, synth_partition, tmp_path):
    from loom.model.stitch import StitchedModel

    store = BlockStore(tmp_path / "store")
    store.add_partition(synth_partition, task="img", link=False)
    view = store.partition("img")
    assert view.root == tmp_path / "store" and view.k == synth_partition.k
    x, _ = synth_family.eval_data(4)
    name, out = synth_family.manifest.input.name, synth_family.manifest.output.name
    want = StitchedModel(synth_partition, CONFIG).run({name: x})[out]
    got = StitchedModel(view, CONFIG).run({name: x})[out]
    np.testing.assert_array_equal(want, got)
