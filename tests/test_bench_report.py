"""scripts/bench_report.py: headline figures of each benchmark's JSON, one column per zoo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_report  # noqa: E402


def write(folder: Path, name: str, data: dict) -> None:
    (folder / f"{name}.json").write_text(json.dumps(data))


def test_figures_side_by_side_and_missing_files_named(tmp_path, capsys):
    rows = [{"k": 3, "mode": "chained", "overhead": x} for x in (0.01, 0.03, 0.02)]
    write(tmp_path, "edge-stitch", {"rows": rows})
    write(tmp_path, "embedded-stitch", {"rows": [{"k": 3, "mode": "chained", "overhead": 0.5}]})
    write(tmp_path, "edge-serving", {
        "settings": {"capacity_rps": 120.0},
        "cells": {"1.0/loose": {"sparseloom": {"slo_violation_rate": {"median": 0.05}},
                                "av-p": {"slo_violation_rate": {"median": 0.02}},
                                "sv-lo-np": {"slo_violation_rate": {"median": 0.08}}}},
        "capacity_rps": {"sparseloom": 150.0}, "overhead_us": {"decision": 42.0, "hand_off": None}})
    write(tmp_path, "embedded-serving", {  # a file from before repeats: one run per cell
        "settings": {"capacity_rps": 300.0},
        "runs": [{"load": 1.0, "slo": "loose", "policy": "sparseloom", "slo_violation_rate": 0.1},
                 {"load": 1.0, "slo": "loose", "policy": "av-p", "slo_violation_rate": 0.2}]})
    assert bench_report.main([str(tmp_path), "--out", str(tmp_path / "report.json")]) == 0
    text = capsys.readouterr().out
    rep = json.loads((tmp_path / "report.json").read_text())
    figs = rep["figures"]
    assert abs(figs["stitch"]["chained overhead, K=3 median (%)"]["edge"] - 2.0) < 1e-9
    assert abs(figs["stitch"]["chained overhead, K=3 median (%)"]["embedded"] - 50.0) < 1e-9
    assert figs["serving"]["1.0/loose: best other (%)"]["edge"] == "2.0 (av-p)"
    assert abs(figs["serving"]["1.0/loose: sparseloom violations (%)"]["embedded"] - 10.0) < 1e-9
    assert figs["serving"]["overhead, decision (µs per unit)"] == {"edge": 42.0}
    assert "overhead, hand_off (µs per unit)" not in figs["serving"]
    assert "| chained overhead, K=3 median (%) | 2.00 | 50.00 |" in text
    assert str(tmp_path / "edge-estimators.json") in rep["missing"] and "missing:" in text
