"""onnxruntime: the reference backend, with any of its execution providers.

Execution providers are listed in order of preference (``_ort_providers`` resolves and
checks them); ops are checked against onnxruntime's kernel registry (``_ort_kernels``).
Threads and cores, provider entries and silent CPU fallback: docs/backends.md.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends._ort_kernels import load_error, unsupported_ops
from backends._ort_providers import (
    ASSIGNMENT_KEY,
    CPU_PROVIDER,
    PROVIDER_ALIASES,
    PROVIDER_PACKAGES,
    Provider,
    ProviderFallbackWarning,
    assignment_counts,
    check_available,
    fallback_report,
    install_hint,
    normalize_providers,
    provider_names,
    provider_problems,
    resolve_provider_name,
)
from backends.base import (
    Backend,
    LoadedBlock,
    check_cores,
    check_resident,
    mark_released,
    read_source,
    rss_bytes,
    select_feeds,
    warm_model,
)
from loom.core.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    UnsupportedOpsError,
)

__all__ = [
    "CPU_PROVIDER",
    "PROVIDER_ALIASES",
    "PROVIDER_PACKAGES",
    "OrtBackend",
    "Provider",
    "ProviderFallbackWarning",
    "fallback_report",
    "normalize_providers",
    "provider_problems",
    "resolve_provider_name",
]

_warm_lock = threading.Lock()
_warmed: set[tuple[str, ...]] = set()

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


class OrtBackend(Backend):
    """onnxruntime with an ordered list of execution providers (its own convention).

    ``providers``: names (or aliases), ``(name, options)`` or ``{"name": ..., "options": ...}``;
    onnxruntime tries them in order, the CPU provider taking the nodes the others refuse.
    ``fallback``: drop providers not available here (with a ``ProviderFallbackWarning``)
    instead of raising ``BackendUnavailableError``. ``enable_mem_arena`` and
    ``enable_mem_pattern`` are onnxruntime's defaults (on); ``allow_spinning`` is off.
    Why each default is what it is: docs/backends.md.
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
        fallback: bool = False,
    ) -> None:
        ort = _ort()
        self.fallback = bool(fallback)
        self.requested_providers = normalize_providers(providers)
        self.providers, self.dropped_providers = check_available(
            self.requested_providers, ort.get_available_providers(), fallback=self.fallback
        )
        if self.dropped_providers:
            warnings.warn(
                f"onnxruntime: provider(s) {self.dropped_providers} not available here, dropped "
                f"(fallback: true); running on {provider_names(self.providers)}",
                ProviderFallbackWarning,
                stacklevel=2,
            )
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

    @classmethod
    def option_problems(cls, options: Mapping[str, Any]) -> list[str]:
        """Malformed options a device profile can be told about without constructing the
        backend (so without the providers being here): ``options.providers[1]: why``."""
        if "providers" not in options:
            return []
        return [f"options.{p}" for p in provider_problems(options["providers"])]

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
        names = {p if isinstance(p, str) else p[0] for p in self.providers} | {CPU_PROVIDER}
        return unsupported_ops(model, frozenset(names))

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
            raise load_error(self.name, src.name, exc) from exc
        seconds = time.perf_counter() - t0
        memory = max(0, rss_bytes() - before)
        # which providers really took the session (a requested one may have declined to
        # register, e.g. a GPU provider without its driver: onnxruntime only warns)
        registered = list(session.get_providers())
        unregistered = [n for n in provider_names(self.providers) if n not in registered]
        if unregistered and not self.fallback:
            del session
            raise BackendUnavailableError(
                f"{src.name}: onnxruntime did not register provider(s) {unregistered} (only "
                f"{registered}): their libraries or driver failed to load (run with "
                f"log_severity_level: 1 to see why); {install_hint(unregistered)}; "
                f"or set fallback: true to run on the CPU anyway"
            )
        used = assignment_counts(session)
        fallback, reason = fallback_report(
            provider_names(self.requested_providers), registered, used, dropped=self.dropped_providers
        )
        if fallback:
            warnings.warn(f"{src.name}: {reason}", ProviderFallbackWarning, stacklevel=2)
        return LoadedBlock(
            block_id=src.name,
            backend=self.name,
            input_names=[i.name for i in session.get_inputs()],
            output_names=[o.name for o in session.get_outputs()],
            handle=session,
            memory_bytes=memory,
            load_seconds=seconds,
            info=self._block_info(registered, used, fallback, reason),
        )

    def _block_info(
        self, registered: list[str], used: dict[str, int] | None, fallback: bool, reason: str | None
    ) -> dict[str, Any]:
        return {
            "providers": registered,
            # provider -> nodes it runs (after graph optimizations); None: this
            # onnxruntime cannot say
            "providers_used": used,
            "fallback": fallback,
            "fallback_reason": reason,
            "dropped_providers": list(self.dropped_providers),
            "intra_op_threads": self.intra_op_threads,
            "cores": self.cores,
        }

    def providers_used(self, block: LoadedBlock) -> dict[str, int]:
        """Provider -> number of the block's nodes it runs (after graph optimizations).

        From onnxruntime's record of its graph partitioning, taken at load. Raises
        ``BackendError`` when this onnxruntime cannot report it.
        """
        used = block.info.get("providers_used")
        if used is None:
            raise BackendError(
                f"block {block.block_id}: onnxruntime {_ort().__version__} cannot report which "
                f"provider runs which node (no get_provider_graph_assignment_info)"
            )
        return dict(used)

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
        """Drop the session: its last reference goes, and onnxruntime frees its weights at once.

        No ``gc.collect()``: the session holds no reference cycle (tests/test_unload_memory.py
        checks that RSS comes back without one), and a collection costs 50-100 ms in a
        process holding many blocks, which made every switch slower than a reload.
        """
        mark_released(block)

    def describe(self) -> dict[str, Any]:
        ort = _ort()
        return {
            "backend": self.name,
            "version": ort.__version__,
            "device": ort.get_device(),
            "providers": [p if isinstance(p, str) else [p[0], dict(p[1])] for p in self.providers],
            "dropped_providers": list(self.dropped_providers),
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
        # Keep which provider runs which node, to detect silent CPU fallback. Cheap: a
        # list of node names kept at session creation; unknown keys are ignored by
        # onnxruntime versions that predate it.
        opts.add_session_config_entry(ASSIGNMENT_KEY, "1")
        if self.cores and self.intra_op_threads > 1:
            # One entry per pool thread beyond the caller; ids are 1-based ("1" = CPU 0).
            # The caller itself is pinned by the worker via pin_current_thread().
            spread = [self.cores[i % len(self.cores)] + 1 for i in range(1, self.intra_op_threads)]
            opts.add_session_config_entry(
                "session.intra_op_thread_affinities", ";".join(str(c) for c in spread)
            )
        return opts
