"""onnxruntime: the reference backend, with any of its execution providers.

Threads and cores. With ``intra_op_threads=1`` onnxruntime creates no intra-op pool:
every kernel runs on the thread that calls ``run`` (measured: all CPU time lands on the
caller). So a processor "onnxruntime on core 1" is a worker thread that called
``pin_current_thread()`` and runs its blocks. With more intra-op threads the pool's
extra threads (all but the first: the caller is the first) are pinned through the
session option ``session.intra_op_thread_affinities``, whose processor ids are
1-based. ``inter_op_threads`` only matters in parallel execution mode, which this
backend does not use (blocks are chains; sequential is faster and predictable).
"""

from __future__ import annotations

import contextlib
import gc
import re
import threading
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.base import (
    Backend,
    LoadedBlock,
    check_cores,
    check_resident,
    mark_released,
    op_label,
    read_source,
    rss_bytes,
    select_feeds,
    warm_model,
)
from loom.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    ModelError,
    UnsupportedOpsError,
)

Provider = str | tuple[str, dict[str, Any]]

_warm_lock = threading.Lock()
_warmed: set[tuple[str, ...]] = set()

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

#: onnxruntime reports a kernel missing for a type as "Could not find an implementation
#: for ConvInteger(10) node with name '...'": the one unsupported-op case only a load finds.
_NO_KERNEL = re.compile(r"Could not find an implementation for (\S+?)\((\d+)\)")


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


class OrtBackend(Backend):
    """onnxruntime with an ordered list of execution providers (its own convention).

    ``providers`` entries are a provider name or ``(name, options)``; onnxruntime tries
    them in order and falls back to the CPU provider for nodes the others refuse.
    ``enable_mem_arena``/``enable_mem_pattern`` are onnxruntime's own defaults (on):
    the arena makes repeated runs allocation-free, at the price of holding its peak.
    ``allow_spinning`` is off by default because processors here share few cores:
    pool threads that busy-wait between ops steal the neighbour processor's core.
    """

    name = "onnxruntime"

    def __init__(
        self,
        *,
        providers: Sequence[Provider] = ("CPUExecutionProvider",),
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        cores: list[int] | None = None,
        graph_optimization_level: str = "all",
        enable_mem_arena: bool = True,
        enable_mem_pattern: bool = True,
        allow_spinning: bool = False,
        log_severity_level: int = 3,
    ) -> None:
        ort = _ort()
        self.providers = _check_providers(providers, ort.get_available_providers())
        if intra_op_threads < 1 or inter_op_threads < 1:
            # 0 would mean "one per physical core", which defeats pinning a processor.
            raise ConfigError(
                f"onnxruntime: thread counts must be >= 1, got intra={intra_op_threads} inter={inter_op_threads}"
            )
        if graph_optimization_level not in _OPT_LEVELS:
            raise ConfigError(
                f"onnxruntime: graph_optimization_level {graph_optimization_level!r} is not one of {sorted(_OPT_LEVELS)}"
            )
        self.intra_op_threads = int(intra_op_threads)
        self.inter_op_threads = int(inter_op_threads)
        self.cores = check_cores(cores)
        self.graph_optimization_level = graph_optimization_level
        self.enable_mem_arena = enable_mem_arena
        self.enable_mem_pattern = enable_mem_pattern
        self.allow_spinning = allow_spinning
        self.log_severity_level = log_severity_level

    # --- protocol -------------------------------------------------------------------

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            ort = _ort()
        except ImportError as exc:
            return False, f"onnxruntime is not importable ({exc}): pip install onnxruntime"
        return True, f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}"

    def unsupported_ops(self, model: onnx.ModelProto) -> list[str]:
        """Every op no kernel of the chosen providers (CPU included, the fallback) can run.

        Checked against onnxruntime's own kernel registry, at the op version the
        model's opset selects, so every bad op is listed at once (a load stops at the
        first). ONNX function ops without a kernel (``HardSwish``, ``Mish``, ...) count
        as supported: onnxruntime inlines their bodies. Kernels missing only for a
        particular element type are found at load (``UnsupportedOpsError`` too).
        """
        if not isinstance(model, onnx.ModelProto):
            model = read_source(model).proto
        names = {p if isinstance(p, str) else p[0] for p in self.providers} | {"CPUExecutionProvider"}
        kernels = _kernels(frozenset(names))
        opsets = {_norm(o.domain): o.version for o in model.opset_import}
        local = {(_norm(f.domain), f.name): f for f in model.functions}
        bad: set[str] = set()
        seen_functions: set[tuple[str, str]] = set()

        def visit(nodes: Sequence[onnx.NodeProto]) -> None:
            for node in nodes:
                key = (_norm(node.domain), node.op_type)
                if key in local:
                    if key not in seen_functions:
                        seen_functions.add(key)
                        visit(local[key].node)
                elif not _supported(key, opsets.get(key[0]), kernels):
                    bad.add(op_label(*key))
                for attr in node.attribute:  # If/Loop/Scan bodies
                    if attr.type == onnx.AttributeProto.GRAPH:
                        visit(attr.g.node)
                    for g in attr.graphs:
                        visit(g.node)

        visit(model.graph.node)
        return sorted(bad)

    def load(
        self, model: onnx.ModelProto | str | Path | bytes, *, block_id: str | None = None
    ) -> LoadedBlock:
        """Create an InferenceSession; ``memory_bytes`` is the RSS growth across its creation.

        The RSS is read just before and just after session creation (weights, the
        optimized graph, kernel state), not after a first run: the arena grows on the
        first run by the activations' peak, which belongs to running, not residency.
        RSS is process-wide: a load concurrent with other allocations misattributes them.
        """
        ort = _ort()
        src = read_source(model, block_id)
        bad = self.unsupported_ops(src.proto)
        if bad:
            raise UnsupportedOpsError(self.name, src.name, bad)
        opts = self._session_options(ort)
        self._warm_up(ort, opts)
        before = rss_bytes()
        t0 = time.perf_counter()
        try:
            session = ort.InferenceSession(src.data, opts, providers=list(self.providers))
        except Exception as exc:
            raise _load_error(self.name, src.name, exc) from exc
        seconds = time.perf_counter() - t0
        memory = max(0, rss_bytes() - before)
        return LoadedBlock(
            block_id=src.name,
            backend=self.name,
            input_names=[i.name for i in session.get_inputs()],
            output_names=[o.name for o in session.get_outputs()],
            handle=session,
            memory_bytes=memory,
            load_seconds=seconds,
            info={
                # which providers really took the session (a requested one may have
                # declined to register, e.g. a GPU provider without its driver)
                "providers": session.get_providers(),
                "intra_op_threads": self.intra_op_threads,
                "cores": self.cores,
            },
        )

    def run(self, block: LoadedBlock, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = check_resident(block)
        inputs = select_feeds(block, feeds)
        try:
            outputs = session.run(block.output_names, inputs)
        except Exception as exc:
            raise BackendError(
                f"block {block.block_id} on {self.name} failed: {type(exc).__name__}: {exc}"
            ) from exc
        return dict(zip(block.output_names, outputs, strict=True))

    def release(self, block: LoadedBlock) -> None:
        """Drop the session; onnxruntime frees its weights and arena when it is collected."""
        mark_released(block)
        gc.collect()

    def describe(self) -> dict[str, Any]:
        ort = _ort()
        return {
            "backend": self.name,
            "version": ort.__version__,
            "device": ort.get_device(),
            "providers": [p if isinstance(p, str) else [p[0], dict(p[1])] for p in self.providers],
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "cores": self.cores,
            "graph_optimization_level": self.graph_optimization_level,
        }

    # --- internals ------------------------------------------------------------------

    def _warm_up(self, ort: Any, opts: Any) -> None:
        """Pay onnxruntime's one-time start-up (~2.5 MB here) before the first measured load."""
        key = tuple(p if isinstance(p, str) else p[0] for p in self.providers)
        with _warm_lock:
            if key in _warmed:
                return
            _warmed.add(key)
        with contextlib.suppress(Exception):  # the real load reports real problems
            ort.InferenceSession(warm_model().SerializeToString(), opts, providers=list(self.providers))

    def _session_options(self, ort: Any) -> Any:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPT_LEVELS[self.graph_optimization_level]
        )
        opts.enable_cpu_mem_arena = self.enable_mem_arena
        opts.enable_mem_pattern = self.enable_mem_pattern
        opts.log_severity_level = self.log_severity_level
        opts.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.allow_spinning else "0"
        )
        if self.cores and self.intra_op_threads > 1:
            # One entry per pool thread beyond the caller; ids are 1-based ("1" = CPU 0).
            # The caller itself is pinned by the worker via pin_current_thread().
            spread = [self.cores[i % len(self.cores)] + 1 for i in range(1, self.intra_op_threads)]
            opts.add_session_config_entry(
                "session.intra_op_thread_affinities", ";".join(str(c) for c in spread)
            )
        return opts


def _check_providers(providers: Sequence[Provider], available: list[str]) -> list[Provider]:
    if isinstance(providers, str):
        providers = [providers]
    result: list[Provider] = []
    for p in providers:
        if isinstance(p, str):
            result.append(p)
        elif isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], Mapping):
            result.append((p[0], dict(p[1])))
        else:
            raise ConfigError(f"onnxruntime: a provider is a name or (name, options), got {p!r}")
    if not result:
        raise ConfigError("onnxruntime: providers is empty")
    missing = [n for n in (p if isinstance(p, str) else p[0] for p in result) if n not in available]
    if missing:
        raise BackendUnavailableError(
            f"onnxruntime provider(s) {missing} not available here; this onnxruntime has {available}"
        )
    return result


def _norm(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


@lru_cache(maxsize=8)
def _kernels(providers: frozenset[str]) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """(domain, op) -> version ranges of the kernels registered for ``providers``."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    table: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for k in C.get_all_opkernel_def():
        if k.provider in providers:
            table.setdefault((_norm(k.domain), k.op_name), []).append(tuple(k.version_range))
    return table


@lru_cache(maxsize=1)
def _ort_schemas() -> dict[tuple[str, str], list[int]]:
    """(domain, op) -> since_versions of the schemas onnxruntime registers (its contrib ops too)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    table: dict[tuple[str, str], list[int]] = {}
    for s in C.get_all_operator_schema():
        table.setdefault((_norm(s.domain), s.name), []).append(int(s.since_version))
    return table


#: Ops onnxruntime resolves while building the graph, so no kernel exists for them:
#: ``Constant`` nodes become initializers at session creation.
_GRAPH_LEVEL_OPS = {("", "Constant")}


def _supported(
    key: tuple[str, str], opset: int | None, kernels: dict[tuple[str, str], list[tuple[int, int]]]
) -> bool:
    """Whether a kernel covers the op's version at ``opset``, or its ONNX function can be inlined."""
    domain, op = key
    if key in _GRAPH_LEVEL_OPS:
        return True
    ranges = kernels.get(key, [])
    if opset is None:  # the model does not import the domain: the version is unknown
        return bool(ranges)
    function = False
    try:
        schema = onnx.defs.get_schema(op, opset, domain)
        since: int | None = schema.since_version
        function = schema.has_function or schema.has_context_dependent_function
    except onnx.defs.SchemaError:  # not an ONNX op (or not yet at this opset): ORT's own schemas
        versions = [v for v in _ort_schemas().get(key, []) if v <= opset]
        since = max(versions) if versions else None
    if since is None:  # no such op at this opset (Gelu before opset 20): ORT refuses the graph
        return False
    return any(lo <= since <= hi for lo, hi in ranges) or function


def _load_error(backend: str, name: str, exc: Exception) -> Exception:
    """Sort an onnxruntime load failure: a missing kernel, a bad model, or the engine."""
    message = str(exc)
    found = _NO_KERNEL.findall(message)
    if found:
        return UnsupportedOpsError(backend, name, [op for op, _ in found])
    kind = type(exc).__name__
    if kind in ("InvalidProtobuf", "InvalidGraph", "InvalidArgument", "NoSuchFile", "Fail", "NotImplemented"):
        return ModelError(f"{name}: onnxruntime cannot load it: {message}")
    return BackendError(f"{name}: onnxruntime failed to load it ({kind}): {message}")
