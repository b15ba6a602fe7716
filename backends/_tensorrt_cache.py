"""The TensorRT engine cache: a plan's key, the block content it hashes, whole-file writes.

A serialized plan runs only with the TensorRT version and GPU that built it, so its
key hashes those with the block's bytes and every build option.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx

from backends.base import ModelSource
from loom.core.errors import BackendUnavailableError

#: bump when the engine cache key's fields or the plan files' meaning change
ENGINE_CACHE_SCHEMA = 1


def engine_cache_key(
    *,
    model_sha256: str,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    fp16: bool,
    int8: bool,
    dla_core: int | None,
    workspace_mb: int | None,
    batch: tuple[int, int, int],
) -> str:
    """The name of a block's plan in the engine cache: a hash of everything the plan
    depends on. A serialized engine runs only with the TensorRT version and on the GPU
    model (compute capability) that built it, and its kernels depend on the precision,
    DLA, workspace and shape-range options, so each of those changes the key."""
    fields = {
        "schema": ENGINE_CACHE_SCHEMA,
        "model_sha256": model_sha256,
        "tensorrt": trt_version,
        "gpu": gpu_name,
        "compute_capability": compute_capability,
        "fp16": bool(fp16),
        "int8": bool(int8),
        "dla_core": dla_core,
        "workspace_mb": workspace_mb,
        "batch": list(batch),
    }
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def content_sha256(src: ModelSource) -> str:
    """SHA-256 of a block's bytes, external weight files included (they change the plan
    as much as the graph does). Files are read in chunks: blocks can be large."""
    digest = hashlib.sha256()
    if isinstance(src.data, bytes):
        digest.update(src.data)
        return digest.hexdigest()
    path = Path(src.data)
    _hash_file(digest, path)
    seen: set[str] = set()
    for init in src.proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in init.external_data if e.key == "location"), None)
        if location and location not in seen:
            seen.add(location)
            digest.update(location.encode())
            extra = path.parent / location
            if extra.is_file():
                _hash_file(digest, extra)
    return digest.hexdigest()


def _hash_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)


def atomic_write(path: Path, data: bytes) -> None:
    """Write whole or not at all: a reader never sees half a plan, two writers the last one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def make_folder(folder: Path, option: str) -> None:
    """Make a cache folder (parents too) when the backend is made, or say why it cannot be:
    a profile naming ``/var/cache/sparseloom/...`` must fail at construction with the
    option's name, not at the first block's build with a bare ``PermissionError``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        why = "" if os.access(folder, os.W_OK | os.X_OK) else "it exists but this user cannot write to it"
    except OSError as exc:
        why = f"cannot be made: {type(exc).__name__}: {exc.strerror or exc}"
    if why:
        raise BackendUnavailableError(
            f"tensorrt: {option} {folder}: {why}; make it writable for this user "
            f"(sudo install -d -o $USER {folder}) or point {option} at a folder under ~/.cache"
        )
