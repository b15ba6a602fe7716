"""TensorRT through its native Python API (TensorRT 10; TensorRT 11 where the API differs).

``tensorrt`` is optional and imported on first use through ``loom.core.compat.require``:
importing this module imports no engine, and a machine without TensorRT says what to
install. The machinery lives beside it: ``_tensorrt_checks`` (options, shapes,
quantization), ``_tensorrt_build`` (plans), ``_tensorrt_cache`` (the engine cache),
``_tensorrt_engine`` (running a plan), ``_tensorrt_cuda`` (device memory and streams).
Precision, DLA, shapes, caches and memory on TensorRT 10 and 11: docs/backends.md.
"""

from __future__ import annotations

import gc
import json
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends._tensorrt_build import (
    BuildOptions,
    PlanBuilder,
    TensorRtParseError,
    TensorRtWarning,
    recording_logger,
)
from backends._tensorrt_cache import (
    ENGINE_CACHE_SCHEMA,
    atomic_write,
    content_sha256,
    engine_cache_key,
    make_folder,
)
from backends._tensorrt_checks import (
    OPTION_DEFAULTS,
    QDQ_OPS,
    batch_range,
    block_precision,
    check_options,
    dla_problem,
    has_qdq,
    input_profile,
    onnx_nodes,
    path_problems,
    quantization_problems,
)
from backends._tensorrt_cuda import CudaApi, DeviceBuffer, cuda_api
from backends._tensorrt_engine import EngineHandle, bind, execute, free
from backends.base import (
    Backend,
    LoadedBlock,
    ModelSource,
    check_cores,
    check_resident,
    mark_released,
    op_label,
    read_source,
    select_feeds,
)
from loom.core import compat
from loom.core.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    UnsupportedOpsError,
)

__all__ = [
    "ENGINE_CACHE_SCHEMA",
    "INSTALL_HINT",
    "OPTION_DEFAULTS",
    "CudaApi",
    "DeviceBuffer",
    "TensorRtBackend",
    "TensorRtParseError",
    "TensorRtWarning",
    "batch_range",
    "check_options",
    "content_sha256",
    "cuda_api",
    "engine_cache_key",
    "has_qdq",
    "input_profile",
    "path_problems",
    "quantization_problems",
]

#: what ``is_available`` says when the package is missing
INSTALL_HINT = "tensorrt is not installed: pip install tensorrt (NVIDIA GPUs only)"


def _trt() -> Any:
    return compat.require("tensorrt")


def _make_cache_folders(engine_cache_dir: Any, timing_cache: Any) -> None:
    """The cache folders, parents too, or ``BackendUnavailableError`` naming the option."""
    if engine_cache_dir is not None:
        make_folder(Path(engine_cache_dir), "engine_cache_dir")
    if timing_cache is not None:
        make_folder(Path(timing_cache).parent, "timing_cache")


class TensorRtBackend(Backend):
    """TensorRT on one GPU (or one of its DLA cores), with its precision and caches.

    Options (a device profile's processor ``options``): ``fp16``, ``int8`` (explicit Q/DQ
    quantization), ``dla_core`` (DLA with GPU fallback), ``workspace_mb`` (builder
    workspace; TensorRT's default is the device's memory), ``engine_cache_dir``,
    ``timing_cache`` (a file), ``device_id``, ``opt_batch``/``max_batch`` (the batch range
    engines are built for), ``cores`` (CPU cores of the worker thread). What each does on
    TensorRT 10 and 11: docs/backends.md.
    """

    name = "tensorrt"

    def __init__(
        self,
        *,
        fp16: bool = False,
        int8: bool = False,
        dla_core: int | None = None,
        workspace_mb: int | None = None,
        engine_cache_dir: str | os.PathLike[str] | None = None,
        timing_cache: str | os.PathLike[str] | None = None,
        device_id: int = 0,
        opt_batch: int = 1,
        max_batch: int = 8,
        cores: list[int] | None = None,
    ) -> None:
        problems = check_options(
            fp16=fp16, int8=int8, dla_core=dla_core, workspace_mb=workspace_mb,
            engine_cache_dir=engine_cache_dir, timing_cache=timing_cache, device_id=device_id,
            opt_batch=opt_batch, max_batch=max_batch,
        )  # fmt: skip
        problems = problems or path_problems(engine_cache_dir, timing_cache)
        if problems:
            raise ConfigError("tensorrt: " + "; ".join(problems))
        self.cores = check_cores(cores)
        trt = _trt()  # MissingDependencyError (an ImportError) saying what to pip install
        self._trt = trt
        self.version = str(trt.__version__)
        self._cuda = self._open_cuda(device_id)
        _make_cache_folders(engine_cache_dir, timing_cache)  # here: a machine that builds engines
        #: TensorRT 10 has the precision builder flags; TensorRT 11 is strongly typed only
        self.weak_typing = hasattr(trt.BuilderFlag, "FP16")
        if fp16 and not self.weak_typing:
            raise BackendUnavailableError(
                f"tensorrt {self.version}: fp16: true needs BuilderFlag.FP16, which TensorRT 11 "
                f"removed (strongly typed networks only); load the family's fp16 variant, whose "
                f"blocks carry fp16 types, with fp16: false"
            )
        self.fp16 = fp16
        self.int8 = int8
        self.dla_core = dla_core
        self.workspace_mb = workspace_mb
        self.engine_cache_dir = Path(engine_cache_dir) if engine_cache_dir is not None else None
        self.timing_cache = Path(timing_cache) if timing_cache is not None else None
        self.device_id = device_id
        self.opt_batch = opt_batch
        self.max_batch = max_batch
        self.batch = batch_range(opt_batch=opt_batch, max_batch=max_batch, dla=dla_core is not None)
        self._cuda.set_device(device_id)
        self.gpu_name = self._cuda.device_name(device_id)
        self.compute_capability = self._cuda.capability(device_id)
        self._logger = recording_logger(trt)
        options = BuildOptions(fp16, int8, self.weak_typing, dla_core, workspace_mb, self.batch)
        self._builder = PlanBuilder(
            trt, self._logger, self._cuda, device_id=device_id, options=options,
            timing_cache=self.timing_cache,
        )  # fmt: skip
        if dla_core is not None:
            self._check_dla_core()
        self._runtime = trt.Runtime(self._logger)
        if dla_core is not None:
            self._runtime.DLA_core = dla_core  # the core deserialized engines run on

    def _open_cuda(self, device_id: int) -> CudaApi:
        """The CUDA binding, once ``device_id`` is known to be a visible GPU."""
        cuda = cuda_api()
        count, why = cuda.device_count()
        if count == 0:
            raise BackendUnavailableError(
                f"tensorrt {self.version}: no CUDA GPU visible ({why}; via {cuda.name}"
                + (f", used because {cuda.fallback}" if cuda.fallback else "")
                + ")"
            )
        if device_id >= count:
            raise BackendUnavailableError(
                f"tensorrt: device_id {device_id} is not visible; {count} CUDA GPU(s): 0..{count - 1}"
            )
        return cuda

    def _check_dla_core(self) -> None:
        """``BackendUnavailableError`` when the builder has no such DLA core; a warning when
        every layer would fall back to the GPU (the DLA runs only FP16 and INT8 layers)."""
        have = int(self._builder.builder().num_DLA_cores)
        if self.dla_core is not None and self.dla_core >= have:
            cores_here = f"cores 0..{have - 1}" if have else "no DLA core"
            raise BackendUnavailableError(
                f"tensorrt: dla_core {self.dla_core} does not exist here: the builder sees "
                f"{have} DLA core(s) ({cores_here}) on GPU {self.device_id} ({self.gpu_name})"
            )
        if self.weak_typing and not (self.fp16 or self.int8):
            warnings.warn(
                f"tensorrt: dla_core {self.dla_core} with fp16 and int8 off: the DLA runs only FP16 "
                f"and INT8 layers, so every layer will fall back to the GPU",
                TensorRtWarning,
                stacklevel=3,
            )

    @classmethod
    def option_problems(cls, options: Mapping[str, Any]) -> list[str]:
        """Malformed options a device profile can be told about without TensorRT or a GPU
        (``options.max_batch: why``). Unknown option names are the caller's to report."""
        known = {k: v for k, v in options.items() if k in OPTION_DEFAULTS}
        return [f"options.{p}" for p in check_options(**{**OPTION_DEFAULTS, **known})]

    # --- protocol -------------------------------------------------------------------

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            if not compat.is_installed("tensorrt"):
                return False, INSTALL_HINT
            trt = _trt()
            version = str(trt.__version__)
        except ImportError:
            return False, INSTALL_HINT
        except Exception as exc:  # a broken install: missing libnvinfer, wrong CUDA
            return False, f"tensorrt is installed but does not import: {type(exc).__name__}: {exc}"
        try:
            cuda = cuda_api()
        except ImportError:
            return False, (
                f"tensorrt {version} is installed, but there is no CUDA binding for device memory "
                f"and streams: pip install cuda-python (or a CUDA build of torch)"
            )
        except Exception as exc:
            return False, f"tensorrt {version}: the CUDA binding does not start: {type(exc).__name__}: {exc}"
        try:
            count, why = cuda.device_count()
            if not count:
                return False, f"no CUDA GPU visible ({why}; tensorrt {version}, {cuda.name})"
            gpus = [f"{cuda.device_name(i)} (sm {cuda.capability(i)})" for i in range(count)]
        except Exception as exc:
            return False, f"tensorrt {version}: cannot query the GPUs: {type(exc).__name__}: {exc}"
        used = f"via {cuda.name}" + (f" (used because {cuda.fallback})" if cuda.fallback else "")
        return True, f"tensorrt {version}, GPU(s) {gpus}, device memory and streams {used}"

    def unsupported_ops(self, model: onnx.ModelProto) -> list[str]:
        """Q/DQ nodes TensorRT cannot run (asymmetric or uint8), Q/DQ nodes when this
        processor has ``int8`` off, a float32 block on a DLA core of a strongly typed
        TensorRT (11.4+: it would run on the GPU), and op types
        ``OnnxParser.supports_operator`` denies.

        ``supports_operator`` may answer yes for an op a particular attribute combination
        makes unparseable (its documentation says so): such blocks fail at load with every
        parser error listed (``TensorRtParseError``).
        """
        if not isinstance(model, onnx.ModelProto):
            model = read_source(model).proto
        bad = set(quantization_problems(model))
        nodes = onnx_nodes(model)
        if not self.int8:
            present = {n.op_type for n in nodes if n.op_type in QDQ_OPS and n.domain in ("", "ai.onnx")}
            bad.update(f"{op} (int8 is off on this processor)" for op in present)
        if self.dla_core is not None and not self.weak_typing:
            problem = dla_problem(block_precision(model), version=self.version)
            if problem:
                bad.add(problem)
        parser = self._builder.probe_parser()
        for domain, op in sorted({(n.domain, n.op_type) for n in nodes}):
            if op in QDQ_OPS and domain in ("", "ai.onnx"):
                continue  # judged above
            try:
                ok = bool(parser.supports_operator(op))
            except Exception:
                ok = True  # no answer: the parse at load decides
            if not ok:
                bad.add(op_label(domain, op))
        return sorted(bad)

    def load(
        self, model: onnx.ModelProto | str | Path | bytes, *, block_id: str | None = None
    ) -> LoadedBlock:
        """Build (or take from the engine cache), deserialize, bind buffers."""
        src = read_source(model, block_id)
        bad = self.unsupported_ops(src.proto)
        if bad:
            raise UnsupportedOpsError(self.name, src.name, bad)
        if self.int8 and not has_qdq(src.proto):
            warnings.warn(
                f"{src.name}: int8 is on but the block has no Q/DQ nodes; it builds in floating "
                f"point (TensorRT 10 deprecated implicit INT8 calibration, 11 removed it)",
                TensorRtWarning,
                stacklevel=2,
            )
        t0 = time.perf_counter()
        self._cuda.set_device(self.device_id)  # the calling thread's current device is per thread
        engine, plan, cache = self._engine(src)
        handle = bind(self._trt, self._cuda, src, engine, self.device_id)
        seconds = time.perf_counter() - t0
        activations = int(getattr(engine, "device_memory_size_v2", None) or getattr(engine, "device_memory_size", 0))
        io_bytes = sum(b.nbytes for b in handle.buffers.values())
        return LoadedBlock(
            block_id=src.name,
            backend=self.name,
            input_names=list(handle.inputs),
            output_names=[o.name for o in src.proto.graph.output],
            handle=handle,
            memory_bytes=activations + len(plan) + io_bytes,
            load_seconds=seconds,
            info={
                **self._block_info(cache, activations, len(plan), io_bytes),
                "precision": block_precision(src.proto),
            },
        )

    def _block_info(self, cache: str, activations: int, engine_bytes: int, io_bytes: int) -> dict[str, Any]:
        return {
            "tensorrt": self.version,
            "gpu": self.gpu_name,
            "compute_capability": self.compute_capability,
            "device_id": self.device_id,
            "dla_core": self.dla_core,
            "fp16": self.fp16,
            "int8": self.int8,
            "batch_range": list(self.batch),
            "engine_cache": cache,  # "hit", "miss", "rebuilt" or "off"
            "cuda_api": self._cuda.name,
            "cuda_api_fallback": self._cuda.fallback,
            # GPU memory, accounted (not RSS): activations + plan + I/O buffers
            "device_memory_bytes": activations,
            "engine_bytes": engine_bytes,
            "io_bytes": io_bytes,
            "cores": self.cores,
        }

    def run(self, block: LoadedBlock, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        handle: EngineHandle = check_resident(block)
        inputs = select_feeds(block, feeds)
        outs = execute(
            handle, self._cuda, inputs, device_id=self.device_id,
            label=f"block {block.block_id} on {self.name}", logger=self._logger,
        )  # fmt: skip
        result: dict[str, np.ndarray] = {}
        for name in block.output_names:
            arr = outs[name]
            want = handle.onnx_dtypes.get(name, arr.dtype)
            result[name] = arr if arr.dtype == want else arr.astype(want)
        return result

    def release(self, block: LoadedBlock) -> None:
        """Free the I/O buffers, then drop the context before the engine, then the stream."""
        handle: EngineHandle | None = block.handle
        if handle is not None and not block.info.get("released"):
            free(handle, self._cuda, self.device_id)
        mark_released(block)
        gc.collect()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "version": self.version,
            "gpu": self.gpu_name,
            "compute_capability": self.compute_capability,
            "device_id": self.device_id,
            "dla_core": self.dla_core,
            "fp16": self.fp16,
            "int8": self.int8,
            "workspace_mb": self.workspace_mb,
            "batch_range": list(self.batch),
            "strongly_typed": not self.weak_typing,
            "cuda_api": self._cuda.name,
            # why cuda-python was not used ("" when it was, or was not installed)
            "cuda_api_fallback": self._cuda.fallback,
            "cores": self.cores,
        }

    def cache_key(self, src: ModelSource) -> str:
        """This backend's engine cache key for a block (``engine_cache_key`` of its content)."""
        return engine_cache_key(
            model_sha256=content_sha256(src),
            trt_version=self.version,
            gpu_name=self.gpu_name,
            compute_capability=self.compute_capability,
            fp16=self.fp16,
            int8=self.int8,
            dla_core=self.dla_core,
            workspace_mb=self.workspace_mb,
            batch=self.batch,
        )

    # --- internals ------------------------------------------------------------------

    def _engine(self, src: ModelSource) -> tuple[Any, bytes, str]:
        """(deserialized engine, its plan, where the plan came from); a cached plan that
        no longer deserializes is rebuilt (``"rebuilt"``)."""
        plan, cache = self._plan(src)
        mark = self._logger.mark()
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None and cache == "hit":
            warnings.warn(
                f"{src.name}: the cached engine does not deserialize (stale or damaged); rebuilding",
                TensorRtWarning,
                stacklevel=3,
            )
            plan, _ = self._plan(src, rebuild=True)
            cache = "rebuilt"
            mark = self._logger.mark()
            engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            said = self._logger.since(mark)
            raise BackendError(
                f"{src.name}: TensorRT {self.version} cannot deserialize the engine it built"
                + (": " + " | ".join(said[-5:]) if said else " (nothing logged)")
            )
        return engine, plan, cache

    def _plan(self, src: ModelSource, *, rebuild: bool = False) -> tuple[bytes, str]:
        """(serialized plan, where it came from): the engine cache or a build."""
        if self.engine_cache_dir is None:
            return self._builder.build(src), "off"
        key = self.cache_key(src)
        path = self.engine_cache_dir / f"{key}.engine"
        if not rebuild and path.is_file():
            return path.read_bytes(), "hit"
        plan = self._builder.build(src)
        atomic_write(path, plan)
        meta = {
            "block": src.name,
            "model_sha256": content_sha256(src),
            **{k: v for k, v in self.describe().items() if k != "cores"},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "schema": ENGINE_CACHE_SCHEMA,
        }
        atomic_write(path.with_suffix(".json"), (json.dumps(meta, indent=2) + "\n").encode())
        return plan, "miss"
