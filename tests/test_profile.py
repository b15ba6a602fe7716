"""``loom profile``: block and placed-config measurements, resume, fingerprints, the CSV format."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import loom.profiling.profile as prof
from loom.core.errors import ProfileMismatchError
from loom.processors.device import load_device_profile
from loom.profiling.chains import sample_placed_configs
from loom.profiling.dataset import (
    BLOCK_COLUMNS,
    CONFIG_COLUMNS,
    ProfileDataError,
    load_profile_dataset,
)
from loom.profiling.links import calibrate_links, segments_of
from loom.profiling.profile import profile_device

CORE_B = 1 if (os.cpu_count() or 1) > 1 else 0
#: small settings: the point is the bookkeeping, not the precision
FAST = {"warmup": 1, "repeats": 3, "config_samples": 4, "single_placements": 1, "progress": False}


def device_yaml(folder: Path, *, fail_on: list[str] | None = None) -> Path:
    """onnxruntime on core 0, and a simulated NPU that refuses Gemm (so the last slot)
    and crashes on the blocks in ``fail_on``."""
    data = {
        "name": "test-soc",
        "processors": [
            {"name": "cpu", "kind": "cpu", "backend": "onnxruntime", "options": {"intra_op_threads": 1}, "cores": [0]},
            {"name": "npu", "kind": "npu", "backend": "null", "cores": [CORE_B],
             "options": {"latency_ms": 0.05, "unsupported": ["Gemm"], "fail_on": fail_on or []}},
        ],
        "links": [{"between": ["cpu", "npu"], "bandwidth_gbps": 1.0, "latency_us": 30.0}],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "test-soc.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def failing_block(synth_partition):
    return synth_partition.variants["dense"][0]


@pytest.fixture(scope="module")
def device(tmp_path_factory, failing_block):
    return load_device_profile(device_yaml(tmp_path_factory.mktemp("device"), fail_on=[failing_block]))


@pytest.fixture(scope="module")
def profiled(synth_partition, device, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "data"
    return profile_device([synth_partition], device, out, **FAST)


@pytest.fixture
def copy_of(profiled, tmp_path):
    """A private copy of the profiled dataset, for tests that change it."""
    dst = tmp_path / "data"
    shutil.copytree(profiled.root, dst)
    return dst


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_writes_sane_block_rows(profiled, synth_partition, failing_block):
    rows = profiled.blocks
    assert len(rows) == 2 * len(synth_partition.blocks)
    assert {(r["block_id"], r["processor"]) for r in rows} == {
        (b, p) for b in synth_partition.blocks for p in ("cpu", "npu")
    }
    for r in rows:
        info = synth_partition.blocks[r["block_id"]]
        assert r["slot"] == info.slot and r["variants"] == ";".join(info.variants)
        assert r["size_bytes"] == synth_partition.block_path(r["block_id"]).stat().st_size
        assert profiled.block_path(r).is_file()
        if r["processor"] == "npu" and info.slot == 2:  # the slot with the Gemm
            assert r["status"] == "unsupported" and r["unsupported_ops"] == "Gemm"
            assert r["latency_ms_median"] is None
            continue
        if r["processor"] == "npu" and r["block_id"] == failing_block:  # a crash is a row too
            assert r["status"] == "error" and "simulated failure" in r["error"]
            assert r["latency_ms_median"] is None
            continue
        assert r["status"] == "ok", r
        assert 0 < r["latency_ms_min"] <= r["latency_ms_median"] <= r["latency_ms_p90"] < 1000
        assert r["latency_ms_std"] >= 0 and r["repeats"] == 3 and r["load_ms"] > 0
        assert r["memory_bytes"] >= 0 and r["input_bytes"] > 0 and r["output_bytes"] > 0
        if r["processor"] == "npu":
            assert r["latency_ms_median"] >= 0.05  # the modelled latency
    assert set(read_csv(profiled.root / "blocks.csv")[0]) == set(BLOCK_COLUMNS)
    assert set(read_csv(profiled.root / "configs.csv")[0]) == set(CONFIG_COLUMNS)


def test_writes_placed_config_rows(profiled, synth_partition):
    rows = profiled.configs
    assert rows and all(r["status"] == "ok" for r in rows)
    latency = profiled.block_latency()
    placements = set()
    for r in rows:
        config, placement = r["config"].split(";"), r["placement"].split(";")
        assert len(config) == len(placement) == synth_partition.k
        assert placement[2] == "cpu"  # the NPU cannot run the last slot
        assert not (config[0] == "dense" and placement[0] == "npu")  # nor the block that crashed
        blocks = [synth_partition.variants[v][s] for s, v in enumerate(config)]
        assert r["block_ids"] == ";".join(blocks)
        assert r["sum_blocks_ms"] == pytest.approx(
            sum(latency[(r["partition"], b, p)] for b, p in zip(blocks, placement, strict=True)), rel=1e-4)
        changes = sum(a != b for a, b in zip(placement, placement[1:], strict=False))
        assert r["n_transfers"] == changes and (r["transfer_bytes"] > 0) == (changes > 0)
        assert r["measured_ms_median"] > 0
        placements.add(r["placement"])
    assert "cpu;cpu;cpu" in placements  # the all-on-one placement of the first config
    meta = profiled.meta
    fp = meta["fingerprints"][meta["fingerprint_id"]]
    assert fp["logical_cores"] == os.cpu_count() and fp["cpu_model"] and fp["governor"]
    assert fp["packages"]["onnxruntime"] and fp["device"]["processors"][1]["options"]["unsupported"] == ["Gemm"]
    assert meta["counts"]["blocks_by_status"] == {"ok": 2 * len(synth_partition.blocks) - 6, "unsupported": 5, "error": 1}
    assert any("simulated failure" in e for e in meta["runs"][-1]["errors"])
    assert meta["link_calibration"]["n_configs"] == len(rows)
    assert meta["runs"][-1]["status"] == "finished" and meta["runs"][-1]["wall_s"] > 0


def test_resume_skips_what_is_done(copy_of, synth_partition, device, monkeypatch):
    def must_not_measure(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(prof, "_measure_block", must_not_measure)
    monkeypatch.setattr(prof, "_measure_config", must_not_measure)
    before = {n: (copy_of / n).read_text() for n in ("blocks.csv", "configs.csv")}
    data = profile_device([synth_partition], device, copy_of, **FAST)
    assert {n: (copy_of / n).read_text() for n in before} == before
    run = data.meta["runs"][-1]
    assert run["blocks_measured"] == 0 and run["blocks_skipped"] == len(data.blocks)
    assert run["configs_measured"] == 0 and run["configs_skipped"] == len(data.configs)
    monkeypatch.undo()

    # Drop two finished rows and leave half a row, as a kill mid-write would.
    lines = (copy_of / "blocks.csv").read_text().splitlines(keepends=True)
    (copy_of / "blocks.csv").write_text("".join(lines[:-2]) + lines[-2][:25])
    calls = []
    real = prof._measure_block
    monkeypatch.setattr(prof, "_measure_block", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    data = profile_device([synth_partition], device, copy_of, **FAST)
    assert len(calls) == 2 and len(data.blocks) == 2 * len(synth_partition.blocks)
    assert data.meta["runs"][-1]["blocks_measured"] == 2


def test_fingerprint_mismatch_is_refused_unless_mixing(copy_of, synth_partition, device, monkeypatch):
    real = prof.hardware_fingerprint

    def elsewhere(dev):
        fp = real(dev)
        fp["kernel"] = "0.0-other"
        fp["packages"]["onnxruntime"] = "0.1"
        return fp

    monkeypatch.setattr(prof, "hardware_fingerprint", elsewhere)
    with pytest.raises(ProfileMismatchError) as info:
        profile_device([synth_partition], device, copy_of, **FAST)
    assert "kernel" in str(info.value) and "packages.onnxruntime" in str(info.value)
    assert "allow_mixed" in str(info.value)
    data = profile_device([synth_partition], device, copy_of, allow_mixed=True, **FAST)
    assert len(data.meta["fingerprints"]) == 2
    assert len({r["fingerprint"] for r in data.blocks}) == 2
    assert len(data.blocks) == 4 * len(synth_partition.blocks)


def test_rows_without_meta_are_refused(copy_of, synth_partition, device):
    (copy_of / "meta.json").unlink()
    with pytest.raises(ProfileMismatchError, match="no meta.json"):
        profile_device([synth_partition], device, copy_of, **FAST)


@pytest.mark.parametrize(
    ("column", "value", "why"),
    [
        ("latency_ms_median", "fast", "could not convert"),
        ("status", "maybe", "must be one of"),
        ("slot", "", "a number is required"),
        ("latency_ms_min", "1e9", "min <= median <= p90"),
    ],
)
def test_malformed_csv_names_file_row_and_column(copy_of, column, value, why):
    path = copy_of / "blocks.csv"
    rows = read_csv(path)
    target = next(i for i, r in enumerate(rows) if r["status"] == "ok" and i >= 2)
    rows[target][column] = value
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ProfileDataError) as info:
        load_profile_dataset(copy_of)
    message = str(info.value)
    assert str(path) in message and f"row {target + 1} " in message and repr(column) in message and why in message


def test_malformed_header_and_short_rows(copy_of):
    path = copy_of / "configs.csv"
    text = path.read_text().replace("sum_blocks_ms", "sum_ms", 1)
    path.write_text(text)
    with pytest.raises(ProfileDataError, match="lacks column.*sum_blocks_ms"):
        load_profile_dataset(copy_of)
    path.write_text(text.replace("sum_ms", "sum_blocks_ms", 1) + "x,y\n")
    with pytest.raises(ProfileDataError, match=r"row \d+ \(line \d+\), column 'partition': missing"):
        load_profile_dataset(copy_of)
    (copy_of / "meta.json").write_text("{")
    with pytest.raises(ProfileDataError, match="meta.json: not valid JSON"):
        load_profile_dataset(copy_of)


def test_dataset_columns(profiled):
    lat = profiled.column("latency_ms_median")
    assert lat.dtype == float and np.isfinite(lat).all() and len(lat) == len(profiled.blocks) - 6
    assert set(profiled.column("processor", status=None)) == {"cpu", "npu"}
    assert len(profiled.column("measured_ms_median", table="configs")) == len(profiled.configs)


def test_sample_is_seeded_and_respects_support(synth_partition):
    supported = {b: ["cpu", "npu"] if info.slot < 2 else ["cpu"] for b, info in synth_partition.blocks.items()}
    kwargs = {"n": 10, "single_placements": 2, "seed": 3}
    a = sample_placed_configs(synth_partition, supported, ["cpu", "npu"], **kwargs)
    assert a == sample_placed_configs(synth_partition, supported, ["cpu", "npu"], **kwargs)
    assert a != sample_placed_configs(synth_partition, supported, ["cpu", "npu"], n=10, single_placements=2, seed=4)
    assert len(a) == len(set(a)) and all(pl[2] == "cpu" for _, pl in a)
    # the first 2 configs on each processor that runs all their blocks: only the CPU here
    assert [pl for c, pl in a[10:]] == [("cpu",) * 3] * len(a[10:]) and 0 < len(a[10:]) <= 2
    # a longer sample starts with the shorter one: resuming with more samples extends it
    assert sample_placed_configs(synth_partition, supported, ["cpu", "npu"], n=12, single_placements=0, seed=3)[:10] == a[:10]


def test_link_calibration_recovers_known_costs(device):
    rng = np.random.default_rng(0)
    dispatch = {"cpu": 0.020, "npu": 0.060}  # ms per request, by the chain's first processor
    rows = []
    for _ in range(80):
        placement = [str(p) for p in rng.choice(["cpu", "npu"], size=3)]
        segs = segments_of(placement)
        nbytes = [int(b) for b in rng.integers(10_000, 2_000_000, size=len(segs) - 1)]
        slots = [s for s in range(1, 3) if placement[s] != placement[s - 1]]
        transfers = ";".join(f"{placement[s - 1]}>{placement[s]}@{s}={b}" for s, b in zip(slots, nbytes, strict=True))
        blocks = float(rng.uniform(1, 5))
        # 40 us per hand-off and 2 GB/s on the link
        measured = blocks + dispatch[placement[0]] + len(nbytes) * 0.040 + sum(nbytes) / 2e9 * 1e3
        rows.append({"status": "ok", "sum_blocks_ms": blocks, "placement": ";".join(placement),
                     "measured_ms_median": measured * (1 + rng.normal(0, 1e-4)), "transfers": transfers})
    cal = calibrate_links(rows, device)
    link = cal["links"]["cpu|npu"]
    assert cal["processors"]["cpu"]["dispatch_us"] == pytest.approx(20, abs=2)
    assert cal["processors"]["npu"]["dispatch_us"] == pytest.approx(60, abs=2)
    assert link["latency_us"] == pytest.approx(40, abs=3)
    assert link["bandwidth_gbps"] == pytest.approx(2.0, rel=0.05)
    assert cal["quality"]["calibrated_leave_one_out"]["within_10pct"] == 1.0
    # the test device's own figures (30 us, 1 GB/s, no dispatch) predict worse
    assert cal["quality"]["device_profile"]["mape_pct"] > cal["quality"]["calibrated_in_sample"]["mape_pct"]


def test_cli_profile(synth_family, tmp_path, capsys):
    from loom.cli import main

    dev = device_yaml(tmp_path)
    out = tmp_path / "data"
    argv = ["profile", "--device", str(dev), "--family", str(synth_family.root), "--partitions", str(tmp_path / "parts"),
            "--out", str(out), "--warmup", "0", "--repeats", "2", "--config-samples", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "median block ms" in text and "cpu" in text and "npu" in text
    assert (tmp_path / "parts" / "synthetic" / "partition.yaml").is_file()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["partitions"]["synthetic"].endswith("parts/synthetic")
    assert main(argv + ["-k", "2"]) == 2  # the partition there has K=3
    assert "K=3" in capsys.readouterr().err
