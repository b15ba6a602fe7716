"""The block store: every block of every task on disk once, keyed by the sha256 of its bytes.

    <root>/blocks/<sha256>.onnx     one file per distinct content
    <root>/index.json               block -> file, size, ports, users; task -> variants

``loom partition`` writes blocks here (``put_model``) and the partition names them by
that key; serving reads the same files (``read``), hashing the bytes of every load
against its key. Every (task, variant, slot) using a block is one of its users, so a
config's blocks (``blocks_of``) and the blocks shared across variants or tasks
(``shared_blocks``) are known.
One process writes a store at a time; its threads may share a ``BlockStore``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from pydantic import BaseModel, ConfigDict, Field

from loom.core.errors import BlockIntegrityError, ManifestError
from loom.core.onnxutil import MAX_IR_VERSION
from loom.core.schema import Strict, read_json, validate
from loom.model.partition import BlockInfo, Partition

INDEX_FILE = "index.json"
BLOCKS_DIR = "blocks"
INDEX_FORMAT = 1

#: (task, variant, slot): one use of a block
User = tuple[str, str, int]


def model_bytes(model: onnx.ModelProto) -> bytes:
    """The bytes a block is stored as: its deterministic serialization, at an IR onnxruntime reads."""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model.SerializeToString(deterministic=True)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks (blocks can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class StoredBlock:
    """One distinct block in the store (``users``: every (task, variant, slot) using it)."""

    id: str
    sha256: str
    file: str
    size_bytes: int
    slot: int
    inputs: list[str]
    outputs: list[str]
    macs: int
    precision: str
    users: list[User]

    def to_json(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "file": self.file,
            "size_bytes": self.size_bytes,
            "slot": self.slot,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "macs": self.macs,
            "precision": self.precision,
            "users": [list(u) for u in self.users],
        }

    @classmethod
    def from_json(cls, block_id: str, data: dict[str, Any]) -> StoredBlock:
        return cls(
            id=block_id,
            sha256=data["sha256"],
            file=data["file"],
            size_bytes=int(data["size_bytes"]),
            slot=int(data["slot"]),
            inputs=list(data["inputs"]),
            outputs=list(data["outputs"]),
            macs=int(data["macs"]),
            precision=data["precision"],
            users=[(str(t), str(v), int(s)) for t, v, s in data["users"]],
        )


class _IndexBlock(Strict):
    """A block as ``index.json`` records it (the schema a loaded index is checked against)."""

    sha256: str
    file: str = Field(pattern=r"^blocks/[^/\\]+\.onnx$")  # inside the store: ``prune`` deletes it
    size_bytes: int = Field(ge=0)
    slot: int = Field(ge=0)
    inputs: list[str]
    outputs: list[str]
    macs: int
    precision: str
    users: list[tuple[str, str, int]]


class _IndexTask(BaseModel):
    """A task as ``index.json`` records it (its other keys are kept as they are)."""

    model_config = ConfigDict(extra="allow")
    k: int = Field(ge=1)
    cuts: list[list[str]]
    family: str
    slot_macs_share: list[float] = Field(default_factory=list)
    variants: dict[str, list[str]]


class _Index(Strict):
    format: int
    blocks: dict[str, _IndexBlock]
    aliases: dict[str, str] = Field(default_factory=dict)
    tasks: dict[str, _IndexTask]


def _index_problems(index: _Index) -> list[str]:
    """Block ids that the tasks and aliases of a schema-valid index name but it lacks."""
    problems = [f"aliases.{a}: block {b!r} is not in blocks" for a, b in index.aliases.items() if b not in index.blocks]
    for task, t in index.tasks.items():
        for variant, ids in t.variants.items():
            if len(ids) != t.k:
                problems.append(f"tasks.{task}.variants.{variant}: {len(ids)} block(s) for k={t.k}")
            problems += [f"tasks.{task}.variants.{variant}[{slot}]: block {bid!r} is not in blocks"
                         for slot, bid in enumerate(ids) if bid not in index.blocks]
    return problems


class BlockStore:
    """Blocks of many partitions, each distinct content stored and verified once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        (self.root / BLOCKS_DIR).mkdir(parents=True, exist_ok=True)
        self.blocks: dict[str, StoredBlock] = {}
        #: another id of the same content -> the id it is stored under
        self.aliases: dict[str, str] = {}
        #: task -> {"k", "cuts", "family", "variants": {variant: [block ids]}}
        self.tasks: dict[str, dict[str, Any]] = {}
        self._verified: set[str] = set()
        self._lock = threading.RLock()
        if self.index_path.is_file():
            self._load_index()

    # -- index ---------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.root / INDEX_FILE

    def _load_index(self) -> None:
        """Read ``index.json``; ``ManifestError`` naming it (and the field) when it is not a valid index."""
        data = read_json(self.index_path, ManifestError)
        if data.get("format") != INDEX_FORMAT:
            raise ManifestError(
                f"{self.index_path}: block store index format {data.get('format')!r}, "
                f"this sparseloom reads {INDEX_FORMAT}"
            )
        source = f"{self.index_path}: malformed block store index"
        index = validate(_Index, data, source=source, error=ManifestError)
        problems = _index_problems(index)
        if problems:
            raise ManifestError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
        self.blocks = {bid: StoredBlock.from_json(bid, b.model_dump()) for bid, b in index.blocks.items()}
        self.aliases = dict(index.aliases)
        self.tasks = {name: t.model_dump() for name, t in index.tasks.items()}

    def save(self) -> Path:
        """Write the index (atomically: a crash mid-write leaves the previous index)."""
        with self._lock:
            data = {
                "format": INDEX_FORMAT,
                "blocks": {bid: b.to_json() for bid, b in sorted(self.blocks.items())},
                "aliases": dict(sorted(self.aliases.items())),
                "tasks": self.tasks,
            }
            tmp = self.index_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.index_path)
            return self.index_path

    # -- adding ----------------------------------------------------------------------------
    def put_model(self, model: onnx.ModelProto) -> tuple[str, Path]:
        """Write a block (unless its content is here already); returns its id and file.

        Users are recorded by ``add_partition`` once the partition is complete.
        """
        data = model_bytes(model)
        bid = hashlib.sha256(data).hexdigest()
        path = self.root / BLOCKS_DIR / f"{bid}.onnx"
        with self._lock:
            if bid not in self._verified or not path.is_file():
                tmp = path.with_suffix(f".onnx.{os.getpid()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
                self._verified.add(bid)
        return bid, path

    def add_partition(self, partition: Partition, *, task: str | None = None, link: bool = True) -> int:
        """Add every block of ``partition`` under ``task`` (default: the partition's task).

        New contents are hard-linked into the store (copied where a link is impossible,
        e.g. across file systems; ``link=False`` always copies: a hard link shares the
        partition's file, so an edit there is an edit here, which ``path`` would catch).
        Adding a task again replaces its users. Returns how many blocks were new.
        """
        task = task or partition.task
        with self._lock:
            self._drop_users(task)
            new = 0
            by_sha = {b.sha256: bid for bid, b in self.blocks.items()}
            canonical: dict[str, str] = {}  # partition id -> id in the store
            for pid, info in partition.blocks.items():
                src = partition.block_path(pid)
                own = src.resolve() == (self.root / BLOCKS_DIR / f"{pid}.onnx").resolve()
                sha = pid if own and pid in self._verified else self._checked_sha(pid, src)
                bid = sha if sha in self.blocks else by_sha.get(sha)
                if bid is None and pid in self.blocks:
                    # same id, other bytes: one id cannot name two contents
                    raise BlockIntegrityError(
                        f"block {pid}: {src} (sha256 {sha}) differs from the stored "
                        f"{self.root / self.blocks[pid].file} (sha256 {self.blocks[pid].sha256})"
                    )
                if bid is None:
                    bid = sha
                    if not own:
                        self._store_file(src, bid, link=link)
                    self.blocks[bid] = _stored(bid, sha, info, src.stat().st_size)
                    by_sha[sha] = bid
                    self._verified.add(bid)  # just hashed or written it
                    new += 1
                if pid != bid:
                    self.aliases[pid] = bid
                canonical[pid] = bid
            variants = {}
            for variant, ids in partition.variants.items():
                variants[variant] = [canonical[i] for i in ids]
                for slot, bid in enumerate(variants[variant]):
                    user = (task, variant, slot)
                    if user not in self.blocks[bid].users:
                        self.blocks[bid].users.append(user)
            family = (partition.root / partition.family_path).resolve()
            self.tasks[task] = {
                "k": partition.k,
                "cuts": partition.cuts,
                "family": os.path.relpath(family, self.root.resolve()),
                "slot_macs_share": list(partition.slot_macs_share),
                "variants": variants,
            }
            self.save()
            return new

    def _checked_sha(self, pid: str, src: Path) -> str:
        """Full sha256 of a partition's block file, refusing a file that is not block ``pid``.

        A block's id is the sha256 of its file (older partitions: a 20-hex prefix of it).
        A file written otherwise is parsed and its deterministic serialization hashed.
        """
        if not src.is_file():
            raise BlockIntegrityError(f"block {pid}: its file {src} is missing")
        sha = file_sha256(src)
        if sha.startswith(pid):
            return sha
        try:
            rehashed = hashlib.sha256(model_bytes(onnx.load(str(src), load_external_data=False))).hexdigest()
        except Exception as exc:  # not even an ONNX model
            raise BlockIntegrityError(f"block {pid}: {src} is not a readable ONNX model: {exc}") from exc
        if not rehashed.startswith(pid):
            raise BlockIntegrityError(f"block {pid}: {src} hashes to {rehashed}, not to its id")
        return sha

    def _store_file(self, src: Path, bid: str, *, link: bool) -> None:
        dst = self.root / BLOCKS_DIR / f"{bid}.onnx"
        if dst.exists():  # left by an earlier, interrupted add: replace, it is unverified
            dst.unlink()
        if link:
            try:
                os.link(src, dst)
                return
            except OSError:  # another file system, or links not allowed: copy
                pass
        tmp = dst.with_suffix(".onnx.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)

    def _drop_users(self, task: str) -> None:
        for b in self.blocks.values():
            b.users = [u for u in b.users if u[0] != task]
        self.tasks.pop(task, None)

    def remove_task(self, task: str) -> None:
        """Forget a task's users (its blocks stay on disk until ``prune``)."""
        with self._lock:
            if task not in self.tasks:
                raise ManifestError(f"{self.index_path}: no task {task!r} (have {sorted(self.tasks)})")
            self._drop_users(task)
            self.save()

    def prune(self) -> int:
        """Delete the blocks no task uses any more; returns how many."""
        with self._lock:
            unused = [bid for bid, b in self.blocks.items() if not b.users]
            for bid in unused:
                (self.root / self.blocks.pop(bid).file).unlink(missing_ok=True)
                self._verified.discard(bid)
            self.aliases = {a: b for a, b in self.aliases.items() if b in self.blocks}
            self.save()
            return len(unused)

    # -- reading ---------------------------------------------------------------------------
    def resolve(self, block_id: str) -> str:
        """The id a block is stored under (an alias resolved); ``ManifestError`` if unknown."""
        bid = self.aliases.get(block_id, block_id)
        if bid not in self.blocks:
            raise ManifestError(f"{self.index_path}: no block {block_id!r} in the store")
        return bid

    def has(self, block_id: str) -> bool:
        """Whether the store holds ``block_id`` (under its own id or as an alias)."""
        return self.aliases.get(block_id, block_id) in self.blocks

    def block(self, block_id: str) -> StoredBlock:
        return self.blocks[self.resolve(block_id)]

    def file(self, block_id: str) -> Path:
        """The block's file in the store, unchecked (``read`` checks what it reads)."""
        return self.root / self.block(block_id).file

    def _check(self, bid: str, path: Path, got: str) -> None:
        """``BlockIntegrityError`` unless ``got`` (a sha256 of the file's bytes) is the block's."""
        want = self.blocks[bid].sha256
        if got != want:
            with self._lock:
                self._verified.discard(bid)
            raise BlockIntegrityError(
                f"block {bid}: {path} has sha256 {got}, the store recorded {want} (the file was changed or corrupted)"
            )

    def read(self, block_id: str) -> bytes:
        """The block's bytes, read once and checked against its sha256 on every call.

        What serving loads: the bytes handed to the engine are the bytes hashed, so a
        file changed at any time before a load (even after an earlier load of it) fails
        that load with ``BlockIntegrityError`` naming the block and its file.
        """
        bid = self.resolve(block_id)
        path = self.root / self.blocks[bid].file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlockIntegrityError(f"block {bid}: its file {path} is missing") from None
        except OSError as exc:
            raise BlockIntegrityError(f"block {bid}: cannot read its file {path}: {exc}") from exc
        self._check(bid, path, hashlib.sha256(data).hexdigest())
        return data

    def path(self, block_id: str, *, recheck: bool = False) -> Path:
        """The block's file, its bytes checked against the recorded sha256 on first use.

        For readers that open the file themselves (``partition``'s users). ``recheck``
        hashes it again even if it was verified before (a file edited after its first
        use is not noticed otherwise). Serving loads through ``read``, which checks
        the bytes it returns every time.
        """
        bid = self.resolve(block_id)
        path = self.root / self.blocks[bid].file
        with self._lock:
            if bid in self._verified and not recheck:
                return path
        if not path.is_file():
            raise BlockIntegrityError(f"block {bid}: its file {path} is missing")
        self._check(bid, path, file_sha256(path))
        with self._lock:
            self._verified.add(bid)
        return path

    def size(self, block_id: str) -> int:
        return self.block(block_id).size_bytes

    def users(self, block_id: str) -> list[User]:
        return list(self.block(block_id).users)

    def task_names(self) -> list[str]:
        return sorted(self.tasks)

    def _task(self, task: str) -> dict[str, Any]:
        try:
            return self.tasks[task]
        except KeyError:
            raise ManifestError(f"{self.index_path}: no task {task!r} (have {sorted(self.tasks)})") from None

    def blocks_of(self, task: str, config: Sequence[str]) -> list[str]:
        """The block ids of a config (one variant name per slot), in slot order."""
        t = self._task(task)
        config = list(config)
        if len(config) != t["k"]:
            raise ManifestError(f"config {config} has {len(config)} slot(s); task {task!r} has {t['k']}")
        unknown = sorted({v for v in config if v not in t["variants"]})
        if unknown:
            raise ManifestError(
                f"config {config}: unknown variant(s) {unknown} of task {task!r} (have {sorted(t['variants'])})"
            )
        return [t["variants"][v][s] for s, v in enumerate(config)]

    def shared_blocks(self) -> dict[str, list[User]]:
        """Blocks used by more than one variant or task (a slot of a variant is one use)."""
        return {
            bid: list(b.users)
            for bid, b in sorted(self.blocks.items())
            if len({(t, v) for t, v, _ in b.users}) > 1
        }

    def stats(self) -> dict[str, int]:
        """Blocks, bytes on disk, and bytes saved by storing each content once.

        ``bytes_without_dedup`` counts a block once per (task, variant, slot) using it:
        what one file per variant per slot would take.
        """
        on_disk = sum(b.size_bytes for b in self.blocks.values())
        without = sum(b.size_bytes * len(b.users) for b in self.blocks.values())
        return {
            "tasks": len(self.tasks),
            "blocks": len(self.blocks),
            "uses": sum(len(b.users) for b in self.blocks.values()),
            "shared_blocks": len(self.shared_blocks()),
            "bytes_on_disk": on_disk,
            "bytes_without_dedup": without,
            "bytes_saved": without - on_disk,
        }

    def partition(self, task: str, *, verify: bool = True) -> Partition:
        """A ``Partition`` of ``task`` whose block files are the store's.

        So everything that takes a partition (``StitchedModel``, ``merge_config``,
        profiling) reads blocks from the store. ``verify`` checks every block's hash
        first, since those readers open ``block_path`` directly and skip ``path``.
        """
        t = self._task(task)
        ids = {bid for ids in t["variants"].values() for bid in ids}
        if verify:
            for bid in ids:
                self.path(bid)
        blocks: dict[str, BlockInfo] = {}
        for bid in sorted(ids):
            b = self.blocks[bid]
            blocks[bid] = BlockInfo(
                id=bid, slot=b.slot, file=b.file, inputs=list(b.inputs), outputs=list(b.outputs),
                macs=b.macs, size_bytes=b.size_bytes, precision=b.precision,
                variants=sorted({v for tk, v, _ in b.users if tk == task}),
            )
        return Partition(
            task=task,
            family_path=t["family"],
            cuts=[list(c) for c in t["cuts"]],
            variants={v: list(ids) for v, ids in t["variants"].items()},
            blocks=blocks,
            root=self.root,
            slot_macs_share=list(t.get("slot_macs_share", [])),
        )


def _stored(bid: str, sha: str, info: BlockInfo, size: int) -> StoredBlock:
    return StoredBlock(
        id=bid, sha256=sha, file=f"{BLOCKS_DIR}/{bid}.onnx", size_bytes=size,
        slot=info.slot, inputs=list(info.inputs), outputs=list(info.outputs), macs=info.macs,
        precision=info.precision, users=[],
    )
