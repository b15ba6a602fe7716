"""Each processor's resident blocks (``BlockCache``) and the memory budget over them all.

A cache loads a block on demand on its worker's thread and counts its bytes; the
``MemoryBudget`` asks the ``Preloader`` what to evict so the total stays within budget +
margin. Design notes: docs/serving.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loom.core.errors import BackendError, LoomError
from loom.serving.preload import Key, Preloader

if TYPE_CHECKING:
    from backends.base import Backend, LoadedBlock

__all__ = ["BlockCache", "MemoryBudget"]

log = logging.getLogger(__name__)


class BlockCache:
    """The blocks resident on one processor; ``get`` loads on demand.

    Used only from its worker's thread (loads must happen there, to inherit the pin),
    except ``resident()`` for reports and the budget's evictions of blocks it does not hold.
    Under a memory budget, ``MemoryBudget`` makes room before each load.
    """

    def __init__(
        self, processor: str, backend: Backend, resolve: Callable[[str], bytes | Path],
        budget: MemoryBudget | None = None,
        known_bytes: Callable[[str, str], int | None] | None = None, clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.processor = processor
        #: seconds, for timing loads (the runtime's clock: simulated in the simulator)
        self._clock = clock
        #: a block's footprint measured offline (alone, the engine warm), preferred to the
        #: RSS growth seen at load: that one also holds the engine's one-off setup on the
        #: first load and whatever another worker's load allocated at the same moment
        self._known_bytes = known_bytes
        self.backend = backend
        #: block id -> what to load: its verified bytes (the pool's ``source``) or its file
        self._resolve = resolve
        self._budget = budget
        self._blocks: dict[str, LoadedBlock] = {}
        #: bytes each resident block holds (as measured at its load)
        self._bytes: dict[str, int] = {}
        #: seconds the last load of each block took (the scheduler's load estimate)
        self._load_s: dict[str, float] = {}
        #: blocks the worker is running now: other threads' evictions leave them alone
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self.loads = 0
        self.evictions = 0
        self.load_seconds = 0.0

    def get(self, block_id: str, protect: Sequence[Key] = ()) -> LoadedBlock:
        """The resident block, loaded first when it is not (making room within the budget).

        ``protect``: pairs the budget must not evict for this load (the plan being run).
        """
        block = self._blocks.get(block_id)
        if block is None:
            t_read = self._clock()
            source = self._resolve(block_id)  # read and hashed here, every load: BlockIntegrityError
            read_s = self._clock() - t_read
            reserved = self._budget.before_load(self, block_id, protect) if self._budget is not None else 0
            t0 = self._clock() - read_s  # the read is part of the load's time
            try:
                block = self.backend.load(source, block_id=block_id)
            except LoomError:
                if self._budget is not None:
                    self._budget.after_load(self, block_id, reserved, None)
                raise
            except Exception as exc:  # an engine's own error type
                if self._budget is not None:
                    self._budget.after_load(self, block_id, reserved, None)
                raise BackendError(f"loading block {block_id} on {self.processor}: {exc}") from exc
            dt = self._clock() - t0
            known = self._known_bytes(block_id, self.processor) if self._known_bytes is not None else None
            nbytes = int(known) if known else int(self.backend.memory_bytes(block))
            if nbytes <= 0 and reserved > 0:
                # a measured 0 (the allocator reused freed pages) would make the budget blind
                nbytes = reserved
            with self._lock:
                self._blocks[block_id] = block
                self._bytes[block_id] = nbytes
                self._load_s[block_id] = dt
                self.loads += 1
                self.load_seconds += dt
            if self._budget is not None:
                self._budget.after_load(self, block_id, reserved, nbytes, protect)
        return block

    def hold(self, block_ids: Sequence[str]) -> None:
        with self._lock:
            self._held = set(block_ids)

    def unhold(self) -> None:
        with self._lock:
            self._held = set()

    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def resident_bytes(self) -> dict[str, int]:
        with self._lock:
            return dict(self._bytes)

    def load_ms(self, block_id: str) -> float | None:
        """Predicted ms to load ``block_id`` here: its last load, else this cache's mean (None: no load yet)."""
        with self._lock:
            s = self._load_s.get(block_id)
            if s is None and self.loads:
                s = self.load_seconds / self.loads
        return None if s is None else s * 1e3

    def evict_unheld(self, block_id: str) -> int:
        """Evict unless the worker is running it; the bytes freed (0 when kept or absent)."""
        with self._lock:
            if block_id in self._held or block_id not in self._blocks:
                return 0
            block = self._blocks.pop(block_id)
            nbytes = self._bytes.pop(block_id, 0)
            self.evictions += 1
        self.backend.release(block)
        return nbytes

    def is_resident(self, block_id: str) -> bool:
        return block_id in self._blocks

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._blocks)

    def memory_bytes(self) -> int:
        with self._lock:
            return sum(self.backend.memory_bytes(b) for b in self._blocks.values())

    def evict(self, block_id: str) -> None:
        with self._lock:
            block = self._blocks.pop(block_id, None)
            self._bytes.pop(block_id, None)
            if block is not None:
                self.evictions += 1
        if block is not None:
            self.backend.release(block)

    def release_all(self) -> None:
        with self._lock:
            blocks, self._blocks = list(self._blocks.values()), {}
            self._bytes = {}
        for b in blocks:
            try:
                self.backend.release(b)
            except Exception:  # releasing at close must not hide the other releases
                log.exception("releasing block %s on %s", b.block_id, self.processor)


class MemoryBudget:
    """The memory budget over all processors' caches, enforced through the preloader's choices.

    Called on the loading worker's thread. One lock serializes the room-making of
    concurrent loads on different processors, and the bytes of loads in progress are
    reserved, so that two loads cannot both count the same free room.
    """

    def __init__(
        self,
        preloader: Preloader,
        caches: Callable[[], dict[str, BlockCache]],
        estimate: Callable[[str, str], int],
        now: Callable[[], float],
    ) -> None:
        self.preloader = preloader
        self._caches = caches
        self._estimate = estimate
        self._now = now
        self._lock = threading.Lock()
        self.reserved = 0
        #: loads that left the total above budget + margin (protected blocks alone filled it)
        self.over_budget = 0
        self.peak_bytes = 0

    def _state(self) -> tuple[dict[str, BlockCache], dict[Key, int], set[Key]]:
        caches = self._caches()
        resident: dict[Key, int] = {}
        held: set[Key] = set()
        for p, c in caches.items():
            resident.update({(b, p): n for b, n in c.resident_bytes().items()})
            held.update((b, p) for b in c.held())
        return caches, resident, held

    def _evict(self, need: int, protect: set[Key]) -> bool:
        caches, resident, held = self._state()
        victims, ok = self.preloader.make_room(need + self.reserved, resident, protect | held, self._now())
        for b, p in victims:
            # a worker may have started running it since: then it stays, and we are short
            freed = caches[p].evict_unheld(b)
            if not freed and (b, p) in resident and resident[(b, p)]:
                ok = False
        return ok

    def before_load(self, cache: BlockCache, block_id: str, protect: Sequence[Key]) -> int:
        key = (block_id, cache.processor)
        need = max(0, int(self._estimate(block_id, cache.processor)))
        with self._lock:
            if not self._evict(need, {key, *protect}):
                log.warning("memory budget: loading %s on %s goes over budget + margin", *key)
            self.reserved += need
        return need

    def after_load(
        self, cache: BlockCache, block_id: str, reserved: int, nbytes: int | None, protect: Sequence[Key] = ()
    ) -> None:
        key = (block_id, cache.processor)
        with self._lock:
            self.reserved -= reserved
            if nbytes is None:
                return
            self.preloader.note_size(key, nbytes)
            # the estimate may have been short: a second round, the new block kept
            if not self._evict(0, {key, *protect}):
                self.over_budget += 1
            _caches, resident, _held = self._state()
            self.peak_bytes = max(self.peak_bytes, sum(resident.values()))
