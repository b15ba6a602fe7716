"""Differential switching: bookkeeping of what is loaded and released (never speed)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from loom.core.errors import ManifestError
from loom.model.blockstore import BlockStore

# differential switching is measured by the memory benchmark and lives beside it
_spec = importlib.util.spec_from_file_location(
    "switching", Path(__file__).resolve().parent.parent / "scripts" / "switching.py")
_switching = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("switching", _switching)  # its dataclasses look their module up
_spec.loader.exec_module(_switching)
Switcher, cost_as_dict, drop_page_cache = _switching.Switcher, _switching.cost_as_dict, _switching.drop_page_cache
measure_switches, switch_cost = _switching.measure_switches, _switching.switch_cost

DENSE = ("dense", "dense", "dense")
MIXED = ("dense", "int8", "fp16")


@pytest.fixture(scope="module")
def backend():
    from backends import get_backend

    return get_backend("onnxruntime", intra_op_threads=1)


def _size(p, bid: str) -> int:
    return p.block_path(bid).stat().st_size


def test_differential_loads_only_missing_blocks(synth_partition, backend):
    p = synth_partition
    cost = switch_cost(p, backend, DENSE, MIXED, cold=False)
    missing = [p.variants["int8"][1], p.variants["fp16"][2]]
    assert cost.blocks_loaded == missing
    assert cost.blocks_kept == [p.variants["dense"][0]]
    assert cost.blocks_released == p.variants["dense"][1:]
    assert cost.bytes_differential == sum(_size(p, b) for b in missing)
    # the whole to-model holds the kept block too
    assert cost.bytes_monolithic > cost.bytes_differential
    assert cost.differential_s > 0 and cost.monolithic_s > 0
    assert cost.speedup == pytest.approx(cost.monolithic_s / cost.differential_s)
    assert cost_as_dict(cost)["from_config"] == DENSE


def test_identical_configs_cost_nothing(synth_partition, backend):
    cost = switch_cost(synth_partition, backend, MIXED, MIXED, cold=False)
    assert cost.bytes_differential == 0 and cost.bytes_monolithic == 0
    assert cost.blocks_loaded == [] and cost.blocks_released == []
    assert cost.differential_s == 0.0 and cost.speedup is None


def test_cold_measurement_does_not_crash(synth_partition, backend):
    cost = switch_cost(synth_partition, backend, MIXED, DENSE, cold=True)
    assert cost.cold
    assert cost.page_cache_dropped == hasattr(os, "posix_fadvise")
    assert cost.bytes_differential == sum(_size(synth_partition, b) for b in synth_partition.variants["dense"][1:])
    assert drop_page_cache([synth_partition.block_path(synth_partition.variants["dense"][0])]) == hasattr(
        os, "posix_fadvise"
    )


def test_measure_switches_rows(synth_partition, backend):
    pairs = [(DENSE, MIXED), (MIXED, MIXED), (["int8"] * 3, ["fp16"] * 3)]
    rows = measure_switches(synth_partition, backend, pairs, repeats=2, cold=False)
    assert len(rows) == 3
    keys = {"from", "to", "differential_s", "monolithic_s", "bytes_differential", "bytes_monolithic", "speedup"}
    for row in rows:
        assert keys <= set(row)
        assert row["repeats"] == 2 and row["cold"] is False
    assert rows[0]["from"] == DENSE and rows[0]["to"] == MIXED
    assert rows[1]["bytes_differential"] == 0 and rows[1]["speedup"] is None
    # nothing shared between int8 and fp16: every block is missing
    p = synth_partition
    assert rows[2]["bytes_differential"] == sum(_size(p, b) for b in p.variants["fp16"])
    assert rows[2]["blocks_loaded"] == 3 and rows[2]["blocks_kept"] == 0
    assert isinstance(rows[0]["speedup"], float)
    with pytest.raises(ValueError, match="repeats"):
        measure_switches(p, backend, pairs, repeats=0)


def test_switch_from_a_block_store(synth_partition, backend, tmp_path):
    store = BlockStore(tmp_path / "store")
    store.add_partition(synth_partition, task="a")
    cost = switch_cost(store, backend, DENSE, MIXED, cold=True)  # one task: no need to name it
    assert cost.bytes_differential == sum(store.size(b) for b in store.blocks_of("a", MIXED)[1:])
    store.add_partition(synth_partition, task="b")
    with pytest.raises(ManifestError, match="name one"):
        switch_cost(store, backend, DENSE, MIXED, cold=False)
    with Switcher(store, backend, task="b") as sw:
        again = sw.measure(DENSE, MIXED, cold=False)
        merged = sw.merged_path(MIXED)
        assert merged.is_file() and sw.merged_path(MIXED) == merged  # written once
    assert not merged.exists()  # the temporary merged models are removed
    assert again.bytes_differential == cost.bytes_differential


def test_unknown_variant_is_refused(synth_partition, backend):
    with pytest.raises(ManifestError, match="unknown variant"):
        switch_cost(synth_partition, backend, DENSE, ("dense", "nope", "dense"), cold=False)


def test_load_part_is_within_the_total(synth_partition, backend):
    cost = switch_cost(synth_partition, backend, DENSE, MIXED, cold=False)
    assert 0 < cost.differential_load_s <= cost.differential_s
    assert 0 < cost.monolithic_load_s <= cost.monolithic_s
    rows = measure_switches(synth_partition, backend, [(MIXED, MIXED)], repeats=1)
    assert rows[0]["differential_load_s"] == 0.0 and rows[0]["monolithic_load_s"] == 0.0
