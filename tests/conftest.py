from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ZOO = ROOT / "zoo"


@pytest.fixture(scope="session")
def synth_family(tmp_path_factory: pytest.TempPathFactory):
    from synth import synthetic_family

    return synthetic_family(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def synth_partition(synth_family, tmp_path_factory: pytest.TempPathFactory):
    from loom.model.cutting import partition_family

    # the partition folder and, beside it, the block store its blocks are written to
    return partition_family(synth_family, tmp_path_factory.mktemp("synthetic-part") / "part", k=3)


def zoo_tasks() -> list[str]:
    return sorted(p.parent.name for p in ZOO.glob("*/family.yaml"))
