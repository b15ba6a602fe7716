"""A profile dataset on disk: ``blocks.csv``, ``configs.csv`` and ``meta.json``.

The column schemas, reading and validating a dataset (``load_profile_dataset``, every
problem named by file, row and column), and the writers the profiler appends rows with,
one flushed row at a time. The format is described in ``docs/profiling.md``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from loom.core.errors import ConfigError
from loom.core.paths import REPO_ROOT
from loom.core.progress import say
from loom.core.schema import check_fields, read_json

FORMAT_VERSION = 1
BLOCKS_CSV = "blocks.csv"
CONFIGS_CSV = "configs.csv"
META_JSON = "meta.json"
STATUSES = ("ok", "unsupported", "error")


class ProfileDataError(ConfigError):
    """A profile dataset (CSV or meta.json) is malformed. Names the file, row and column."""


# -- columns -------------------------------------------------------------------------------
#: column -> type: str, int, float; "?" suffix: may be empty (unsupported or failed rows)
BLOCK_COLUMNS: dict[str, str] = {
    "fingerprint": "str",
    "task": "str",
    "partition": "str",  # partition folder, relative to the repository root when inside it
    "block_id": "str",
    "block_file": "str",  # relative to the partition folder
    "slot": "int",
    "variants": "str",  # ";"-joined variants that have this block
    "precision": "str",
    "macs": "int",
    "processor": "str",
    "backend": "str",
    "status": "str",
    "unsupported_ops": "str",  # ";"-joined
    "error": "str",
    "latency_ms_median": "float?",
    "latency_ms_p90": "float?",
    "latency_ms_min": "float?",
    "latency_ms_std": "float?",
    "repeats": "int?",
    "warmup": "int?",
    "load_ms": "float?",
    "memory_bytes": "int?",
    "size_bytes": "int",
    "input_bytes": "int?",
    "output_bytes": "int?",
    "measured_at": "str",
}
CONFIG_COLUMNS: dict[str, str] = {
    "fingerprint": "str",
    "task": "str",
    "partition": "str",
    "config": "str",  # ";"-joined variant per slot
    "placement": "str",  # ";"-joined processor per slot
    "block_ids": "str",
    "status": "str",
    "error": "str",
    "measured_ms_median": "float?",
    "measured_ms_p90": "float?",
    "measured_ms_min": "float?",
    "repeats": "int?",
    "sum_blocks_ms": "float?",
    "transfer_bytes": "int?",
    "n_transfers": "int?",
    "transfers": "str",  # ";"-joined src>dst@slot=bytes
    "measured_at": "str",
}


# -- partition references ------------------------------------------------------------------
def partition_ref(root: Path) -> str:
    """How rows name a partition: relative to the repository when inside it (portable)."""
    root = Path(root).resolve()
    try:
        return root.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(root)


def resolve_partition_ref(ref: str) -> Path:
    """The partition folder a row's ``partition`` cell names."""
    path = Path(ref)
    return path if path.is_absolute() else REPO_ROOT / path


# -- reading -------------------------------------------------------------------------------
@dataclass
class ProfileDataset:
    """A loaded profile dataset: typed rows (dicts) plus ``meta.json``."""

    root: Path
    meta: dict[str, Any]
    blocks: list[dict[str, Any]]
    configs: list[dict[str, Any]]

    def column(self, name: str, *, table: str = "blocks", status: str | None = "ok") -> np.ndarray:
        """One column as an array (floats with NaN for empty cells), rows of ``status`` only."""
        rows = self.blocks if table == "blocks" else self.configs
        kind = (BLOCK_COLUMNS if table == "blocks" else CONFIG_COLUMNS)[name]
        values = [r[name] for r in rows if status is None or r["status"] == status]
        if kind.startswith(("int", "float")):
            return np.array([np.nan if v is None else v for v in values], dtype=float)
        return np.array(values, dtype=object)

    def block_latency(self, *, fingerprint: str | None = None) -> dict[tuple[str, str, str], float]:
        """(partition, block_id, processor) -> median latency (ms) of the ``ok`` rows."""
        return {
            (r["partition"], r["block_id"], r["processor"]): r["latency_ms_median"]
            for r in self.blocks
            if r["status"] == "ok" and (fingerprint is None or r["fingerprint"] == fingerprint)
        }

    def partition_dir(self, row: dict[str, Any]) -> Path:
        return resolve_partition_ref(row["partition"])

    def block_path(self, row: dict[str, Any]) -> Path:
        return self.partition_dir(row) / row["block_file"]


def _parse_value(kind: str, text: str | None) -> Any:
    optional = kind.endswith("?")
    base = kind.rstrip("?")
    if text is None:
        raise ValueError("missing (the row has fewer fields than the header)")
    if base == "str":
        return text
    if text == "":
        if optional:
            return None
        raise ValueError("empty, a number is required")
    if base == "int":
        return int(text)
    value = float(text)
    if math.isnan(value):
        raise ValueError("NaN: leave the cell empty instead")
    return value


def _parse_row(raw: dict[str | None, Any], header: list[str], columns: dict[str, str], where: str) -> dict[str, Any]:
    """One CSV row typed by ``columns`` and checked; ``ProfileDataError`` prefixed by ``where``."""
    if None in raw:
        raise ProfileDataError(f"{where}: {len(header) + len(raw[None])} fields, the header has {len(header)}")
    row: dict[str, Any] = {}
    for col, kind in columns.items():
        try:
            row[col] = _parse_value(kind, raw.get(col))
        except ValueError as exc:
            raise ProfileDataError(f"{where}, column {col!r}: {exc} (got {raw.get(col)!r})") from None
    for col in header:  # columns a later version added: kept as text
        row.setdefault(col, raw[col])
    problem = _row_problem(row, columns)
    if problem:
        col, why = problem
        raise ProfileDataError(f"{where}, column {col!r}: {why} (got {raw.get(col)!r})")
    return row


def _read_rows(path: Path, columns: dict[str, str]) -> list[dict[str, Any]]:
    """Typed rows of a profile CSV; ``ProfileDataError`` naming the file, row and column."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = list(reader.fieldnames or [])
            missing = [c for c in columns if c not in header]
            if missing:
                raise ProfileDataError(f"{path}: header lacks column(s) {missing}")
            return [_parse_row(raw, header, columns, f"{path}: row {n} (line {reader.line_num})")
                    for n, raw in enumerate(reader, start=1)]
        except (UnicodeDecodeError, csv.Error) as exc:  # a binary or corrupted file
            raise ProfileDataError(f"{path}: line {reader.line_num + 1}: not readable CSV text: {exc}") from None


def _row_problem(row: dict[str, Any], columns: dict[str, str]) -> tuple[str, str] | None:
    if row["status"] not in STATUSES:
        return "status", f"must be one of {list(STATUSES)}"
    timed = ("latency_ms_median", "latency_ms_p90", "latency_ms_min") if "latency_ms_median" in columns else (
        "measured_ms_median", "measured_ms_p90", "measured_ms_min")
    if row["status"] == "ok":
        for col in timed:
            if row[col] is None:
                return col, "empty on an ok row"
            if row[col] < 0:
                return col, "negative time"
        median, p90, low = (row[c] for c in timed)
        if not low <= median * (1 + 1e-9):
            return timed[2], f"expected min <= median <= p90, got {low}, {median}, {p90}"
        if not median <= p90 * (1 + 1e-9):
            return timed[1], f"expected min <= median <= p90, got {low}, {median}, {p90}"
    return None


#: fields of ``meta.json`` that sparseloom reads, and their JSON types (each may be absent)
META_FIELDS: dict[str, type] = {"fingerprints": dict, "fingerprint": dict, "fingerprint_id": str, "runs": list,
                                "partitions": dict, "link_calibration": dict, "device": str}


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` parsed; ``ProfileDataError`` naming the file (and field) when it is not JSON,
    not an object, or a field sparseloom reads has another type."""
    meta = read_json(path, ProfileDataError)
    check_fields(meta, META_FIELDS, source=str(path), error=ProfileDataError)
    for i, run in enumerate(meta.get("runs", [])):
        check_fields({f"runs[{i}]": run}, {f"runs[{i}]": dict}, source=str(path), error=ProfileDataError)
    return meta


def load_profile_dataset_rows(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The typed block and config rows of a dataset folder, without its ``meta.json``."""
    return _read_rows(out / BLOCKS_CSV, BLOCK_COLUMNS), _read_rows(out / CONFIGS_CSV, CONFIG_COLUMNS)


def load_profile_dataset(root: str | Path) -> ProfileDataset:
    """Read and validate a profile dataset folder (``blocks.csv``, ``configs.csv``, ``meta.json``)."""
    root = Path(root)
    meta_path = root / META_JSON
    if not meta_path.is_file():
        raise ProfileDataError(f"{meta_path}: no such file (is {root} a profile dataset? run `loom profile`)")
    meta = read_meta(meta_path)
    for key in ("format", "fingerprints"):
        if key not in meta:
            raise ProfileDataError(f"{meta_path}: no {key!r}")
    if meta["format"] != FORMAT_VERSION:
        raise ProfileDataError(f"{meta_path}: format {meta['format']!r}, this sparseloom reads {FORMAT_VERSION}")
    blocks, configs = load_profile_dataset_rows(root)
    for name, rows in ((BLOCKS_CSV, blocks), (CONFIGS_CSV, configs)):
        for n, row in enumerate(rows, start=1):
            if row["fingerprint"] not in meta["fingerprints"]:
                raise ProfileDataError(
                    f"{root / name}: row {n}, column 'fingerprint': {row['fingerprint']!r} is not in {META_JSON}"
                )
    return ProfileDataset(root, meta, blocks, configs)


# -- writing -------------------------------------------------------------------------------
class RowWriter:
    """Appends rows to a CSV and flushes each one: a kill loses at most the row being written."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        fresh = not path.is_file() or path.stat().st_size == 0
        if not fresh:
            drop_partial_line(path)
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
            if header != self.columns:
                raise ProfileDataError(
                    f"{path}: its columns {header} are not this version's {self.columns}; "
                    f"profile into another folder"
                )
        self._file = path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="raise")
        if fresh:
            self._writer.writeheader()
            self._file.flush()

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow({c: _cell(row.get(c)) for c in self.columns})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e-3 and value != 0 else round(value, 6)
    return value


def drop_partial_line(path: Path) -> None:
    """An interrupted write leaves a line without its newline: drop it, it is re-measured."""
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        cut = data.rfind(b"\n") + 1
        f.truncate(cut)
        say(f"{path}: dropped an incomplete last row (an interrupted run); it is measured again")


def utc_now() -> str:
    """The time as rows (``measured_at``) and runs record it: ISO 8601, UTC, in seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` atomically: a kill never leaves half of one."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=False))
    tmp.replace(path)
