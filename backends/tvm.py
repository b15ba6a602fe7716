"""Apache TVM: blocks compiled ahead of time (Relax), cached on disk, run by the Relax VM.

``tvm`` is optional: it is imported on first use through ``loom.core.compat.require``, so
importing this module costs nothing and a missing package says what to install.
Written against apache-tvm 0.27 (``pip install 'sparseloom[tvm]'``), whose Python API
differs from the releases before it (``tvm.compile``, ``tvm.s_tir``, JSON targets).

Flow of a load. The block's ops are checked against the Relax ONNX frontend's own
converter table *before* anything is converted, so every op it cannot take is listed
in one ``UnsupportedOpsError`` (the frontend itself stops at the first graph it
rejects, and does not look inside ``If`` branches). Then, unless the compiled-module
cache already has it: ``relax.frontend.onnx.from_onnx`` with the weights bound as
constants, operator legalization and fusion, schedules (below), ``tvm.compile``, and
``export_library`` into the cache as a shared library plus a small JSON meta file. A
block is always run from the library it was exported to, so the memory a load reports
is the same on a cache hit and a miss: the module and its constants, not the
compiler's working set.

Targets are JSON dicts, as TVM 0.27 wants them (its string form ``"llvm -mcpu=..."`` is
refused): ``{"kind": "llvm", "mcpu": "znver3"}``, ``{"kind": "cuda"}``, ``{"kind":
"opencl"}``. ``None`` (the default) is the host CPU: ``llvm`` with the ``mcpu`` LLVM
detects here. An ``llvm`` target without ``mcpu`` gets the host's too (a block compiled
here runs here), and ``num-cores`` is
set to ``threads``.

Schedules (how each fused kernel's loops are tiled, vectorized, bound to GPU threads):

- ``"default"``: GPU targets get DLight's rules (``tvm.s_tir.dlight``: matmul, GEMV,
  reductions, fallback), without which GPU kernels do not even compile. CPU kernels
  keep the loop nests that operator legalization writes, which LLVM compiles as they
  are: correct, and slow (measured here, one thread: 20-50x onnxruntime's latency).
- ``"sampled"``: one point of MetaSchedule's design space per kernel (tiling,
  vectorization, parallel loops, unrolling, as its default rules for the target lay
  them out), drawn with ``seed``, checked by its post-processors and applied like a
  tuning record, *without measuring anything*: no tuning, the same code for the same
  seed. It is a lottery: on the image-cls CNN here (one thread) seeds 1, 7 and 42 gave
  50, 124 and 19 ms, all faster than ``"default"`` (230 ms) and all slower than
  onnxruntime (4.6 ms). It costs a one-time ~30 s per process (importing
  ``tvm.s_tir.tensor_intrin``, which parses hundreds of TVMScript intrinsics) plus
  ~1 s per block; the disk cache pays that once per block. Needs static shapes: set
  ``batch_size``.
- ``tuning_log``: a MetaSchedule database directory (``database_workload.json`` and
  ``database_tuning_record.json``, as ``tvm.s_tir.meta_schedule`` tuning writes them);
  kernels it has records for get their tuned schedules, the others the schedule above.
  Needs ``batch_size`` too (records are for static shapes). This backend never tunes.

Threads and cores (read from TVM 0.27's runtime sources, ``thread_pool.cc``, and
measured). Compiled kernels call ``TVMBackendParallelLaunch`` for their parallel loops
(only scheduled kernels have any), which runs the loop inline on the calling thread
when that thread's ``MaxConcurrency()`` is 1, and otherwise on a thread pool that
belongs to the calling thread. Both are per thread: ``runtime.config_threadpool``,
called from the thread that will run (this backend does it on each thread's first
``run``), sets them. So with ``threads=1`` every kernel runs on the worker's own thread
and ``pin_current_thread()`` puts the processor on its core, as for onnxruntime; with
more, the pool's threads are started by the pinned worker and inherit its mask.
``TVM_BIND_THREADS=0`` is set (unless already set) because TVM would otherwise pin its
pool threads, and re-pin the calling thread, to cores of its own choosing.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import platform
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.base import (
    Backend,
    LoadedBlock,
    ModelSource,
    check_cores,
    check_resident,
    mark_released,
    op_label,
    output_dtypes,
    read_source,
    rss_bytes,
    select_feeds,
    warm_model,
)
from loom.core import compat
from loom.core.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    ModelError,
    UnsupportedOpsError,
)

SCHEDULES = ("default", "sampled")
#: target kind -> TVM device type, for the kinds this backend knows how to run
DEVICE_KINDS = {
    "llvm": "cpu",
    "cuda": "cuda",
    "opencl": "opencl",
    "vulkan": "vulkan",
    "metal": "metal",
    "rocm": "rocm",
}
#: ops the frontend handles outside its converter table (``If`` in ``_construct_nodes``)
_DIRECT_OPS = {"If", "Constant"}
#: ONNX domains whose ops the frontend looks up by type alone; any other domain is unsupported
_DOMAINS = {"", "com.microsoft"}
#: bump when what a cache entry holds changes, so that old entries are not reused
_CACHE_FORMAT = 1
_MS_FILES = ("database_workload.json", "database_tuning_record.json")
_SAMPLE_TRIES = 8
_SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled")

_lock = threading.Lock()
_warmed: set[str] = set()
_thread_state = threading.local()


def _tvm() -> Any:
    return compat.require("tvm")


def default_cache_dir() -> Path:
    """``$SPARSELOOM_TVM_CACHE``, else ``$XDG_CACHE_HOME/sparseloom/tvm`` (``~/.cache/...``)."""
    env = os.environ.get("SPARSELOOM_TVM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparseloom" / "tvm"


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
    None for the host CPU. ``threads``: compute threads of a ``run`` (see the module
    docstring). ``cache_dir``: where compiled blocks are kept (None: the default,
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
        tvm = _tvm()  # MissingDependencyError (an ImportError) saying what to pip install
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
        self.tuning_log, self._tuning_hash = _check_tuning_log(tuning_log)
        self.target_spec = _target_spec(target, threads)
        try:
            self.target = tvm.target.Target(self.target_spec)
        except Exception as exc:
            raise ConfigError(f"tvm: target {self.target_spec!r} is not a valid TVM target: {exc}") from exc
        kind = self.target.kind.name
        self.device = tvm.device(DEVICE_KINDS[kind], device_id)
        if not _device_exists(self.device):
            raise BackendUnavailableError(
                f"tvm: no {DEVICE_KINDS[kind]} device {device_id} here for target {kind!r}; "
                f"{_targets_text()}"
            )
        if kind == "cuda" and "arch" not in self.target_spec:
            # the GPU's own architecture, so that it is part of the cache key: a library
            # compiled for another GPU generation must not be reused
            with contextlib.suppress(Exception):
                arch = "sm_" + str(self.device.compute_version).replace(".", "")
                self.target = tvm.target.Target({**self.target_spec, "arch": arch})
                self.target_spec["arch"] = arch
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

    @classmethod
    def option_problems(cls, options: Mapping[str, Any]) -> list[str]:
        """Malformed options a device profile can be told about without TVM being here
        (a Jetson's profile checked on a laptop): ``options.threads: why``."""
        return [f"options.{p}" for p in option_problems(options)]

    # --- protocol -------------------------------------------------------------------

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            tvm = _tvm()
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
        return _unsupported(_inline(src.proto))

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
        proto = _inline(src.proto)
        bad = _unsupported(proto)
        if bad:
            raise UnsupportedOpsError(self.name, src.name, bad)
        inputs = _graph_inputs(proto)
        outputs = [o.name for o in proto.graph.output]
        block_hash = _block_hash(src)
        key = self._cache_key(block_hash)
        self._warm_up()
        entry = self.cache_dir / f"{key}.so" if self.cache else None
        built: _Built | None = None
        hit = entry is not None and _cache_entry_ok(entry, key)
        if hit:
            assert entry is not None
            try:
                opened = self._measured_open(entry, None, src.name)
            except BackendError:  # a library that no longer loads (another TVM, truncated)
                hit = False
        if not hit:
            built = self._build(src, proto, key, block_hash, inputs, outputs, entry)
            with contextlib.ExitStack() as stack:
                library = built.library or self._temporary_library(built.executable, stack)
                opened = self._measured_open(library, built.executable, src.name)
            built.executable = None
        vm, module, memory = opened
        handle = _Vm(vm, module, self.device, inputs, outputs, output_dtypes(proto), threading.Lock())
        cached = built is None or built.library is not None
        return LoadedBlock(
            block_id=src.name,
            backend=self.name,
            input_names=inputs,
            output_names=outputs,
            handle=handle,
            memory_bytes=memory,
            load_seconds=time.perf_counter() - t0,
            info={
                "target": self._target_text,
                "device": str(self.device),
                "cache_hit": hit,
                "cache_path": str(entry) if entry is not None and cached else None,
                "cache_error": built.cache_error if built else None,
                "block_hash": block_hash,
                "compile_seconds": built.seconds if built else 0.0,
                "schedule": self.schedule,
                "tuning_log": str(self.tuning_log) if self.tuning_log else None,
                # kernels, and how many got tuned / sampled schedules / none
                "schedules": built.schedules if built else _read_meta(entry.with_suffix(".json")).get("schedules"),
                "batch_size": self.batch_size,
                "threads": self.threads,
                "cores": self.cores,
            },
        )

    def run(self, block: LoadedBlock, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        handle: _Vm = check_resident(block)
        inputs = select_feeds(block, feeds)
        tvm = _tvm()
        self._configure_thread()
        with handle.lock:
            try:
                args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[n]), handle.device) for n in handle.inputs]
                result = handle.vm["main"](*args)
                values = _flatten(result)
                out: dict[str, np.ndarray] = {}
                for name, value in zip(handle.outputs, values, strict=True):
                    arr = value.numpy()  # a copy: the VM reuses its buffers on the next call
                    want = handle.dtypes[name]
                    out[name] = arr if arr.dtype == want else arr.astype(want)
            except Exception as exc:
                hint = ""
                if self.batch_size is not None:
                    hint = f" (compiled for batch_size={self.batch_size}: shapes are static)"
                raise BackendError(
                    f"block {block.block_id} on {self.name} ({self.target.kind.name}) failed{hint}: "
                    f"{type(exc).__name__}: {_summary(exc)}"
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
        return self.cache_dir / f"{self._cache_key(_block_hash(read_source(model)))}.so"

    # --- internals ------------------------------------------------------------------

    def _build(
        self,
        src: ModelSource,
        proto: onnx.ModelProto,
        key: str,
        block_hash: str,
        inputs: list[str],
        outputs: list[str],
        entry: Path | None,
    ) -> _Built:
        """Compile, and export into the cache when there is one (``entry``)."""
        t0 = time.perf_counter()
        executable, schedules = self._compile(src, proto)
        built = _Built(executable, schedules, time.perf_counter() - t0, None, None)
        if entry is None:
            return built
        meta = {
            "format": _CACHE_FORMAT,
            "key": key,
            "block": src.name,
            "block_hash": block_hash,
            "tvm": self._version,
            "target": self._target_text,
            "options": self._compile_options(),
            "inputs": inputs,
            "outputs": outputs,
            "compile_seconds": round(built.seconds, 3),
            "schedules": schedules,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        try:
            _export(executable, entry, meta)
            built.library = entry
        except Exception as exc:  # no C compiler or linker, a read-only folder, ...
            built.cache_error = f"{type(exc).__name__}: {_summary(exc)}"
        return built

    def _measured_open(self, library: Path | None, executable: Any, name: str) -> tuple[Any, Any, int]:
        """(VM, module, RSS growth across opening them): the memory a block holds."""
        before = rss_bytes()
        vm, module = self._open(library, executable, name)
        return vm, module, max(0, rss_bytes() - before)

    def _compile_options(self) -> dict[str, Any]:
        """Everything besides the block that changes the compiled code: part of the cache key."""
        return {
            "opt_level": self.opt_level,
            "schedule": self.schedule,
            "batch_size": self.batch_size,
            "seed": self.seed if self.schedule == "sampled" else None,
            "tuning_log": self._tuning_hash,
        }

    def _cache_key(self, block_hash: str) -> str:
        fingerprint = json.dumps(
            {
                "format": _CACHE_FORMAT,
                "tvm": self._version,
                "target": self._target_text,
                "machine": platform.machine(),
                **self._compile_options(),
            },
            sort_keys=True,
        )
        options = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        return f"{block_hash[:24]}-{self.target.kind.name}-{options}"

    def _configure_thread(self) -> None:
        """Size the calling thread's TVM pool (once per thread): see the module docstring."""
        if getattr(_thread_state, "threads", None) == self.threads:
            return
        config = _tvm().get_global_func("runtime.config_threadpool")
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
            executable, _ = self._compile(src, src.proto, defaults_only=True)
            library = self._temporary_library(executable, stack)
            self._open(library, executable, "warm-up")

    def _compile(
        self, src: ModelSource, proto: onnx.ModelProto, *, defaults_only: bool = False
    ) -> tuple[Any, dict[str, Any]]:
        """ONNX -> Relax -> fused, scheduled kernels -> a VM executable (``defaults_only``:
        no tuning log, no sampling; for the warm-up)."""
        tvm = _tvm()
        mod = self._lower(src, proto)
        info: dict[str, Any] = {}
        try:
            with self.target, tvm.transform.PassContext(opt_level=self.opt_level):
                mod, info = self._schedule(mod, defaults_only=defaults_only)
                executable = tvm.compile(mod, target=self.target)
        except Exception as exc:
            raise BackendError(
                f"{src.name}: TVM cannot compile it for {self._target_text}: {type(exc).__name__}: "
                f"{_summary(exc)}"
            ) from exc
        return executable, info

    def _lower(self, src: ModelSource, proto: onnx.ModelProto) -> Any:
        """ONNX -> Relax with the weights as constants -> legalized, fused TIR kernels.

        The fusion is what ``tvm.compile``'s own default pipeline for CPUs leaves out
        (it only legalizes), and what MetaSchedule's static-shape pipeline runs before
        applying a database: the kernels here are the ones tuning logs are keyed by.
        """
        tvm = _tvm()
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        full = _full_model(src, proto)
        shapes = self._static_shapes(full, src.name)
        try:
            with warnings.catch_warnings():
                # the frontend warns about every symbolic input dim and checker complaint
                warnings.simplefilter("ignore")
                mod = from_onnx(full, shape_dict=shapes or None, keep_params_in_input=False)
        except Exception as exc:
            raise BackendError(
                f"{src.name}: TVM's Relax ONNX frontend cannot convert it: {type(exc).__name__}: "
                f"{_summary(exc)}"
            ) from exc
        try:
            with self.target, tvm.transform.PassContext(opt_level=self.opt_level):
                return tvm.transform.Sequential(
                    [
                        relax.transform.DecomposeOpsForInference(),
                        relax.transform.CanonicalizeBindings(),
                        relax.transform.LegalizeOps(),
                        relax.transform.AnnotateTIROpPattern(),
                        relax.transform.FoldConstant(),
                        relax.transform.FuseOps(),
                        relax.transform.FuseTIR(),
                    ]
                )(mod)
        except Exception as exc:
            raise BackendError(
                f"{src.name}: TVM cannot lower it for {self._target_text}: {type(exc).__name__}: "
                f"{_summary(exc)}"
            ) from exc

    def _schedule(self, mod: Any, *, defaults_only: bool = False) -> tuple[Any, dict[str, Any]]:
        """Tuned schedules from the log, else sampled ones, else DLight's on GPUs."""
        from tvm import relax

        info: dict[str, Any] = {"kernels": _count_kernels(mod)}
        if self.tuning_log is not None and not defaults_only:
            ms = _meta_schedule(needs_intrinsics=_log_uses_intrinsics(self.tuning_log))
            database = ms.database.JSONDatabase(work_dir=str(self.tuning_log))
            with database:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            info["tuned"] = info["kernels"] - _count_unscheduled(mod)
        if self.schedule == "sampled" and not defaults_only:
            mod, info["sampled"] = self._sampled(mod)
        if "gpu" in self.target.keys:
            from tvm.s_tir import dlight as dl

            mod = dl.ApplyDefaultSchedule(
                dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
            )(mod)
        info["unscheduled"] = _count_unscheduled(mod)
        return mod, info

    def _sampled(self, mod: Any, database: Any = None) -> tuple[Any, int]:
        """One post-processed point of MetaSchedule's design space per unscheduled kernel.

        Recorded in a database (in memory unless one is given) and applied like tuning
        records: the same machinery as a tuning log, minus the measuring. A kernel whose
        samples all fail the post-processors keeps its previous schedule.
        """
        from tvm import relax

        ms = _meta_schedule(needs_intrinsics=True)
        tasks = ms.relax_integration.extract_tasks(mod, self.target)
        if database is None:
            database = ms.database.MemoryDatabase()
        done = 0
        for task in tasks:
            kernel = task.dispatched[0]
            if _is_scheduled(kernel):
                continue
            context = ms.TuneContext(
                mod=kernel,
                target=self.target,
                space_generator="post-order-apply",
                search_strategy="replay-trace",
                task_name=task.task_name,
                rand_state=self.seed,
                num_threads=1,
            )
            for _ in range(_SAMPLE_TRIES):
                try:
                    sch = context.space_generator.generate_design_space(kernel)[0]
                    if not all(p.apply(sch) for p in context.space_generator.postprocs):
                        continue
                except Exception:  # a rule that cannot handle this kernel: try another sample
                    continue
                workload = database.commit_workload(kernel)
                database.commit_tuning_record(
                    ms.database.TuningRecord(sch.trace, workload, [1.0], self.target)
                )
                done += 1
                break
        with self.target, database:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        return mod, done

    def _static_shapes(self, proto: onnx.ModelProto, name: str) -> dict[str, list[int]]:
        """Input shapes with the symbolic leading dim set to ``batch_size`` ({} when None)."""
        if self.batch_size is None:
            return {}
        shapes: dict[str, list[int]] = {}
        constants = {t.name for t in proto.graph.initializer}
        for value in proto.graph.input:
            if value.name in constants:
                continue
            dims = list(value.type.tensor_type.shape.dim)
            shape: list[int] = []
            for axis, dim in enumerate(dims):
                if dim.HasField("dim_value"):
                    shape.append(int(dim.dim_value))
                elif axis == 0:
                    shape.append(self.batch_size)
                else:
                    raise ModelError(
                        f"{name}: input {value.name!r} has a symbolic dimension "
                        f"{dim.dim_param or '?'!r} at axis {axis}; batch_size fixes only the "
                        f"leading one (leave batch_size unset, with the default schedule, to "
                        f"compile it with symbolic shapes)"
                    )
            shapes[value.name] = shape
        return shapes

    def _open(self, library: Path | None, executable: Any, name: str) -> tuple[Any, Any]:
        """A VM over the library file (or, failing that, the in-memory executable)."""
        tvm = _tvm()
        from tvm import relax

        try:
            module = tvm.runtime.load_module(str(library)) if library is not None else executable
            vm = relax.VirtualMachine(module, self.device)
        except Exception as exc:
            raise BackendError(
                f"{name}: TVM cannot open the compiled block ({library or 'in memory'}): "
                f"{type(exc).__name__}: {_summary(exc)}"
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


# --- helpers --------------------------------------------------------------------------


def option_problems(options: Mapping[str, Any]) -> list[str]:
    """Every malformed option, as ``name: why``; checks the form only (no TVM needed).

    Whether the target's device is here, and whether ``tuning_log`` exists, are questions
    for the machine that runs the block: the constructor asks them.
    """
    problems: list[str] = []

    def integer(name: str, low: int, high: int | None = None, *, optional: bool = False) -> None:
        if name not in options or (optional and options[name] is None):
            return
        value = options[name]
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        if ok and (high is None or value <= high):
            return
        span = f"{low}..{high}" if high is not None else f">= {low}"
        problems.append(f"{name}: an integer {span}{' or null' if optional else ''}, got {value!r}")

    # threads: 0 would mean "one per core" to TVM, which defeats pinning a processor
    integer("threads", 1)
    integer("opt_level", 0, 3)
    integer("batch_size", 1, optional=True)
    integer("seed", 0)
    integer("device_id", 0)
    schedule = options.get("schedule", "default")
    if schedule not in SCHEDULES:
        problems.append(f"schedule: {schedule!r} is not one of {list(SCHEDULES)}")
    target = options.get("target")
    if target is not None:
        problem = _target_problem(target)
        if problem:
            problems.append(f"target: {problem}")
    for name in ("cache_dir", "tuning_log"):
        value = options.get(name)
        if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
            problems.append(f"{name}: a folder path, got {value!r}")
    if "cache" in options and not isinstance(options["cache"], bool):
        problems.append(f"cache: true or false, got {options['cache']!r}")
    if options.get("batch_size") is None:
        if schedule == "sampled":
            problems.append("batch_size: schedule 'sampled' needs static shapes; set batch_size")
        if options.get("tuning_log") is not None:
            problems.append("batch_size: tuning_log needs static shapes (tuning records are); set batch_size")
    return problems


def _target_problem(target: Any) -> str | None:
    """Why ``target`` is not a target this backend takes (None when its form is right)."""
    form = "a dict such as {'kind': 'llvm', 'mcpu': 'znver3'}, or a bare kind name"
    if isinstance(target, str):
        text = target.strip()
        if not text or any(c.isspace() for c in text) or text.startswith("-"):
            return f"{target!r}: give {form} (TVM 0.27 refuses the 'llvm -mcpu=...' form)"
        kind = text
    elif isinstance(target, Mapping):
        kind = target.get("kind")
        if not isinstance(kind, str) or not kind:
            return f"{dict(target)!r} has no 'kind' ({form})"
    else:
        return f"expected {form}, got {target!r}"
    if kind not in DEVICE_KINDS:
        return f"kind {kind!r} is not one of {sorted(DEVICE_KINDS)}"
    return None


def available_targets() -> list[str]:
    """Target kinds this TVM can compile for *and* has a device for here, e.g. ``['llvm', 'cuda']``."""
    tvm = _tvm()
    found: list[str] = []
    for kind, device in DEVICE_KINDS.items():
        try:
            enabled = tvm.runtime.enabled(kind)
            if enabled and _device_exists(tvm.device(device, 0)):
                found.append(kind)
        except Exception:  # a runtime built without this device API
            continue
    return found


def _targets_text() -> str:
    """What a missing-device error adds: the targets that are here."""
    try:
        return f"targets here: {available_targets()}"
    except Exception as exc:
        return f"targets unknown ({type(exc).__name__}: {exc})"


def host_cpu() -> str:
    """The CPU name LLVM detects here (``znver3``, ``skylake-avx512``, ``cortex-a78``...)."""
    return str(_tvm().get_global_func("tvm.codegen.llvm.GetHostCPUName")())


def _device_exists(device: Any) -> bool:
    try:
        return bool(device.exist)
    except Exception:
        return False


def _target_spec(target: Mapping[str, Any] | str | None, threads: int) -> dict[str, Any]:
    """The target dict to hand TVM (its form checked by ``option_problems``): host
    defaults filled in for ``llvm``."""
    if target is None:
        spec: dict[str, Any] = {"kind": "llvm"}
    elif isinstance(target, str):
        spec = {"kind": target.strip()}
    else:
        spec = dict(target)
    if spec["kind"] == "llvm":
        if "mcpu" not in spec:
            with contextlib.suppress(Exception):
                spec["mcpu"] = host_cpu()
        spec.setdefault("num-cores", threads)
    return spec


def _check_tuning_log(tuning_log: str | Path | None) -> tuple[Path | None, str | None]:
    """(the database folder, a hash of its records) or ``ConfigError`` naming what is wrong."""
    if tuning_log is None:
        return None, None
    folder = Path(tuning_log)
    missing = [f for f in _MS_FILES if not (folder / f).is_file()]
    if missing:
        raise ConfigError(
            f"tvm: tuning_log {str(folder)!r} is not a MetaSchedule database folder (missing {missing})"
        )
    digest = hashlib.sha256()
    for f in _MS_FILES:
        digest.update((folder / f).read_bytes())
    return folder, digest.hexdigest()[:16]


def _log_uses_intrinsics(folder: Path) -> bool:
    """Whether tuning records tensorize (their intrinsics must be registered to replay them)."""
    try:
        return "tensorize" in (folder / _MS_FILES[1]).read_text().lower()
    except OSError:
        return True


def _meta_schedule(*, needs_intrinsics: bool) -> Any:
    """``tvm.s_tir.meta_schedule``; the tensor intrinsics too when asked (a one-time ~30 s)."""
    _tvm()
    if needs_intrinsics:
        import tvm.s_tir.tensor_intrin  # noqa: F401  (registers the intrinsics)
    from tvm.s_tir import meta_schedule

    return meta_schedule


def _is_scheduled(mod: Any) -> bool:
    """Whether a kernel (a one-function IRModule) already has a schedule."""
    return any(_is_prim(f) and _scheduled(f) for _, f in mod.functions_items())


def _scheduled(func: Any) -> bool:
    """The mark DLight and MetaSchedule leave on a kernel they scheduled (``tirx.`` in 0.27,
    ``tir.`` before)."""
    attrs = func.attrs
    return attrs is not None and any(k in attrs and bool(attrs[k]) for k in _SCHEDULED_ATTRS)


def _is_prim(func: Any) -> bool:
    from tvm import tirx

    return isinstance(func, tirx.PrimFunc)


def _count_kernels(mod: Any) -> int:
    return sum(1 for _, f in mod.functions_items() if _is_prim(f))


def _count_unscheduled(mod: Any) -> int:
    return sum(1 for _, f in mod.functions_items() if _is_prim(f) and not _scheduled(f))


def _inline(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Model-local functions inlined: the frontend only knows ops, not local functions."""
    if not proto.functions:
        return proto
    from onnx import inliner

    return inliner.inline_local_functions(proto)


def _unsupported(proto: onnx.ModelProto) -> list[str]:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | _DIRECT_OPS
    bad: set[str] = set()

    def visit(nodes: Sequence[onnx.NodeProto]) -> None:
        for node in nodes:
            domain = "" if node.domain in ("", "ai.onnx") else node.domain
            if domain not in _DOMAINS or node.op_type not in known:
                bad.add(op_label(domain, node.op_type))
            for attr in node.attribute:  # If/Loop/Scan bodies
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g.node)
                for g in attr.graphs:
                    visit(g.node)

    visit(proto.graph.node)
    return sorted(bad)


def _graph_inputs(proto: onnx.ModelProto) -> list[str]:
    """Graph inputs a caller feeds (old IRs also list initializers as inputs), in order:
    the order of the Relax function's parameters."""
    constants = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in constants]


def _full_model(src: ModelSource, proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its weights (``src.proto`` is read without external data)."""
    if isinstance(src.data, str):
        uses_external = any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in src.proto.graph.initializer
        )
        if uses_external:
            return _inline(onnx.load(src.data))
    return proto


def _block_hash(src: ModelSource) -> str:
    """SHA-256 of the block's ONNX bytes (and of its external weights, when it has some)."""
    digest = hashlib.sha256()
    if isinstance(src.data, str):
        path = Path(src.data)
        digest.update(path.read_bytes())
        for t in src.proto.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                location = next((e.value for e in t.external_data if e.key == "location"), None)
                if location and (path.parent / location).is_file():
                    digest.update((path.parent / location).read_bytes())
    else:
        digest.update(src.data)
    return digest.hexdigest()


def _cache_entry_ok(library: Path, key: str) -> bool:
    """A complete entry: the library and its meta (written last), for this key and format."""
    meta = _read_meta(library.with_suffix(".json"))
    return library.is_file() and meta.get("key") == key and meta.get("format") == _CACHE_FORMAT


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _export(executable: Any, library: Path, meta: dict[str, Any]) -> None:
    """Write the library, then its meta, each by atomic rename: a reader never sees half an
    entry, and two processes compiling the same block both write whole files."""
    tmp = library.with_name(f".{library.name}.{os.getpid()}.{threading.get_ident()}.tmp.so")
    try:
        executable.export_library(str(tmp))
        os.replace(tmp, library)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    meta_path = library.with_suffix(".json")
    tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp_meta, meta_path)


def _flatten(result: Any) -> list[Any]:
    """The VM returns one tensor, or a tuple (an ``ffi.Array``) of them, possibly nested."""
    if hasattr(result, "numpy"):
        return [result]
    values: list[Any] = []
    for item in result:
        values.extend(_flatten(item))
    return values


def _summary(exc: BaseException) -> str:
    """TVM errors carry a long C++ traceback; the first non-empty line says what happened."""
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("Traceback", "  File"))]
    return lines[-1].strip() if lines else type(exc).__name__
