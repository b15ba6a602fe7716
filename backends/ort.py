"""onnxruntime: the reference backend, with any of its execution providers.

Threads and cores. With ``intra_op_threads=1`` onnxruntime creates no intra-op pool:
every kernel runs on the thread that calls ``run`` (measured: all CPU time lands on the
caller). So a processor "onnxruntime on core 1" is a worker thread that called
``pin_current_thread()`` and runs its blocks. With more intra-op threads the pool's
extra threads (all but the first: the caller is the first) are pinned through the
session option ``session.intra_op_thread_affinities``, whose processor ids are
1-based. ``inter_op_threads`` only matters in parallel execution mode, which this
backend does not use (blocks are chains; sequential is faster and predictable).

Execution providers. A device profile lists them in order of preference under
``options.providers``; each entry is one of (YAML)::

    providers:
      - tensorrt                                   # a name: an alias or onnxruntime's own name
      - [cuda, {device_id: 0}]                     # [name, options]
      - {name: TensorrtExecutionProvider,          # {name: ..., options: ...}
         options: {trt_engine_cache_enable: true, trt_engine_cache_path: /var/cache/trt}}
      - cpu

Aliases (case-insensitive) are in ``PROVIDER_ALIASES``: ``cpu``, ``cuda``, ``tensorrt``
(``trt``), ``openvino``, ``qnn``, ``coreml``, ``xnnpack``, ``directml``, ... Option values
are scalars; onnxruntime receives them as text (``str(value)``, so ``true`` becomes
``"True"``), as its own Python API does. A provider this onnxruntime cannot run raises
``BackendUnavailableError`` naming it and the package to install, unless
``fallback=True``, which drops it (with a ``ProviderFallbackWarning``) and runs on what
is left, down to the CPU provider.

Silent CPU fallback is reported, never hidden: onnxruntime itself only warns when a
requested provider fails to register (missing driver or libraries), and places on the
CPU provider every node an accelerator declines. After each load, ``info["providers"]``
lists the providers the session registered, ``info["providers_used"]`` counts the
block's nodes (after onnxruntime's graph optimizations) per provider, from onnxruntime's
graph-assignment record (``session.record_ep_graph_assignment_info``), and
``info["fallback"]`` is True when a requested non-CPU provider runs none of them.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import warnings
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
from loom.core.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    ModelError,
    UnsupportedOpsError,
)

Provider = str | tuple[str, dict[str, Any]]

CPU_PROVIDER = "CPUExecutionProvider"

#: friendly names a device profile may use (lower case) -> onnxruntime's provider names
PROVIDER_ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "ov": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}

#: what to install to get a provider (onnxruntime's CPU wheel has only CPU and Azure).
#: The accelerator wheels replace the plain one (they share the module name): uninstall
#: ``onnxruntime`` first.
PROVIDER_PACKAGES: dict[str, str] = {
    "CUDAExecutionProvider": "pip install onnxruntime-gpu (needs the CUDA and cuDNN libraries; "
    "on Jetson, the JetPack build of onnxruntime-gpu)",
    "TensorrtExecutionProvider": "pip install onnxruntime-gpu and the TensorRT libraries "
    "(on Jetson, JetPack ships TensorRT; use the JetPack build of onnxruntime-gpu)",
    "OpenVINOExecutionProvider": "pip install onnxruntime-openvino",
    "QNNExecutionProvider": "pip install onnxruntime-qnn (Windows on Snapdragon); on Android, "
    "the onnxruntime-android-qnn package",
    "DmlExecutionProvider": "pip install onnxruntime-directml (Windows)",
    "CoreMLExecutionProvider": "the macOS/iOS build of onnxruntime (pip install onnxruntime on a Mac)",
    "XnnpackExecutionProvider": "an onnxruntime built with --use_xnnpack (the Android and iOS "
    "packages include it)",
    "NnapiExecutionProvider": "the onnxruntime-android package (Android only)",
    "MIGraphXExecutionProvider": "pip install onnxruntime-migraphx (AMD ROCm)",
    "DnnlExecutionProvider": "an onnxruntime built with --use_dnnl",
    "WebGpuExecutionProvider": "pip install onnxruntime-webgpu",
}

#: session option that makes onnxruntime keep which provider runs which node
_ASSIGNMENT_KEY = "session.record_ep_graph_assignment_info"


class ProviderFallbackWarning(UserWarning):
    """A requested execution provider was dropped, or runs none of a block's nodes: CPU runs them."""

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

    ``providers`` entries are a provider name (or alias), ``(name, options)`` or
    ``{"name": ..., "options": ...}`` (see the module docstring); onnxruntime tries them
    in order and falls back to the CPU provider for nodes the others refuse.
    ``fallback``: drop requested providers this onnxruntime cannot run (reported in a
    ``ProviderFallbackWarning``, ``describe()`` and each block's ``info``) instead of
    raising ``BackendUnavailableError``; off by default, because a profile measured on
    the CPU under a GPU processor's name is worse than no profile.
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
        fallback: bool = False,
    ) -> None:
        ort = _ort()
        self.fallback = bool(fallback)
        self.requested_providers = normalize_providers(providers)
        self.providers, self.dropped_providers = _check_available(
            self.requested_providers, ort.get_available_providers(), fallback=self.fallback
        )
        if self.dropped_providers:
            warnings.warn(
                f"onnxruntime: provider(s) {self.dropped_providers} not available here, dropped "
                f"(fallback: true); running on {_names(self.providers)}",
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
        # which providers really took the session (a requested one may have declined to
        # register, e.g. a GPU provider without its driver: onnxruntime only warns)
        registered = list(session.get_providers())
        unregistered = [n for n in _names(self.providers) if n not in registered]
        if unregistered and not self.fallback:
            del session
            raise BackendUnavailableError(
                f"{src.name}: onnxruntime did not register provider(s) {unregistered} (only "
                f"{registered}): their libraries or driver failed to load (run with "
                f"log_severity_level: 1 to see why); {_install_hint(unregistered)}; "
                f"or set fallback: true to run on the CPU anyway"
            )
        used = _assignment(session)
        fallback, reason = fallback_report(
            _names(self.requested_providers), registered, used, dropped=self.dropped_providers
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
            info={
                "providers": registered,
                # provider -> nodes it runs (after graph optimizations); None: this
                # onnxruntime cannot say
                "providers_used": used,
                "fallback": fallback,
                "fallback_reason": reason,
                "dropped_providers": list(self.dropped_providers),
                "intra_op_threads": self.intra_op_threads,
                "cores": self.cores,
            },
        )

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
        opts.add_session_config_entry(_ASSIGNMENT_KEY, "1")
        if self.cores and self.intra_op_threads > 1:
            # One entry per pool thread beyond the caller; ids are 1-based ("1" = CPU 0).
            # The caller itself is pinned by the worker via pin_current_thread().
            spread = [self.cores[i % len(self.cores)] + 1 for i in range(1, self.intra_op_threads)]
            opts.add_session_config_entry(
                "session.intra_op_thread_affinities", ";".join(str(c) for c in spread)
            )
        return opts


def resolve_provider_name(name: str) -> str:
    """An alias (``cuda``) or any spelling of a provider's name -> onnxruntime's name.

    Names neither an alias nor known to this onnxruntime are returned unchanged: the
    availability check names them (a newer provider may be unknown to an older build).
    """
    key = name.strip()
    alias = PROVIDER_ALIASES.get(key.lower())
    if alias:
        return alias
    known = {*PROVIDER_ALIASES.values(), *_all_providers()}
    by_lower = {k.lower(): k for k in known}
    return by_lower.get(key.lower(), key)


def provider_problems(providers: Any) -> list[str]:
    """Every malformed entry of a ``providers`` option, as ``providers[i]: why``.

    Checks the form only (no onnxruntime needed), so that a device profile of another
    machine is validated here: availability is a question for the machine that runs it.
    """
    if isinstance(providers, str):
        providers = [providers]
    if not isinstance(providers, Sequence):
        return [f"providers: expected a list of providers, got {type(providers).__name__} {providers!r}"]
    if not providers:
        return ["providers: empty; list at least one provider (e.g. cpu)"]
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(providers):
        where = f"providers[{i}]"
        name, options, problem = _split_entry(entry)
        if problem:
            problems.append(f"{where}: {problem}, got {entry!r}")
            continue
        assert name is not None and options is not None
        for key, value in options.items():
            if not isinstance(key, str) or not key:
                problems.append(f"{where}.options: option names are text, got {key!r}")
            elif value is None or not isinstance(value, (str, int, float, bool)):
                problems.append(
                    f"{where}.options.{key}: a provider option is a scalar (text, number or "
                    f"true/false), got {value!r}"
                )
        resolved = resolve_provider_name(name)
        if resolved in seen:
            problems.append(f"{where}: {resolved} is already providers[{seen[resolved]}]")
        seen.setdefault(resolved, i)
    return problems


def _split_entry(entry: Any) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(name, options, None) of one provider entry, or (None, None, why it is malformed)."""
    form = "a provider is a name, [name, {options}] or {name: ..., options: {...}}"
    if isinstance(entry, str):
        return (entry, {}, None) if entry.strip() else (None, None, "empty provider name")
    if isinstance(entry, (tuple, list)):
        if len(entry) != 2 or not isinstance(entry[0], str) or not entry[0].strip():
            return None, None, form
        if entry[1] is None:
            return entry[0], {}, None
        if not isinstance(entry[1], Mapping):
            return None, None, f"the options of [name, options] must be a mapping ({form})"
        return entry[0], dict(entry[1]), None
    if isinstance(entry, Mapping):
        unknown = sorted(str(k) for k in entry if k not in ("name", "options"))
        if unknown:
            return None, None, f"unknown key(s) {unknown}: {form}"
        name, options = entry.get("name"), entry.get("options")
        if not isinstance(name, str) or not name.strip():
            return None, None, f"'name' must be a provider name ({form})"
        if options is None:
            return name, {}, None
        if not isinstance(options, Mapping):
            return None, None, f"'options' must be a mapping ({form})"
        return name, dict(options), None
    return None, None, form


def normalize_providers(providers: Any) -> list[Provider]:
    """Entries in any accepted form -> onnxruntime's: a name, or ``(name, options)``.

    Aliases are resolved; ``ConfigError`` lists every malformed entry with its index.
    """
    problems = provider_problems(providers)
    if problems:
        raise ConfigError("onnxruntime: " + "; ".join(problems))
    if isinstance(providers, str):
        providers = [providers]
    result: list[Provider] = []
    for entry in providers:
        name, options, _ = _split_entry(entry)
        assert name is not None and options is not None
        resolved = resolve_provider_name(name)
        # a bare name stays a bare name: describe() (a fingerprint) reads as it did
        result.append((resolved, options) if options or not isinstance(entry, str) else resolved)
    return result


def _check_available(
    providers: list[Provider], available: Sequence[str], *, fallback: bool
) -> tuple[list[Provider], list[str]]:
    """(providers to use, providers dropped); ``BackendUnavailableError`` when one is missing
    and ``fallback`` is off."""
    missing = [n for n in _names(providers) if n not in available]
    if not missing:
        return providers, []
    if not fallback:
        raise BackendUnavailableError(
            f"onnxruntime provider(s) {missing} not available here; this onnxruntime has "
            f"{list(available)}. {_install_hint(missing)}; or set fallback: true to drop "
            f"them and run on the providers that are here"
        )
    kept = [p for p in providers if _name(p) not in missing]
    return (kept or [CPU_PROVIDER]), missing


def _install_hint(names: Sequence[str]) -> str:
    hints = []
    for n in names:
        package = PROVIDER_PACKAGES.get(n)
        if package:
            hints.append(f"for {n}: {package}")
        elif n in _all_providers():
            hints.append(f"for {n}: an onnxruntime package or build that includes it")
        else:
            known = sorted({*PROVIDER_ALIASES, *_all_providers()})
            hints.append(f"{n} is not a provider this onnxruntime knows (names and aliases: {known})")
    return "; ".join(hints)


def fallback_report(
    requested: Sequence[str],
    registered: Sequence[str],
    used: Mapping[str, int] | None,
    *,
    dropped: Sequence[str] = (),
) -> tuple[bool, str | None]:
    """Whether a requested non-CPU provider runs none of a block's nodes, and why.

    Three ways it happens: dropped for being unavailable (``fallback``), not registered
    by onnxruntime (its libraries failed to load), or registered but handed no node
    (it supports none of the block's ops, or declined the graph). With ``used``
    unknown only the first two can be seen. A block without nodes cannot fall back.
    """
    reasons: list[str] = []
    total = sum(used.values()) if used is not None else None
    for name in requested:
        if name == CPU_PROVIDER:
            continue
        if name in dropped:
            reasons.append(f"{name} is not available here (dropped)")
        elif name not in registered:
            reasons.append(f"{name} did not register (its libraries or driver failed to load)")
        elif used is not None and total and not used.get(name):
            reasons.append(f"{name} runs none of the {total} nodes")
    if not reasons:
        return False, None
    cpu = f"{used.get(CPU_PROVIDER, 0)} of {total} nodes" if used is not None and total else "the nodes"
    return True, "silent CPU fallback: " + "; ".join(reasons) + f"; {CPU_PROVIDER} runs {cpu}"


def _assignment(session: Any) -> dict[str, int] | None:
    """Provider -> nodes it was given, from onnxruntime's record; None when it has none."""
    get = getattr(session, "get_provider_graph_assignment_info", None)
    if get is None:
        return None
    try:
        subgraphs = get()
    except Exception:  # the record was not kept (an onnxruntime that ignores the key)
        return None
    counts: dict[str, int] = {}
    for sub in subgraphs:
        counts[sub.ep_name] = counts.get(sub.ep_name, 0) + len(sub.get_nodes())
    return counts


def _name(p: Provider) -> str:
    return p if isinstance(p, str) else p[0]


def _names(providers: Sequence[Provider]) -> list[str]:
    return [_name(p) for p in providers]


@lru_cache(maxsize=1)
def _all_providers() -> tuple[str, ...]:
    """Every provider name this onnxruntime knows of (built in or not); empty without it."""
    try:
        return tuple(_ort().get_all_providers())
    except ImportError:
        return ()


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
