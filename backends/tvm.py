"""Apache TVM: blocks compiled ahead of time (Relax), cached on disk, run by the Relax VM.

``tvm`` is optional: it is imported on first use through ``loom.core.compat.require``, so
importing this module costs nothing and a missing package says what to install. Written
against apache-tvm 0.27 (``pip install 'sparseloom[tvm]'``). Helpers beside it:
``_tvm_targets`` (targets, options), ``_tvm_compile`` (ONNX to executable),
``_tvm_cache`` (the compiled-block cache). Targets, schedules, threads: docs/backends.md.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends._tvm_cache import (
    CACHE_FORMAT,
    block_hash,
    cache_entry_ok,
    cache_key,
    default_cache_dir,
    export,
    read_meta,
)
from backends._tvm_compile import Compiler, inline, summary, unsupported
from backends._tvm_targets import (
    DEVICE_KINDS,
    SCHEDULES,
    available_targets,
    check_tuning_log,
    device_exists,
    host_cpu,
    option_problems,
    target_spec,
    targets_text,
    tvm_module,
)
from backends.base import (
    Backend,
    LoadedBlock,
    ModelSource,
    as_declared,
    check_cores,
    check_resident,
    graph_inputs,
    mark_released,
    output_dtypes,
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
    "DEVICE_KINDS",
    "SCHEDULES",
    "TvmBackend",
    "available_targets",
    "default_cache_dir",
    "host_cpu",
    "option_problems",
]

_lock = threading.Lock()
_warmed: set[str] = set()
_thread_state = threading.local()


@dataclass
class _Vm:
    """What a loaded block holds: the Relax VM over its library, and how to call it.

    A VM is not safe to call from two threads at once (it keeps per-call state); the
    lock makes a block shared by two workers correct and costs nothing uncontended.
    """

    vm: Any
    module: Any
    device: Any
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, np.dtype]
    lock: threading.Lock


@dataclass
class _Built:
    """A block compiled by this load: the executable (dropped once opened), what its
    kernels got as schedules, how long it took, and where it was cached (or why not)."""

    executable: Any
    schedules: dict[str, Any]
    seconds: float
    library: Path | None
    cache_error: str | None


class TvmBackend(Backend):
    """TVM (Relax) on one target: compiled once per block and target, cached on disk.

    ``target``: a JSON dict (``{"kind": "cuda"}``), a bare kind name (``"cuda"``), or
    None for the host CPU. ``threads``: compute threads of a ``run`` (docs/backends.md).
    ``cache_dir``: where compiled blocks are kept (None: the default,
    ``default_cache_dir()``); ``cache=False`` compiles every load. ``schedule``:
    ``"default"`` or ``"sampled"`` (drawn with ``seed``); ``tuning_log``: a MetaSchedule
    database directory.
    ``batch_size``: fixes the symbolic leading dimension of every graph input (static
    shapes; needed by ``"sampled"`` and ``tuning_log``); None keeps it symbolic.
    ``opt_level``: TVM's ``PassContext`` optimization level (0-3).
    """

    name = "tvm"

    def __init__(
        self,
        *,
        target: Mapping[str, Any] | str | None = None,
        threads: int = 1,
        cores: list[int] | None = None,
        cache_dir: str | Path | None = None,
        cache: bool = True,
        tuning_log: str | Path | None = None,
        schedule: str = "default",
        batch_size: int | None = None,
        seed: int = 42,
        opt_level: int = 3,
        device_id: int = 0,
    ) -> None:
        tvm = tvm_module()  # MissingDependencyError (an ImportError) saying what to pip install
        problems = option_problems(
            {
                "target": target,
                "threads": threads,
                "cache_dir": cache_dir,
                "cache": cache,
                "tuning_log": tuning_log,
                "schedule": schedule,
                "batch_size": batch_size,
                "seed": seed,
                "opt_level": opt_level,
                "device_id": device_id,
            }
        )
        if problems:
            raise ConfigError("tvm: " + "; ".join(problems))
        self.threads = threads
        self.cores = check_cores(cores)
        self.opt_level = opt_level
        self.schedule = schedule
        self.batch_size = batch_size
        self.seed = seed
        self.device_id = device_id
        self.tuning_log, self._tuning_hash = check_tuning_log(tuning_log)
        self._resolve_target(tvm, target)
        self.cache = bool(cache)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        if self.cache:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"tvm: cache_dir {str(self.cache_dir)!r} cannot be created: {exc}") from exc
        # TVM would pin its pool threads (and re-pin the caller) to cores of its choosing
        os.environ.setdefault("TVM_BIND_THREADS", "0")
        self._version = str(tvm.__version__)
        self._target_text = str(self.target)
        self.compiler = Compiler(
            target=self.target, target_text=self._target_text, opt_level=opt_level,
            schedule=schedule, batch_size=batch_size, seed=seed, tuning_log=self.tuning_log,
            tuning_hash=self._tuning_hash,
        )  # fmt: skip

    def _resolve_target(self, tvm: Any, target: Mapping[str, Any] | str | None) -> None:
        """Set ``target_spec``, ``target`` and ``device``: a valid target whose device is here."""
        self.target_spec = target_spec(target, self.threads)
        try:
            self.target = tvm.target.Target(self.target_spec)
        except Exception as exc:
            raise ConfigError(f"tvm: target {self.target_spec!r} is not a valid TVM target: {exc}") from exc
        kind = self.target.kind.name
        self.device = tvm.device(DEVICE_KINDS[kind], self.device_id)
        if not device_exists(self.device):
            raise BackendUnavailableError(
                f"tvm: no {DEVICE_KINDS[kind]} device {self.device_id} here for target {kind!r}; "
                f"{targets_text()}"
            )
        if kind == "cuda" and "arch" not in self.target_spec:
            # the GPU's own architecture, so that it is part of the cache key: a library
            # compiled for another GPU generation must not be reused
            with contextlib.suppress(Exception):
                arch = "sm_" + str(self.device.compute_version).replace(".", "")
                self.target = tvm.target.Target({**self.target_spec, "arch": arch})
                self.target_spec["arch"] = arch

    @classmethod
    def option_problems(cls, options: Mapping[str, Any]) -> list[str]:
        """Malformed options a device profile can be told about without TVM being here
        (a Jetson's profile checked on a laptop): ``options.threads: why``."""
        return [f"options.{p}" for p in option_problems(options)]

    # --- protocol -------------------------------------------------------------------

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            tvm = tvm_module()
            targets = available_targets()
        except ImportError as exc:  # MissingDependencyError included
            return False, str(exc)
        except Exception as exc:  # a broken install (a missing shared library, ...)
            return False, f"tvm is installed but does not start: {type(exc).__name__}: {exc}"
        if not targets:
            return False, f"tvm {tvm.__version__} can compile for no device here (no LLVM, no GPU)"
        return True, f"tvm {tvm.__version__}, targets {targets}"

    def unsupported_ops(self, model: onnx.ModelProto) -> list[str]:
        """Every op the Relax ONNX frontend has no converter for, ``If`` bodies included.

        Checked against the frontend's own table (``_get_convert_map``), so every bad op
        is listed at once. The frontend looks converters up by op type alone, so ops of
        domains other than ONNX's and ``com.microsoft`` (whose contrib ops it has a few
        of) are unsupported even when their name matches an ONNX op. Model-local
        functions are inlined first, as the load does. Converters that refuse only some
        attribute values (``Conv`` beyond 3-D, ...) are found at load (a ``BackendError``).
        """
        src = model if isinstance(model, ModelSource) else read_source(model)
        return unsupported(inline(src.proto))

    def load(
        self, model: onnx.ModelProto | str | Path | bytes, *, block_id: str | None = None
    ) -> LoadedBlock:
        """Check, then load from the cache or convert, compile and cache; then open a VM.

        ``memory_bytes`` is the RSS growth across opening the compiled library and
        creating the VM (which uploads the constants): the same window on a cache hit
        and a miss. ``info["cache_hit"]`` says whether compilation was skipped.
        """
        t0 = time.perf_counter()
        src = read_source(model, block_id)
        proto = inline(src.proto)
        bad = unsupported(proto)
        if bad:
            raise UnsupportedOpsError(self.name, src.name, bad)
        inputs = graph_inputs(proto)
        outputs = [o.name for o in proto.graph.output]
        digest = block_hash(src)
        key = self._cache_key(digest)
        self._warm_up()
        entry = self.cache_dir / f"{key}.so" if self.cache else None
        opened, built = self._open_or_build(src, proto, key, digest, inputs, outputs, entry)
        vm, module, memory = opened
        handle = _Vm(vm, module, self.device, inputs, outputs, output_dtypes(proto), threading.Lock())
        return LoadedBlock(
            block_id=src.name,
            backend=self.name,
            input_names=inputs,
            output_names=outputs,
            handle=handle,
            memory_bytes=memory,
            load_seconds=time.perf_counter() - t0,
            info=self._block_info(entry, built, digest),
        )

    def run(self, block: LoadedBlock, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        handle: _Vm = check_resident(block)
        inputs = select_feeds(block, feeds)
        tvm = tvm_module()
        self._configure_thread()
        with handle.lock:
            try:
                args = [tvm.runtime.tensor(_contiguous(inputs[n]), handle.device) for n in handle.inputs]
                result = handle.vm["main"](*args)
                values = _flatten(result)
                out: dict[str, np.ndarray] = {}
                for name, value in zip(handle.outputs, values, strict=True):
                    # a copy (the VM reuses its buffers on the next call), read at the
                    # declared dtype: by value, or by bits for types numpy lacks
                    out[name] = as_declared(_numpy(value), handle.dtypes[name])
            except Exception as exc:
                hint = ""
                if self.batch_size is not None:
                    hint = f" (compiled for batch_size={self.batch_size}: shapes are static)"
                raise BackendError(
                    f"block {block.block_id} on {self.name} ({self.target.kind.name}) failed{hint}: "
                    f"{type(exc).__name__}: {summary(exc)}"
                ) from exc
        return out

    def release(self, block: LoadedBlock) -> None:
        """Drop the VM and its library: TVM frees the constants when they are collected."""
        handle = block.handle
        mark_released(block)
        if isinstance(handle, _Vm):
            handle.vm = None
            handle.module = None
        del handle
        gc.collect()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "version": self._version,
            "target": self._target_text,
            "device": str(self.device),
            "threads": self.threads,
            "cores": self.cores,
            "opt_level": self.opt_level,
            "schedule": self.schedule,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "tuning_log": str(self.tuning_log) if self.tuning_log else None,
            "tuning_log_hash": self._tuning_hash,
        }

    def cache_path(self, model: onnx.ModelProto | str | Path | bytes) -> Path:
        """Where the compiled library of ``model`` for this target and these options lives."""
        return self.cache_dir / f"{self._cache_key(block_hash(read_source(model)))}.so"

    # --- internals ------------------------------------------------------------------

    def _open_or_build(
        self,
        src: ModelSource,
        proto: onnx.ModelProto,
        key: str,
        digest: str,
        inputs: list[str],
        outputs: list[str],
        entry: Path | None,
    ) -> tuple[tuple[Any, Any, int], _Built | None]:
        """((VM, module, memory), what was built or None on a cache hit)."""
        if entry is not None and cache_entry_ok(entry, key):
            with contextlib.suppress(BackendError):  # a library that no longer loads (another TVM, truncated)
                return self._measured_open(entry, None, src.name), None
        built = self._build(src, proto, key, digest, inputs, outputs, entry)
        with contextlib.ExitStack() as stack:
            library = built.library or self._temporary_library(built.executable, stack)
            opened = self._measured_open(library, built.executable, src.name)
        built.executable = None
        return opened, built

    def _block_info(self, entry: Path | None, built: _Built | None, digest: str) -> dict[str, Any]:
        cached = built is None or built.library is not None
        if built is not None:
            schedules = built.schedules
        else:  # a cache hit: the entry's meta says what its kernels got
            assert entry is not None
            schedules = read_meta(entry.with_suffix(".json")).get("schedules")
        return {
            "target": self._target_text,
            "device": str(self.device),
            "cache_hit": built is None,
            "cache_path": str(entry) if entry is not None and cached else None,
            "cache_error": built.cache_error if built else None,
            "block_hash": digest,
            "compile_seconds": built.seconds if built else 0.0,
            "schedule": self.schedule,
            "tuning_log": str(self.tuning_log) if self.tuning_log else None,
            # kernels, and how many got tuned / sampled schedules / none
            "schedules": schedules,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "cores": self.cores,
        }

    def _build(
        self,
        src: ModelSource,
        proto: onnx.ModelProto,
        key: str,
        digest: str,
        inputs: list[str],
        outputs: list[str],
        entry: Path | None,
    ) -> _Built:
        """Compile, and export into the cache when there is one (``entry``)."""
        t0 = time.perf_counter()
        executable, schedules = self.compiler.compile(src, proto)
        built = _Built(executable, schedules, time.perf_counter() - t0, None, None)
        if entry is None:
            return built
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "block": src.name,
            "block_hash": digest,
            "tvm": self._version,
            "target": self._target_text,
            "options": self.compiler.options(),
            "inputs": inputs,
            "outputs": outputs,
            "compile_seconds": round(built.seconds, 3),
            "schedules": schedules,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        try:
            export(executable, entry, meta)
            built.library = entry
        except Exception as exc:  # no C compiler or linker, a read-only folder, ...
            built.cache_error = f"{type(exc).__name__}: {summary(exc)}"
        return built

    def _measured_open(self, library: Path | None, executable: Any, name: str) -> tuple[Any, Any, int]:
        """(VM, module, RSS growth across opening them): the memory a block holds."""
        before = rss_bytes()
        vm, module = self._open(library, executable, name)
        return vm, module, max(0, rss_bytes() - before)

    def _cache_key(self, digest: str) -> str:
        return cache_key(
            digest, tvm_version=self._version, target_text=self._target_text,
            kind=self.target.kind.name, options=self.compiler.options(),
        )  # fmt: skip

    def _configure_thread(self) -> None:
        """Size the calling thread's TVM pool (once per thread): see docs/backends.md."""
        if getattr(_thread_state, "threads", None) == self.threads:
            return
        config = tvm_module().get_global_func("runtime.config_threadpool")
        # mode 1 ("big cores"; affinity is left alone with TVM_BIND_THREADS=0); the CPU
        # list only sets the thread's maximum concurrency (its length)
        config(1, self.threads, [str(i) for i in range(self.threads)])
        _thread_state.threads = self.threads

    def _warm_up(self) -> None:
        """Open one tiny library and VM per target before the first measured load, so that
        TVM's one-time start-up (runtime, device API, allocator) is not charged to a block."""
        with _lock:
            if self._target_text in _warmed:
                return
            _warmed.add(self._target_text)
        with contextlib.suppress(Exception), contextlib.ExitStack() as stack:
            src = read_source(warm_model(), "warm-up")
            executable, _ = self.compiler.compile(src, src.proto, defaults_only=True)
            library = self._temporary_library(executable, stack)
            self._open(library, executable, "warm-up")

    def _open(self, library: Path | None, executable: Any, name: str) -> tuple[Any, Any]:
        """A VM over the library file (or, failing that, the in-memory executable)."""
        tvm = tvm_module()
        from tvm import relax

        try:
            module = tvm.runtime.load_module(str(library)) if library is not None else executable
            vm = relax.VirtualMachine(module, self.device)
        except Exception as exc:
            raise BackendError(
                f"{name}: TVM cannot open the compiled block ({library or 'in memory'}): "
                f"{type(exc).__name__}: {summary(exc)}"
            ) from exc
        return vm, module

    def _temporary_library(self, executable: Any, stack: contextlib.ExitStack) -> Path | None:
        """Export to a folder deleted on exit (the loaded library stays mapped); None when
        exporting is impossible here (no C compiler), in which case the executable runs as is."""
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="loom-tvm-"))
        path = Path(folder) / "block.so"
        try:
            executable.export_library(str(path))
        except Exception:
            return None
        return path


def _contiguous(value: Any) -> np.ndarray:
    """A C-contiguous array of the same shape (``np.ascontiguousarray`` makes 0-d arrays 1-d)."""
    array = np.asarray(value)
    return array if array.flags.c_contiguous else np.array(array, order="C")


def _numpy(value: Any) -> np.ndarray:
    """A VM result as numpy: a tensor, or a shape (``R.Shape``, what ``Shape`` and ``Size``
    can return when the frontend computes them at compile time), or a scalar."""
    if hasattr(value, "numpy"):
        return value.numpy()
    try:
        return np.array([int(d) for d in value], dtype=np.int64)
    except TypeError:
        return np.asarray(value)


def _flatten(result: Any) -> list[Any]:
    """The VM returns one tensor, or a tuple (an ``ffi.Array``) of them, possibly nested."""
    if hasattr(result, "numpy") or type(result).__name__ in ("Shape", "ShapeTuple"):
        return [result]  # a tensor, or a shape (``R.Shape``: a tuple of ints)
    values: list[Any] = []
    for item in result:
        values.extend(_flatten(item))
    return values
