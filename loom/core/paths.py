"""Where the embedded zoo lives."""

from __future__ import annotations

import os
from pathlib import Path

from loom.core.errors import ManifestError

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "family.yaml"  # the file that makes a folder a family


def default_zoo() -> Path:
    """``$SPARSELOOM_ZOO``, else the ``zoo/`` folder of the source checkout."""
    env = os.environ.get("SPARSELOOM_ZOO")
    zoo = Path(env) if env else REPO_ROOT / "zoo"
    if not zoo.is_dir():
        raise ManifestError(f"{zoo}: no zoo folder (set SPARSELOOM_ZOO or run scripts/build_zoo.py)")
    return zoo


def zoo_tasks(zoo: Path) -> list[str]:
    tasks = sorted(p.name for p in zoo.iterdir() if (p / MANIFEST).is_file())
    if not tasks:
        raise ManifestError(f"{zoo}: no family folders (each needs a {MANIFEST})")
    return tasks
