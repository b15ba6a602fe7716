"""Staging a remote profiling job: the folder that travels to the target, and back.

``stage_job`` builds the job folder (the sparseloom source, the device profile, each
partition's blocks with a staged family, the dataset so far); ``pack``/``unpack`` make
it one tar file; ``rewrite_dataset`` renames partition refs between the two sides.
What travels and why: ``docs/profiling.md``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from loom.core.errors import ConfigError, ManifestError
from loom.core.paths import REPO_ROOT
from loom.core.schema import read_yaml
from loom.model.family import Family
from loom.model.partition import PARTITION_FILE, Partition
from loom.profiling.dataset import (
    BLOCKS_CSV,
    CONFIGS_CSV,
    META_JSON,
    ProfileDataError,
    partition_ref,
)

#: packages of the source shipped with every job
SOURCE_PACKAGES = ("loom", "backends", "estimators", "placement")
PLACEHOLDER = (
    "sparseloom remote profiling placeholder: this variant's ONNX file was not copied to the\n"
    "target (its blocks under staged/ hold the same weights). Not an ONNX model.\n"
)


# -- staging ----------------------------------------------------------------------------------------
@dataclass
class StagedJob:
    """A job folder built here, and how its partitions are named on either side."""

    root: Path
    #: partition ref on the target (``staged/<task>``) -> ref here (``partition_ref``)
    refs: dict[str, str] = field(default_factory=dict)
    #: staged partition folders, relative to the job root
    partitions: list[str] = field(default_factory=list)
    #: runs the dataset had when it was sent (the target's run is appended after them)
    runs_sent: int = 0
    files: int = 0
    bytes: int = 0


def _copy(src: Path, dst: Path, job: StagedJob) -> None:
    dst = Path(os.path.normpath(dst))
    if dst.is_file():  # a block of a store that two staged partitions share: named by its content
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    job.files += 1
    job.bytes += dst.stat().st_size


def _inside(rel: str, what: str) -> str:
    """A manifest's relative path that must stay inside its folder once staged."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        raise ConfigError(f"{what}: {rel!r} points outside its folder; remote profiling stages only the folder's files")
    return p.as_posix()


def _block_rel(rel: str, what: str) -> str:
    """A block file's path relative to its partition folder, which staging keeps: inside
    the folder, or inside a folder beside it (the block store ``loom partition`` writes)."""
    p = PurePosixPath(posixpath.normpath(rel))
    beside = len(p.parts) > 2 and p.parts[0] == ".." and ".." not in p.parts[1:]
    if p.is_absolute() or (".." in p.parts and not beside):
        raise ConfigError(f"{what}: {rel!r} points outside its folder and the folders beside it; "
                          "remote profiling stages only those")
    return p.as_posix()


def _beside(part: Partition) -> set[str]:
    """Folders beside the partition's that its blocks live in (its block store)."""
    parts = (PurePosixPath(posixpath.normpath(b.file)).parts for b in part.blocks.values())
    return {p[1] for p in parts if len(p) > 2 and p[0] == ".."}


def _external_data(path: Path) -> list[str]:
    """Files holding a block's external weights (relative to the block), which partition.yaml does not list."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found: set[str] = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    found.add(entry.value)
    return sorted(found)


def _stage_family(family: Family, dest: Path, job: StagedJob) -> None:
    """family.yaml as it is, its eval and calib data, and a placeholder per variant file."""
    m = family.manifest
    _copy(family.path, dest / "family.yaml", job)
    data_files = {_inside(m.eval_data.file, f"{family.path}: eval_data.file"),
                  _inside(m.calib_data.file, f"{family.path}: calib_data.file")}
    for rel in sorted(data_files):
        _copy(family.root / rel, dest / rel, job)
    for v in m.variants:
        rel = _inside(v.file, f"{family.path}: variants[{v.name}].file")
        if rel in data_files:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(PLACEHOLDER)


def _stage_partition(part: Partition, dest: Path, family_rel: str, job: StagedJob) -> None:
    """The blocks partition.yaml lists (and their external weights) at the same paths
    relative to the staged folder, and partition.yaml itself with its family pointing at
    the staged one."""
    dest.mkdir(parents=True, exist_ok=True)
    for bid, info in part.blocks.items():
        rel = _block_rel(info.file, f"{part.root / PARTITION_FILE}: blocks[{bid}].file")
        src = part.root / rel
        _copy(src, dest / rel, job)
        for extra in _external_data(src):
            extra_rel = (PurePosixPath(rel).parent / _inside(extra, f"{src}: external data")).as_posix()
            _copy(part.root / extra_rel, dest / extra_rel, job)
    data = read_yaml(part.root / PARTITION_FILE, ManifestError)
    data["family"] = family_rel
    (dest / PARTITION_FILE).write_text(yaml.safe_dump(data, sort_keys=False, width=120))


def _stage_source(dest: Path, job: StagedJob) -> None:
    for package in SOURCE_PACKAGES:
        for src in sorted((REPO_ROOT / package).rglob("*.py")):
            if "__pycache__" not in src.parts:
                _copy(src, dest / src.relative_to(REPO_ROOT), job)


def dataset_refs(folder: Path) -> set[str]:
    """The partition refs the rows of a dataset folder name (read as text, unchecked)."""
    refs: set[str] = set()
    for name in (BLOCKS_CSV, CONFIGS_CSV):
        path = folder / name
        if path.is_file():
            with path.open(newline="") as f:
                refs.update(row.get("partition", "") for row in csv.DictReader(f))
    return refs


def _rewrite_csv(path: Path, dst: Path, rename: Mapping[str, str]) -> None:
    """Copy one CSV of a dataset with its ``partition`` cells renamed; a torn last row dropped."""
    with path.open(newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):  # a row torn by a kill: dropped, as the profiler does
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = list(reader.fieldnames or [])
    rows = list(reader)
    with dst.open("w", newline="") as f:
        # the profiler's own writer is a default csv.DictWriter: same dialect here
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="raise")
        writer.writeheader()
        for n, row in enumerate(rows, start=1):
            if None in row:
                raise ProfileDataError(f"{path}: row {n} has more fields than the header")
            if row.get("partition") is not None:
                row["partition"] = rename.get(row["partition"], row["partition"])
            writer.writerow(row)


def rewrite_dataset(src: Path, dst: Path, rename: Mapping[str, str], *, annotate: dict[str, Any] | None = None,
                    runs_before: int = 0) -> None:
    """Copy a dataset folder, renaming partition refs in both CSVs and in meta.json.

    Only the ``partition`` cells change; every other cell is copied as text, so nothing
    is re-formatted. ``annotate``: added to each run after the first ``runs_before``.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for name in (BLOCKS_CSV, CONFIGS_CSV):
        if (src / name).is_file():
            _rewrite_csv(src / name, dst / name, rename)
    meta_path = src / META_JSON
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        parts = meta.get("partitions")
        if isinstance(parts, dict):
            meta["partitions"] = {task: rename.get(ref, ref) for task, ref in parts.items()}
        if annotate:
            for run in meta.get("runs", [])[runs_before:]:
                run.update(annotate)
        (dst / META_JSON).write_text(json.dumps(meta, indent=1, sort_keys=False))


def _staged_folder(existing: set[str], ours: set[str]) -> str:
    """``staged`` (or ``staged-N``): a name no other partition of the dataset's rows uses."""
    staged = "staged"
    n = 0
    while any(r == staged or r.startswith(staged + "/") for r in existing - ours):
        n += 1
        staged = f"staged-{n}"
    return staged


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``... the first not in ``taken`` (which it joins)."""
    out, i = name, 1
    while out in taken:
        i += 1
        out = f"{name}-{i}"
    taken.add(out)
    return out


def _stage_partitions(partitions: Sequence[Partition], dest: Path, staged: str, job: StagedJob) -> None:
    """Each partition under ``staged/<task>``, each distinct family once under ``families/``."""
    families: dict[Path, str] = {}
    # the block stores beside the partitions are staged beside them too: not a partition's name
    names: set[str] = set().union(*(_beside(p) for p in partitions))
    for part in partitions:
        family = part.family()
        key = family.path.resolve()
        if key not in families:
            fam_name = family.task if family.task not in families.values() else f"{family.task}-{len(families)}"
            families[key] = fam_name
            _stage_family(family, dest / "families" / fam_name, job)
        rel = f"{staged}/{_unique(part.task, names)}"
        _stage_partition(part, dest / rel, f"../../families/{families[key]}/family.yaml", job)
        job.partitions.append(rel)
        job.refs[rel] = partition_ref(part.root)


def stage_job(
    partitions: Sequence[Partition],
    device_path: Path,
    dest: Path,
    *,
    dataset: Path | None = None,
) -> StagedJob:
    """Build the job folder ``dest``: the source, ``device.yaml``, the staged partitions and
    families, and ``data/``. ``dataset``: the dataset measured so far, sent so that the
    target resumes it (None: start afresh)."""
    job = StagedJob(root=dest)
    dest.mkdir(parents=True)
    _stage_source(dest, job)
    _copy(device_path, dest / "device.yaml", job)
    existing = dataset_refs(dataset) if dataset is not None else set()
    # the staged folder's name must not be one that other rows of the dataset already use
    staged = _staged_folder(existing, {partition_ref(p.root) for p in partitions})
    _stage_partitions(partitions, dest, staged, job)
    if dataset is not None and any((dataset / n).is_file() for n in (META_JSON, BLOCKS_CSV, CONFIGS_CSV)):
        # sent as it is (rows without a meta.json too): the target applies the profiler's
        # own rules to it, refusals included
        to_remote = {local: remote for remote, local in job.refs.items()}
        rewrite_dataset(dataset, dest / "data", to_remote)
        if (dataset / META_JSON).is_file():
            job.runs_sent = len(json.loads((dataset / META_JSON).read_text()).get("runs", []))
    return job


def pack(folder: Path, tar_path: Path) -> None:
    """``folder`` as one tar file: one push to the target, not one per block."""
    # GNU format: the one every tar reads (GNU tar, busybox, Android's toybox)
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(folder, arcname=folder.name)


def unpack(tar_path: Path, dest: Path) -> None:
    """Extract a tar file under ``dest``, refusing links and paths out of it where Python can."""
    with tarfile.open(tar_path) as tar:
        if hasattr(tarfile, "data_filter"):  # refuse links and paths out of dest (Python >= 3.11.4)
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - older Pythons
            tar.extractall(dest)  # noqa: S202
