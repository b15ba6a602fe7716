"""The partitions ``loom profile``, ``loom fit`` and ``loom serve`` work on, made when missing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from loom.core.errors import ConfigError
from loom.core.progress import say
from loom.model.family import Family
from loom.model.partition import Partition


def ensure_partitions(families: Sequence[Family], partitions_dir: str | Path, *, k: int = 3) -> list[Partition]:
    """Each family's partition under ``partitions_dir/<task>``, made when it is not there yet."""
    from loom.model.cutting import partition_family
    from loom.model.partition import PARTITION_FILE, load_partition

    result = []
    for family in families:
        folder = Path(partitions_dir) / family.task
        part = load_partition(folder) if (folder / PARTITION_FILE).is_file() else None
        if part is not None and not part.store:
            say(f"{family.task}: {folder} was made before blocks went to a block store; partitioning again")
            part = None
        if part is not None:
            if part.k != k:
                raise ConfigError(
                    f"{folder / PARTITION_FILE}: has K={part.k} slots, asked for {k}; remove it or choose "
                    f"another partitions folder"
                )
        else:
            say(f"{family.task}: partitioning into {k} slots under {folder}")
            part = partition_family(family, folder, k=k, progress=say)
        result.append(part)
    return result
