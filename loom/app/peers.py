"""Peers: what a user would run instead of sparseloom, as policies of the same benchmark.

``run_peer`` is ``run_trace`` for a peer: the same seeded trace, open-loop replay and
``RequestRecord``s, so the same summary applies. A peer serves each task's one variant
as ``sv-lo-np`` chooses it (same estimates), the family's own ONNX file, whole; records
carry that variant's measured accuracy from the family manifest. ``ort-plain``: default
onnxruntime sessions, a worker thread per task; ``openvino-throughput``: the CPU plugin's
THROUGHPUT hint in f32 with async infer queues. A peer never re-plans (an SLO change
changes how its requests are judged, not its variant). Design notes: docs/app.md, "Peers".
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from loom.app.deployment import Deployment
from loom.app.run import RunResult, replay, trace_of
from loom.core import compat
from loom.core.errors import ConfigError, RuntimeClosedError
from loom.serving.metrics import MetricsCollector, RequestRecord, slo_status

PEERS: tuple[str, ...] = ("ort-plain", "openvino-throughput")


def is_peer(name: str) -> bool:
    """Whether ``name`` is a peer (case and ``_``/``-`` forgiven), not one of the runtime's policies."""
    return _key(name) in PEERS


def _key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


@dataclass(frozen=True)
class PeerModel:
    """One task's model as a peer serves it: the chosen variant's whole ONNX file."""

    task: str
    variant: str
    path: Path
    #: the variant's measured accuracy (family manifest; else the estimators')
    accuracy: float | None
    input_names: list[str]
    output_name: str


def peer_models(dep: Deployment) -> dict[str, PeerModel]:
    """Each task's variant as ``sv-lo-np`` chooses it at the start (by the same estimates)."""
    plans = dep.candidates("sv-lo-np")
    out = {}
    for task, cands in plans.items():
        fam = dep.families[task]
        variant = cands[0].config[0]
        acc = fam.variant(variant).accuracy
        if acc is None:
            acc = dep.spaces[task].variant_accuracy.get(variant)
        out[task] = PeerModel(task, variant, fam.variant_path(variant), acc, fam.input_names,
                              fam.manifest.output.name)
    return out


@dataclass
class _Request:
    id: int
    task: str
    feeds: dict[str, np.ndarray]
    arrival_s: float
    latency_ms: float
    accuracy_floor: float
    future: Future


class PeerServer(ABC):
    """A peer serving a deployment's tasks: ``submit`` -> a future of the output, one record per request.

    The same surface as the runtime for the trace runner: ``submit``, ``now``, ``set_slo``,
    ``stats``, ``close``. Its clock starts when it is built (after loading and warming).
    """

    name: ClassVar[str] = ""
    #: what the records' placement and spans call the processor (every core, the engine's own threads)
    processor: ClassVar[str] = ""

    def __init__(self, dep: Deployment, *, on_record: Callable[[RequestRecord], None] | None = None) -> None:
        self.models = peer_models(dep)
        self._slo = {t.name: dep.config.slo_at(t.name, 0.0) for t in dep.config.tasks}
        #: one real input per task, for warming the engines
        self._warm = {t: dep.request_inputs(t, 0) for t in self.models}
        self._on_record = on_record
        self._lock = threading.Lock()
        self._next_id = 0
        self._pending: set[Future] = set()
        self._closed = False
        self._load()
        self._t0 = time.perf_counter()

    @abstractmethod
    def _load(self) -> None:
        """Load (and warm) every task's model."""

    @abstractmethod
    def _dispatch(self, req: _Request) -> None:
        """Hand one request to the engine; it ends in ``_finish``."""

    @abstractmethod
    def _shutdown(self) -> None:
        """Stop the engine's threads (every request has finished)."""

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def set_slo(self, task: str, *, latency_ms: float | None = None, accuracy_floor: float | None = None) -> None:
        """Change the bound and floor the task's next requests are judged by (the variant stays)."""
        lat, floor = self._slo[task]
        self._slo[task] = (lat if latency_ms is None else float(latency_ms),
                           floor if accuracy_floor is None else float(accuracy_floor))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"in_flight": len(self._pending), "submitted": self._next_id}

    def submit(self, task: str, inputs: Mapping[str, np.ndarray]) -> Future:
        """Serve one request of ``task``; the future resolves to the task's output array."""
        if task not in self.models:
            raise ConfigError(f"{self.name}: unknown task {task!r}; tasks: {sorted(self.models)}")
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeClosedError(f"{self.name}: closed")
            rid, self._next_id = self._next_id, self._next_id + 1
            self._pending.add(fut)
        lat, floor = self._slo[task]
        self._dispatch(_Request(rid, task, dict(inputs), self.now(), lat, floor, fut))
        return fut

    def close(self) -> None:
        """Wait for every submitted request, then stop."""
        with self._lock:
            self._closed = True
            pending = list(self._pending)
        wait_futures(pending)
        self._shutdown()

    def _finish(self, req: _Request, start_s: float, result: np.ndarray | BaseException) -> None:
        end_s = self.now()
        m = self.models[req.task]
        latency = (end_s - req.arrival_s) * 1e3
        error = result if isinstance(result, BaseException) else None
        if error is None:
            status, below = slo_status(latency, req.latency_ms, m.accuracy, req.accuracy_floor)
        else:
            status, below = "error", False
        rec = RequestRecord(
            id=req.id, task=req.task, policy=self.name, arrival_s=req.arrival_s, start_s=start_s, end_s=end_s,
            latency_ms=latency, latency_bound_ms=req.latency_ms, accuracy_floor=req.accuracy_floor,
            plan_accuracy=m.accuracy, config=(m.variant,), placement=(self.processor,), status=status,
            below_floor=below, error=None if error is None else f"{type(error).__name__}: {error}",
            spans=[(self.processor, f"{req.task}/{m.variant}", start_s, end_s)])
        if self._on_record is not None:
            self._on_record(rec)
        if error is None:
            req.future.set_result(result)
        else:
            req.future.set_exception(error)
        with self._lock:
            self._pending.discard(req.future)


class OrtPlain(PeerServer):
    """``ort-plain``: a default ``InferenceSession`` per task (no intra-op limit, no pinning).

    **One worker thread per task** calls ``session.run`` on that task's requests in arrival
    order as they come; the tasks run concurrently, each session with its default threads.
    """

    name = "ort-plain"
    processor = "ort-all-cores"

    def _load(self) -> None:
        ort = compat.require("onnxruntime")
        self._sessions = {t: ort.InferenceSession(str(m.path), providers=["CPUExecutionProvider"])
                          for t, m in self.models.items()}
        self._threads = {t: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-plain-{t}")
                         for t in self.models}
        for t, m in self.models.items():
            self._sessions[t].run([m.output_name], self._warm[t])

    def _dispatch(self, req: _Request) -> None:
        self._threads[req.task].submit(self._run, req)

    def _run(self, req: _Request) -> None:
        m = self.models[req.task]
        start = self.now()
        try:
            out: np.ndarray | BaseException = self._sessions[req.task].run([m.output_name], req.feeds)[0]
        except Exception as exc:  # a failed request ends in its future, like the runtime's
            out = exc
        self._finish(req, start, out)

    def _shutdown(self) -> None:
        for ex in self._threads.values():
            ex.shutdown(wait=True)


class OpenVinoThroughput(PeerServer):
    """``openvino-throughput``: the CPU plugin, ``PERFORMANCE_HINT=THROUGHPUT``, ``INFERENCE_PRECISION_HINT=f32``.

    Each task's variant compiled once, with an ``AsyncInferQueue`` of the compiled model's
    optimal number of requests and a callback; a dispatcher thread per task starts
    requests as they arrive (waiting for a free one), so a full queue never holds up the
    arrivals. f32: the CPU plugin's default here is bf16 (~1e-2 off onnxruntime).
    """

    name = "openvino-throughput"
    processor = "ov-cpu-all-cores"

    def _load(self) -> None:
        ov = compat.require("openvino")
        core = ov.Core()
        props = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"}
        self._queues: dict[str, Any] = {}
        self._ports: dict[str, Any] = {}
        for t, m in self.models.items():
            compiled = core.compile_model(str(m.path), "CPU", props)
            self._ports[t] = compiled.output(m.output_name)
            q = ov.AsyncInferQueue(compiled)  # its optimal number of requests for the hint
            q.set_callback(self._done)
            for _ in range(len(q)):  # warm every request once
                q.start_async(self._warm[t], None)
            q.wait_all()
            self._queues[t] = q
        self._inbox: dict[str, queue.SimpleQueue] = {t: queue.SimpleQueue() for t in self.models}
        self._dispatchers = [threading.Thread(target=self._feed, args=(t,), name=f"ov-feed-{t}", daemon=True)
                             for t in self.models]
        for th in self._dispatchers:
            th.start()

    def _dispatch(self, req: _Request) -> None:
        self._inbox[req.task].put(req)

    def _feed(self, task: str) -> None:
        q, inbox = self._queues[task], self._inbox[task]
        while True:
            req = inbox.get()
            if req is None:
                return
            q.get_idle_request_id()  # wait for a free request; only this thread starts this queue's
            start = self.now()
            try:
                q.start_async(req.feeds, (req, start))
            except Exception as exc:
                self._finish(req, start, exc)

    def _done(self, request: Any, userdata: tuple[_Request, float] | None) -> None:
        if userdata is None:  # a warm-up run
            return
        req, start = userdata
        try:
            out: np.ndarray | BaseException = request.get_tensor(self._ports[req.task]).data.copy()
        except Exception as exc:
            out = exc
        self._finish(req, start, out)

    def _shutdown(self) -> None:
        for inbox in self._inbox.values():
            inbox.put(None)
        for th in self._dispatchers:
            th.join()
        for q in self._queues.values():
            q.wait_all()


_SERVERS: dict[str, type[PeerServer]] = {"ort-plain": OrtPlain, "openvino-throughput": OpenVinoThroughput}


def peer_server(dep: Deployment, name: str, *,
                on_record: Callable[[RequestRecord], None] | None = None) -> PeerServer:
    """The peer called ``name``, loaded and warmed, serving ``dep``'s tasks."""
    key = _key(name)
    if key not in _SERVERS:
        raise ConfigError(f"unknown peer {name!r}; peers: {', '.join(PEERS)}")
    return _SERVERS[key](dep, on_record=on_record)


def run_peer(dep: Deployment, name: str, *, duration_s: float | None = None, rate_scale: float = 1.0,
             progress: bool = True) -> RunResult:
    """``run_trace`` for a peer: the config's seeded trace, open loop, the same replay and records."""
    cfg = dep.config
    duration, trace = trace_of(dep, duration_s, rate_scale)
    collector = MetricsCollector()
    server = peer_server(dep, name, on_record=collector.record)
    timeline = sorted(((ch.at_s, _slo_change(server, cfg, t.name, ch.at_s)) for t in cfg.tasks
                       for ch in t.slo_changes), key=lambda e: e[0])
    return replay(dep, server, trace, timeline, name=server.name, start=time.perf_counter(), duration_s=duration,
                  collector=collector, progress=progress)


def _slo_change(server: PeerServer, cfg: Any, task: str, at_s: float) -> Callable[[], None]:
    def apply() -> None:
        lat, floor = cfg.slo_at(task, at_s)
        server.set_slo(task, latency_ms=lat, accuracy_floor=floor)
    return apply
