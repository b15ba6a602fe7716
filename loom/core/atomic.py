"""Writes that land whole or not at all: a temporary folder or file beside the target, renamed
into place only when the work that fills it succeeds (a failed command leaves nothing behind).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from loom.core.paths import MANIFEST


@contextmanager
def staged_folder(target: Path, *, link: Sequence[str] = ()) -> Iterator[Path]:
    """A fresh folder beside ``target`` to write into.

    ``link``: files of ``target`` (relative paths) that the work reads, hard-linked (or
    copied) into the stage first. On success every other file written there moves into
    ``target``, the manifest last (it is what makes the folder a family); the stage is
    removed either way.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".loom-tmp", dir=target.parent))
    try:
        for rel in link:
            dst = stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(target / rel, dst)
            except OSError:
                shutil.copy2(target / rel, dst)
        yield stage
        linked = {Path(r) for r in link}
        written = [p for p in stage.rglob("*") if p.is_file() and p.relative_to(stage) not in linked]
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(written, key=lambda p: p.name == MANIFEST):
            dst = target / path.relative_to(stage)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``; renamed onto ``target`` if the block succeeds, else removed."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.loom-tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
