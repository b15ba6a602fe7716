"""The TVM backend's disk cache of compiled blocks: keys, entries, whole-file writes.

An entry is a shared library (``<key>.so``) plus a JSON meta file written after it; the
key hashes the block's bytes, TVM's version, the target, the machine and every option
that changes the compiled code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from backends.base import ModelSource

#: bump when what a cache entry holds changes, so that old entries are not reused
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$SPARSELOOM_TVM_CACHE``, else ``$XDG_CACHE_HOME/sparseloom/tvm`` (``~/.cache/...``)."""
    env = os.environ.get("SPARSELOOM_TVM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparseloom" / "tvm"


def cache_key(
    block_hash: str, *, tvm_version: str, target_text: str, kind: str, options: Mapping[str, Any]
) -> str:
    """The name of a block's entry: its hash, the target kind and a hash of the rest."""
    fingerprint = json.dumps(
        {
            "format": CACHE_FORMAT,
            "tvm": tvm_version,
            "target": target_text,
            "machine": platform.machine(),
            **options,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return f"{block_hash[:24]}-{kind}-{digest}"


def block_hash(src: ModelSource) -> str:
    """SHA-256 of the block's ONNX bytes (and of its external weights, when it has some)."""
    digest = hashlib.sha256()
    if isinstance(src.data, str):
        path = Path(src.data)
        digest.update(path.read_bytes())
        for t in src.proto.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                location = next((e.value for e in t.external_data if e.key == "location"), None)
                if location and (path.parent / location).is_file():
                    digest.update((path.parent / location).read_bytes())
    else:
        digest.update(src.data)
    return digest.hexdigest()


def cache_entry_ok(library: Path, key: str) -> bool:
    """A complete entry: the library and its meta (written last), for this key and format."""
    meta = read_meta(library.with_suffix(".json"))
    return library.is_file() and meta.get("key") == key and meta.get("format") == CACHE_FORMAT


def read_meta(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def export(executable: Any, library: Path, meta: dict[str, Any]) -> None:
    """Write the library, then its meta, each by atomic rename: a reader never sees half an
    entry, and two processes compiling the same block both write whole files."""
    tmp = library.with_name(f".{library.name}.{os.getpid()}.{threading.get_ident()}.tmp.so")
    try:
        executable.export_library(str(tmp))
        os.replace(tmp, library)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    meta_path = library.with_suffix(".json")
    tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp_meta, meta_path)
