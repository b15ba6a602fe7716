"""scripts/bench_reliability.py through its functions: the whole catalogue (it takes seconds), a
2-second overload and a 3-second soak on configs/serve.yaml, the JSON's shape and the outcomes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_reliability as bench  # noqa: E402
from reliability_cases import catalogue  # noqa: E402

pytestmark = pytest.mark.slow

#: cases that expose a bug outside the benchmark's files (reported; see the benchmark's report)
KNOWN: dict[str, str] = {}
BAD = ("generic_error", "hang", "crash", "silent_wrong")


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return bench.run_catalogue(progress=False)


def test_the_catalogue_is_large_and_covers_every_category(rows: list[dict[str, Any]]) -> None:
    assert len(rows) >= 60
    assert {r["category"] for r in rows} == {"models", "manifests", "slo_configs", "requests", "artifacts",
                                             "backends"}
    for r in rows:
        assert set(r) >= {"name", "category", "outcome", "seconds"} and r["outcome"] in bench.OUTCOMES
    assert len({r["name"] for r in rows}) == len(rows)
    assert "all" in bench.table(rows)


def test_no_case_is_untyped_hung_crashed_or_silently_wrong(rows: list[dict[str, Any]]) -> None:
    bad = {r["name"]: r["message"] for r in rows if r["outcome"] in BAD and r["name"] not in KNOWN}
    assert not bad, json.dumps(bad, indent=1)


def test_a_hang_and_a_crash_are_told_apart() -> None:
    import os
    import signal
    import time

    from reliability_cases import Case

    hang = bench.run_case(Case("sleeps", "test", lambda t: time.sleep(30), timeout_s=1.0))
    crash = bench.run_case(Case("dies", "test", lambda t: os.kill(os.getpid(), signal.SIGSEGV)))
    assert (hang["outcome"], crash["outcome"]) == ("hang", "crash")
    assert hang["seconds"] < 5 and "11" in crash["message"]


def test_a_short_overload_and_soak(tmp_path: Path) -> None:
    from loom.app.deployment import Deployment

    dep = Deployment.from_config(ROOT / "configs" / "serve.yaml")
    over = bench.overload(dep, capacity_rps=bench.CAPACITY_RPS, load=3.0, duration_s=2.0)
    assert set(over) >= {"offered_x_capacity", "duration_s", "submitted", "resolved", "max_queue", "peak_rss_mb",
                         "accepted_p99_ms"}
    assert over["submitted"] > 0 and over["resolved"] == over["submitted"]
    soak = bench.soak(dep, duration_s=3.0, budget_mb=8.0, slo_period_s=1.0)
    assert set(soak) >= {"duration_s", "rss_start_mb", "rss_end_mb", "threads_start", "threads_end", "fds_start",
                         "fds_end", "requests", "lost"}
    assert soak["requests"] > 0 and soak["lost"] == 0
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"cases": [], "overload": over, "soak": soak}))
    assert json.loads(out.read_text())["soak"]["lost"] == 0
    assert len(catalogue()) >= 60
