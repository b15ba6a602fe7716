"""The demo end to end on one task of the embedded zoo, sampled small: what demo.json promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loom.app.demo import run_demo


@pytest.mark.slow
def test_demo_reports_zoo_samples_and_measured_configs(tmp_path: Path) -> None:
    report = run_demo("embedded", tmp_path, tasks=["signal-cls"], max_configs=14, sample=14, repeats=2,
                      eval_limit=40, show=False)
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["zoo"] == report["zoo"] == "embedded"
    (task,) = saved["tasks"]
    assert task["evaluation_samples"] == 40
    assert task["configs_measured"] == 14 and not task["exhaustive"] and "sample" in task["sample"]
    assert all(row["measured"] is True for row in task["configs"])
    originals = {v["name"] for v in task["variants"]}
    assert {tuple(r["config"]) for r in task["configs"] if not r["stitched"]} == {(v,) * task["k"] for v in originals}
    assert (tmp_path / task["plot"]).is_file()
