"""A partition: where a family is cut, and which block each variant has in each slot.

``partition.yaml`` lists the cuts, each variant's block ids slot by slot, and each block's
ports, MACs and file. A block's id is the sha256 of its file's bytes: the key it has in
the block store (``loom.model.blockstore``) that the partition's blocks are written to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from loom.core.errors import ManifestError
from loom.core.schema import Strict, read_yaml, validate
from loom.model.family import Family, load_family

PARTITION_FILE = "partition.yaml"


# -- the partition -----------------------------------------------------------------------------
@dataclass
class BlockInfo:
    """One block of a partition; ``file`` is relative to the partition folder."""

    id: str
    slot: int
    file: str
    inputs: list[str]
    outputs: list[str]
    macs: int
    size_bytes: int
    precision: str
    variants: list[str] = field(default_factory=list)


@dataclass
class Partition:
    """Where a family is cut and which block each variant has in each slot."""

    task: str
    family_path: str
    cuts: list[list[str]]
    variants: dict[str, list[str]]
    blocks: dict[str, BlockInfo]
    root: Path
    slot_macs_share: list[float] = field(default_factory=list)
    verification: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the block store holding the blocks, relative to ``root`` ("" for a partition made
    #: before blocks went to a store, whose blocks sit in its own ``blocks/`` folder)
    store: str = ""

    @property
    def k(self) -> int:
        return len(self.cuts) + 1

    def block(self, variant: str, slot: int) -> BlockInfo:
        try:
            return self.blocks[self.variants[variant][slot]]
        except KeyError:
            raise ManifestError(
                f"{self.root / PARTITION_FILE}: no variant {variant!r} (have {sorted(self.variants)})"
            ) from None

    def block_path(self, block_id: str) -> Path:
        return self.root / self.blocks[block_id].file

    @property
    def store_root(self) -> Path | None:
        """The folder of the block store this partition's blocks live in (None if none)."""
        return (self.root / self.store) if self.store else None

    def family(self) -> Family:
        return load_family(self.root / self.family_path)

    def save(self) -> Path:
        data = {
            "task": self.task,
            "family": self.family_path,
            "k": self.k,
            "cuts": self.cuts,
            "slot_macs_share": [round(s, 4) for s in self.slot_macs_share],
            "variants": self.variants,
            "blocks": {bid: {k: v for k, v in asdict(b).items() if k != "id"} for bid, b in self.blocks.items()},
            "verification": self.verification,
        }
        if self.store:
            data["store"] = self.store
        path = self.root / PARTITION_FILE
        path.write_text(yaml.safe_dump(data, sort_keys=False, width=120))
        return path


class _BlockEntry(Strict):
    """A block as ``partition.yaml`` lists it (the schema a loaded file is checked against)."""

    slot: int = Field(ge=0)
    file: str
    inputs: list[str]
    outputs: list[str]
    macs: int
    size_bytes: int
    precision: str
    variants: list[str] = Field(default_factory=list)


class _PartitionFile(Strict):
    task: str
    family: str
    k: int | None = None
    cuts: list[list[str]]
    slot_macs_share: list[float] = Field(default_factory=list)
    variants: dict[str, list[str]]
    blocks: dict[str, _BlockEntry]
    verification: dict[str, dict[str, Any]] = Field(default_factory=dict)
    store: str = ""


def _consistency(data: _PartitionFile) -> list[str]:
    """Problems between the fields of a schema-valid partition file, each naming its field."""
    k = len(data.cuts) + 1
    problems = [f"k: {data.k}, but {len(data.cuts)} cut(s) make {k} slots"] if data.k not in (None, k) else []
    for variant, ids in data.variants.items():
        if len(ids) != k:
            problems.append(f"variants.{variant}: {len(ids)} block(s) for {k} slots")
        for slot, bid in enumerate(ids):
            block = data.blocks.get(bid)
            if block is None:
                problems.append(f"variants.{variant}[{slot}]: block {bid!r} is not in blocks")
            elif block.slot != slot:
                problems.append(f"variants.{variant}[{slot}]: block {bid!r} is of slot {block.slot}")
    return problems


def load_partition(path: str | Path) -> Partition:
    """Read ``partition.yaml`` (``path`` is the file or its folder); ``ManifestError`` naming the
    file and field when it is not a well-formed partition."""
    path = Path(path)
    if path.is_dir():
        path = path / PARTITION_FILE
    if not path.is_file():
        raise ManifestError(f"{path}: no such partition file (run `loom partition` first)")
    source = f"{path}: malformed partition file"
    data = validate(_PartitionFile, read_yaml(path, ManifestError), source=source, error=ManifestError)
    problems = _consistency(data)
    if problems:
        raise ManifestError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return Partition(
        task=data.task,
        family_path=data.family,
        cuts=data.cuts,
        variants=data.variants,
        blocks={bid: BlockInfo(id=bid, **b.model_dump()) for bid, b in data.blocks.items()},
        root=path.parent,
        slot_macs_share=data.slot_macs_share,
        verification=data.verification,
        store=data.store,
    )
