"""One worker thread per processor, and chains of blocks placed across processors.

A ``Worker`` is a processor's thread, pinned to its cores, running jobs (loads, runs)
from its own queue; a ``WorkerPool`` holds a device's workers. A ``PlacedChain`` runs a
stitched config with one processor per slot, handing activations from worker to worker.
Why a thread per processor, and what a chain pays: ``docs/devices.md``.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from loom.core.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from backends.base import Backend, LoadedBlock
    from loom.model.partition import Partition
    from loom.processors.device import DeviceProfile

T = TypeVar("T")
Feeds = Mapping[str, np.ndarray]


def start_pinned_thread(
    name: str, backend: Backend, serve: Callable[[], None], *, thread_name: str
) -> tuple[threading.Thread, bool, set[int] | None]:
    """Start a daemon thread that pins itself with ``backend`` and then runs ``serve``.

    Returns the thread, whether it was pinned and the CPU ids it may run on. A pin that
    fails is raised here, in the caller's thread, as ``BackendError`` naming the worker:
    a processor that cannot start must stop its pool's construction, not die silently.
    """
    started = threading.Event()
    state: dict[str, Any] = {"pinned": False, "affinity": None}

    def main() -> None:
        try:
            state["pinned"] = backend.pin_current_thread()
            if hasattr(os, "sched_getaffinity"):
                state["affinity"] = set(os.sched_getaffinity(0))
        except BaseException as exc:  # reported below, in the caller's thread
            state["error"] = exc
            started.set()
            return
        started.set()
        serve()

    thread = threading.Thread(target=main, name=thread_name, daemon=True)
    thread.start()
    started.wait()
    if "error" in state:
        thread.join()
        raise BackendError(f"worker {name!r}: {state['error']}") from state["error"]
    return thread, state["pinned"], state["affinity"]


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: Future


class Worker:
    """A processor's thread: pinned to its cores, running jobs from its own queue in order.

    Every job returns a ``Future``; an exception raised by the job is set on that
    future, never lost and never fatal to the thread. ``close()`` lets queued jobs
    finish, then joins.
    """

    def __init__(self, name: str, backend: Backend) -> None:
        self.name = name
        self.backend = backend
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        #: whether the thread was pinned, and the CPU ids it may run on (read in the thread)
        self._thread, self.pinned, self.affinity = start_pinned_thread(
            name, backend, self._loop, thread_name=f"loom-worker-{name}")

    # -- the thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._execute(job)
            # drop the job (its feeds and outputs) before blocking on the queue again
            del job

    @staticmethod
    def _execute(job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # cancelled while queued
        try:
            result = job.fn(*job.args, **job.kwargs)
        except BaseException as exc:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    # -- the API -----------------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on this worker's thread, after the jobs queued before it."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"worker {self.name!r} is closed")
            self._queue.put(_Job(fn, args, kwargs, future))
        return future

    def run(self, block: LoadedBlock, feeds: Feeds) -> Future[dict[str, np.ndarray]]:
        """Run a loaded block on this processor; the future resolves to its outputs."""
        return self.submit(self.backend.run, block, feeds)

    def load(self, path: Any, *, block_id: str | None = None) -> Future[LoadedBlock]:
        """Load a block on this processor's backend, inside its (pinned) thread."""
        return self.submit(self.backend.load, path, block_id=block_id)

    def release(self, block: LoadedBlock) -> Future[None]:
        return self.submit(self.backend.release, block)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, *, timeout: float | None = None) -> None:
        """Finish the queued jobs, stop the thread and join it. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Worker({self.name!r}, {self.backend.name}, affinity={sorted(self.affinity or [])})"


class WorkerPool(Mapping[str, Worker]):
    """The workers of a device profile's processors, each started on first use."""

    def __init__(self, device: DeviceProfile) -> None:
        self.device = device
        self._workers: dict[str, Worker] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Worker:
        with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                worker = Worker(name, self.device.make_backend(name))
                self._workers[name] = worker
            return worker

    def __contains__(self, name: object) -> bool:
        return name in self.device.processor_names  # without starting a worker

    def __iter__(self):  # noqa: ANN204 - Mapping's signature
        return iter(self.device.processor_names)

    def __len__(self) -> int:
        return len(self.device.processors)

    def close(self) -> None:
        with self._lock:
            workers, self._workers = list(self._workers.values()), {}
        for w in workers:
            w.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Segment:
    """Consecutive slots of a chain on one processor: one job, no hand-off inside."""

    processor: str
    slots: list[int]
    blocks: list[LoadedBlock]
    #: tensors the segment reads that it does not produce (what is handed to it)
    reads: list[str]


@dataclass(frozen=True)
class Transfer:
    """Activations handed from one processor to the next at a slot boundary."""

    src: str
    dst: str
    slot: int
    tensors: tuple[str, ...]
    nbytes: int


#: loaded blocks shared between chains: (processor, block id) -> LoadedBlock
Resident = dict[tuple[str, str], "LoadedBlock"]


class PlacedChain:
    """A stitched config run across processors: slot ``s`` runs on ``placement[s]``'s worker.

    Blocks are loaded on their processor's backend inside its worker thread. Pass
    ``resident`` to share loaded blocks between chains (the profiler measures many
    configs made of the same blocks): the chain then loads only what is missing, adds
    it there, and leaves releasing it to the owner of the map.
    """

    def __init__(
        self,
        partition: Partition,
        config: Sequence[str],
        placement: Sequence[str],
        workers: Mapping[str, Worker],
        *,
        resident: Resident | None = None,
    ) -> None:
        from loom.model.stitch import check_config

        self.partition = partition
        self.config = check_config(partition, config)
        self.placement = tuple(placement)
        if len(self.placement) != partition.k:
            raise ConfigError(
                f"placement {list(self.placement)} has {len(self.placement)} slot(s); {partition.task} has {partition.k}"
            )
        unknown = sorted({p for p in self.placement if p not in workers})
        if unknown:
            raise ConfigError(f"placement {list(self.placement)}: unknown processor(s) {unknown} (have {sorted(workers)})")
        self.workers = workers
        self.block_ids = [partition.variants[v][s] for s, v in enumerate(self.config)]
        shared: Resident = resident if resident is not None else {}
        loaded = self._load_missing(shared, resident)
        shared.update(loaded)
        #: blocks this chain releases on close (none when a shared map owns them)
        self._owned: list[tuple[str, LoadedBlock]] = (
            [(proc, block) for (proc, _), block in loaded.items()] if resident is None else []
        )
        self.segments = self._segments(shared)
        self.output_names = list(self.segments[-1].blocks[-1].output_names)

    def _load_missing(self, shared: Resident, resident: Resident | None) -> Resident:
        """Load the chain's blocks not in ``shared``, all at once (each processor loads its
        own in parallel). When one fails, the others are released (or left in ``resident``
        for its owner to release) and the failure is raised."""
        pending: dict[tuple[str, str], Future[LoadedBlock]] = {}
        for proc, bid in zip(self.placement, self.block_ids, strict=True):
            key = (proc, bid)
            if key not in shared and key not in pending:
                pending[key] = self.workers[proc].load(self.partition.block_path(bid), block_id=bid)
        loaded: Resident = {}
        failure: BaseException | None = None
        for key, fut in pending.items():
            try:
                loaded[key] = fut.result()
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            for key, block in loaded.items():  # nothing leaks: the map's owner or we release
                if resident is not None:
                    resident[key] = block
                else:
                    self.workers[key[0]].release(block).result()
            raise failure
        return loaded

    def _segments(self, blocks: Resident) -> list[Segment]:
        """Consecutive slots on one processor grouped, each with the tensors handed to it."""
        segments: list[Segment] = []
        for s, (proc, bid) in enumerate(zip(self.placement, self.block_ids, strict=True)):
            block = blocks[(proc, bid)]
            if not segments or segments[-1].processor != proc:
                segments.append(Segment(proc, [], [], []))
            seg = segments[-1]
            made = {o for b in seg.blocks for o in b.output_names}
            seg.reads += [n for n in block.input_names if n not in made and n not in seg.reads]
            seg.slots.append(s)
            seg.blocks.append(block)
        return segments

    # -- running ----------------------------------------------------------------------------
    def submit(self, feeds: Feeds, *, keep_all: bool = False) -> Future[dict[str, np.ndarray]]:
        """Start the chain; the future resolves to the last block's outputs.

        ``keep_all`` resolves it to every tensor instead (feeds and each block's
        outputs), from which ``transfers`` reads what crossed each boundary.
        """
        final: Future[dict[str, np.ndarray]] = Future()
        final.set_running_or_notify_cancel()
        self._start(0, dict(feeds), final, keep_all)
        return final

    def run(self, feeds: Feeds, *, keep_all: bool = False, timeout: float | None = None) -> dict[str, np.ndarray]:
        return self.submit(feeds, keep_all=keep_all).result(timeout)

    def _start(self, i: int, env: dict[str, np.ndarray], final: Future, keep_all: bool) -> None:
        seg = self.segments[i]
        try:
            step = self.workers[seg.processor].submit(self._run_segment, seg, env)
        except BaseException as exc:  # a closed worker
            final.set_exception(exc)
            return

        def done(f: Future) -> None:
            # Runs on the worker that just finished: it hands on to the next worker's
            # queue. Whatever goes wrong here must reach ``final``: an exception escaping
            # a done-callback is only logged, and the caller would wait forever.
            try:
                exc = f.exception()
                if exc is not None:
                    final.set_exception(exc)
                elif i + 1 < len(self.segments):
                    self._start(i + 1, f.result(), final, keep_all)
                else:
                    out = f.result()
                    final.set_result(out if keep_all else {n: out[n] for n in self.output_names})
            except BaseException as err:
                if not final.done():
                    final.set_exception(err)

        step.add_done_callback(done)

    def _run_segment(self, seg: Segment, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        backend = self.workers[seg.processor].backend
        for block in seg.blocks:
            env.update(backend.run(block, {n: env[n] for n in block.input_names}))
        return env

    def transfers(self, env: Mapping[str, np.ndarray]) -> list[Transfer]:
        """What crossed each processor boundary in a run (``env`` from ``keep_all=True``)."""
        result = []
        for prev, seg in zip(self.segments, self.segments[1:], strict=False):
            nbytes = sum(int(np.asarray(env[n]).nbytes) for n in seg.reads)
            result.append(Transfer(prev.processor, seg.processor, seg.slots[0], tuple(seg.reads), nbytes))
        return result

    def close(self) -> None:
        """Release the blocks this chain loaded itself (not those of a shared ``resident`` map)."""
        owned, self._owned = self._owned, []
        futures = [self.workers[proc].release(block) for proc, block in owned]
        for f in futures:
            f.result()

    def __enter__(self) -> PlacedChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
