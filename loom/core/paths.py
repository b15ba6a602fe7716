"""Where the zoos live: the embedded one (committed, the tests' fixture) and the edge zoo
(published pretrained networks, built into ``out/zoo/edge`` by ``make zoo-edge``)."""

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


#: zoo names ``resolve_zoo`` knows, with the folder each stands for
ZOOS = {"embedded": REPO_ROOT / "zoo", "edge": REPO_ROOT / "out" / "zoo" / "edge"}
BUILD_HINT = {"edge": "make zoo-edge (or python scripts/build_edge_zoo.py --out out/zoo/edge)"}


def _named_folder(name: str) -> Path:
    """The folder a zoo name stands for (``$SPARSELOOM_EDGE_ZOO`` overrides the edge zoo's)."""
    return Path(os.environ.get("SPARSELOOM_EDGE_ZOO", ZOOS[name])) if name == "edge" else ZOOS[name]


def resolve_zoo(zoo: str | Path | None) -> Path:
    """A zoo by name (``embedded``, ``edge``) or folder; None means ``default_zoo()``.

    ``$SPARSELOOM_EDGE_ZOO`` overrides the edge zoo's folder. A named zoo that is not
    built yet raises a ``ManifestError`` that says how to build it.
    """
    if zoo is None:
        return default_zoo()
    name = str(zoo)
    if name in ZOOS:
        folder = _named_folder(name)
        if not folder.is_dir() or not any((p / MANIFEST).is_file() for p in folder.iterdir()):
            hint = BUILD_HINT.get(name, "")
            raise ManifestError(f"{folder}: the {name} zoo is not built" + (f" (run {hint})" if hint else ""))
        return folder
    return Path(zoo)


def zoo_name(zoo: Path) -> str:
    """The zoo's name when it is one of ``ZOOS``, else its folder as given."""
    return next((name for name in ZOOS if zoo.resolve() == _named_folder(name).resolve()), str(zoo))


def zoo_tasks(zoo: Path) -> list[str]:
    tasks = sorted(p.name for p in zoo.iterdir() if (p / MANIFEST).is_file())
    if not tasks:
        raise ManifestError(f"{zoo}: no family folders (each needs a {MANIFEST})")
    return tasks
