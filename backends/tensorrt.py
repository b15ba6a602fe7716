"""TensorRT through its native Python API (TensorRT 10; TensorRT 11 where the API differs).

``tensorrt`` is optional and imported on first use through ``loom.core.compat.require``:
importing this module imports no engine, and a machine without TensorRT says what to
install. The API used is the one of the TensorRT 10 Python reference and the 10.x -> 11.x
migration guide (https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/
tensorrt-10x-to-11x-python-api-reference.html); every call is named below with why.

Build. ``Builder.create_network(0)``: explicit batch is the only mode since TensorRT 10
(the EXPLICIT_BATCH flag is deprecated and ignored), and TensorRT 11 networks are always
strongly typed (the STRONGLY_TYPED flag is accepted and ignored). The block is parsed with
``OnnxParser.parse_from_file`` (a path: external weights are found beside it) or
``OnnxParser.parse`` (bytes); when parsing fails *every* error of ``parser.get_error(i)``
for ``i < parser.num_errors`` is reported in one ``TensorRtParseError`` naming the block.
The plan comes from ``Builder.build_serialized_network(network, config)`` (``None`` on
failure: the builder's own error messages, captured by this module's logger, are quoted).

Precision (the 10 -> 11 difference that matters here).

- ``fp16``: ``BuilderFlag.FP16`` ("weak typing") on TensorRT 10. TensorRT 11 removed every
  precision flag (strongly typed networks only): there, ``fp16: true`` is refused with
  ``BackendUnavailableError``; load the family's fp16 variant (its blocks carry fp16 types)
  with ``fp16: false`` instead.
- ``int8``: explicit quantization only, i.e. blocks with QuantizeLinear/DequantizeLinear
  nodes (the zoo's int8 variants). Implicit quantization (``IInt8Calibrator``, dynamic
  ranges) is deprecated since TensorRT 10.1 and removed in 11; this backend never
  calibrates. On TensorRT 10 ``int8: true`` sets ``BuilderFlag.INT8``, which weakly typed
  Q/DQ networks need; on TensorRT 11 the Q/DQ nodes alone decide (strong typing). With
  ``int8: false`` a Q/DQ block is refused as unsupported on this processor (so a planner
  places it elsewhere); with ``int8: true`` a block without Q/DQ nodes builds in floating
  point and a ``TensorRtWarning`` says so. TensorRT runs only symmetric, signed int8:
  a Q/DQ node with a uint8 or non-zero zero point is listed by ``unsupported_ops``
  (onnxruntime's default static quantization, uint8 activations, produces exactly these).

DLA (Jetson). ``dla_core: N`` sets ``config.default_device_type = DeviceType.DLA``,
``config.DLA_core = N`` and ``BuilderFlag.GPU_FALLBACK`` (layers the DLA cannot run go to
the GPU instead of failing the build), and ``Runtime.DLA_core = N`` before
deserializing. A core the builder does not have (``Builder.num_DLA_cores``) is an error
naming it, raised when the backend is constructed: a profile measured on the GPU under a
DLA processor's name would be worse than no profile, so there is no silent fallback. The
DLA runs FP16 and INT8 layers only and has no dynamic shapes (the profile's min, opt and
max must be equal), so with ``dla_core`` set the batch is fixed at ``opt_batch``.

Shapes. A dynamic batch axis (axis 0) gets one optimization profile: min 1, opt
``opt_batch``, max ``max_batch`` (or all ``opt_batch`` on a DLA). Other dynamic axes
have no range to give TensorRT and are refused with ``ModelError`` naming them.

Caches. ``engine_cache_dir``: the serialized plan is stored as ``<key>.engine`` (plus a
``<key>.json`` a person can read), where the key (``engine_cache_key``) hashes the
block's content, the TensorRT version, the GPU's name and compute capability and every
build option: plans are specific to the TensorRT version and GPU that built them. A hit
skips the build; a plan that no longer deserializes is rebuilt. ``timing_cache``: loaded
with ``config.create_timing_cache(bytes)`` / ``config.set_timing_cache(cache,
ignore_mismatch=False)`` before each build and saved from ``config.get_timing_cache()
.serialize()`` after it; a cache of another device or version is replaced (with a
warning), as TensorRT's builder-performance guide advises.

Running. Device memory and streams come from ``cuda-python`` (``cuda.bindings.runtime``,
or the older ``cuda.cudart`` that cuda-bindings 13 removed) when it is installed, else from
``torch.cuda``; which one is detected at run time and reported (``describe()["cuda_api"]``,
each block's ``info["cuda_api"]``). Each loaded block owns an execution context, a CUDA
stream and device buffers sized for ``max_batch``; a run sets the input shapes
(``context.set_input_shape``), binds the buffers (``context.set_tensor_address``), copies
inputs in, calls ``context.execute_async_v3(stream)``, copies outputs out and synchronizes.

Memory. ``memory_bytes`` is GPU memory, accounted rather than measured (RSS says nothing of
it): the engine's activation memory (``ICudaEngine.device_memory_size_v2``; the older
``device_memory_size`` was removed in TensorRT 11) plus the plan's size (weights dominate
it) plus the block's input and output buffers. ``release`` frees the buffers, then drops
the context before the engine (TensorRT objects must go in reverse order of creation).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
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
    select_feeds,
)
from loom.core import compat
from loom.core.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    MissingDependencyError,
    ModelError,
    UnsupportedOpsError,
)

#: what ``is_available`` says when the package is missing
INSTALL_HINT = "tensorrt is not installed: pip install tensorrt (NVIDIA GPUs only)"
#: bump when the engine cache key's fields or the plan files' meaning change
ENGINE_CACHE_SCHEMA = 1

_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

#: keyword-only options and their defaults (``option_problems`` validates a profile's
#: options against these without TensorRT being here)
OPTION_DEFAULTS: dict[str, Any] = {
    "fp16": False,
    "int8": False,
    "dla_core": None,
    "workspace_mb": None,
    "engine_cache_dir": None,
    "timing_cache": None,
    "device_id": 0,
    "opt_batch": 1,
    "max_batch": 8,
}


class TensorRtWarning(UserWarning):
    """Something about a build that changes what runs where, said out loud."""


class TensorRtParseError(BackendError):
    """TensorRT's ONNX parser refused a block. ``errors`` holds every error it gave, in order."""

    def __init__(self, block: str, errors: Sequence[str]) -> None:
        self.block = block
        self.errors = list(errors)
        lines = "\n  ".join(f"[{i + 1}] {e}" for i, e in enumerate(self.errors)) or "(no error recorded)"
        super().__init__(
            f"{block}: TensorRT's ONNX parser reported {len(self.errors)} error(s):\n  {lines}"
        )


def _trt() -> Any:
    return compat.require("tensorrt")


# --- pure helpers: no TensorRT, no GPU ---------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(
    *,
    fp16: Any = False,
    int8: Any = False,
    dla_core: Any = None,
    workspace_mb: Any = None,
    engine_cache_dir: Any = None,
    timing_cache: Any = None,
    device_id: Any = 0,
    opt_batch: Any = 1,
    max_batch: Any = 8,
) -> list[str]:
    """Every malformed option, as ``name: why`` (empty when all are well formed).

    Form only, so a device profile of another machine is checked here: whether the GPU,
    the DLA core or TensorRT exist is a question for the machine that runs it.
    """
    problems: list[str] = []
    for name, value in (("fp16", fp16), ("int8", int8)):
        if not isinstance(value, bool):
            problems.append(f"{name}: true or false, got {value!r}")
    if dla_core is not None and not (_is_int(dla_core) and dla_core >= 0):
        problems.append(f"dla_core: a DLA core index (0, 1, ...) or null, got {dla_core!r}")
    if workspace_mb is not None and not (_is_int(workspace_mb) and workspace_mb >= 1):
        problems.append(f"workspace_mb: a size in MiB >= 1 or null (TensorRT's default), got {workspace_mb!r}")
    if not (_is_int(device_id) and device_id >= 0):
        problems.append(f"device_id: a CUDA device index (0, 1, ...), got {device_id!r}")
    batches_ok = True
    for name, value in (("opt_batch", opt_batch), ("max_batch", max_batch)):
        if not (_is_int(value) and value >= 1):
            problems.append(f"{name}: an integer >= 1, got {value!r}")
            batches_ok = False
    if batches_ok and opt_batch > max_batch:
        problems.append(f"opt_batch: {opt_batch} is above max_batch {max_batch}")
    for name, value in (("engine_cache_dir", engine_cache_dir), ("timing_cache", timing_cache)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            problems.append(f"{name}: a path or null, got {value!r}")
    return problems


def path_problems(engine_cache_dir: Any, timing_cache: Any) -> list[str]:
    """The cache paths against this machine's files (checked when the backend is made here)."""
    problems: list[str] = []
    if engine_cache_dir is not None and Path(engine_cache_dir).is_file():
        problems.append(f"engine_cache_dir: {engine_cache_dir} is a file, not a directory")
    if timing_cache is not None and Path(timing_cache).is_dir():
        problems.append(f"timing_cache: {timing_cache} is a directory; give the cache file's path")
    return problems


def batch_range(*, opt_batch: int, max_batch: int, dla: bool) -> tuple[int, int, int]:
    """(min, opt, max) of a dynamic batch axis. A DLA has no dynamic shapes ("the
    profile's min, max, and opt values must be equal", TensorRT's DLA restrictions), so
    on a DLA the batch is fixed at ``opt_batch``."""
    if dla:
        return opt_batch, opt_batch, opt_batch
    return 1, opt_batch, max_batch


def input_profile(
    block: str, name: str, shape: Sequence[int], batch: tuple[int, int, int]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(min, opt, max) shapes of one network input for its optimization profile, or
    ``None`` when the input is static (TensorRT needs no profile for it).

    ``-1`` marks a dynamic dimension (TensorRT's convention). Axis 0 is the batch and
    takes ``batch``; any other dynamic axis has no range to give, so ``ModelError``.
    """
    dims = [int(d) for d in shape]
    other = [i for i, d in enumerate(dims) if d < 0 and i != 0]
    if other:
        raise ModelError(
            f"{block}: input {name!r} {tuple(dims)} has dynamic dimension(s) at axis {other}; "
            f"the tensorrt backend gives a range only to axis 0 (the batch): make the other "
            f"dimensions static in the block"
        )
    if not dims or dims[0] >= 0:
        return None
    lo, opt, hi = batch
    rest = tuple(dims[1:])
    return (lo, *rest), (opt, *rest), (hi, *rest)


def engine_cache_key(
    *,
    model_sha256: str,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    fp16: bool,
    int8: bool,
    dla_core: int | None,
    workspace_mb: int | None,
    batch: tuple[int, int, int],
) -> str:
    """The name of a block's plan in the engine cache: a hash of everything the plan
    depends on. A serialized engine runs only with the TensorRT version and on the GPU
    model (compute capability) that built it, and its kernels depend on the precision,
    DLA, workspace and shape-range options, so each of those changes the key."""
    fields = {
        "schema": ENGINE_CACHE_SCHEMA,
        "model_sha256": model_sha256,
        "tensorrt": trt_version,
        "gpu": gpu_name,
        "compute_capability": compute_capability,
        "fp16": bool(fp16),
        "int8": bool(int8),
        "dla_core": dla_core,
        "workspace_mb": workspace_mb,
        "batch": list(batch),
    }
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def content_sha256(src: ModelSource) -> str:
    """SHA-256 of a block's bytes, external weight files included (they change the plan
    as much as the graph does). Files are read in chunks: blocks can be large."""
    digest = hashlib.sha256()
    if isinstance(src.data, bytes):
        digest.update(src.data)
        return digest.hexdigest()
    path = Path(src.data)
    _hash_file(digest, path)
    seen: set[str] = set()
    for init in src.proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in init.external_data if e.key == "location"), None)
        if location and location not in seen:
            seen.add(location)
            digest.update(location.encode())
            extra = path.parent / location
            if extra.is_file():
                _hash_file(digest, extra)
    return digest.hexdigest()


def _hash_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)


def _nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node the parser sees: the graph, subgraphs (If/Loop/Scan) and local function bodies."""
    local = {(f.domain, f.name): f for f in proto.functions}
    out: list[onnx.NodeProto] = []
    seen: set[tuple[str, str]] = set()

    def visit(nodes: Sequence[onnx.NodeProto]) -> None:
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in local:
                if key not in seen:
                    seen.add(key)
                    visit(local[key].node)
                continue
            out.append(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g.node)
                for g in attr.graphs:
                    visit(g.node)

    visit(proto.graph.node)
    return out


def has_qdq(proto: onnx.ModelProto) -> bool:
    """Whether a block is explicitly quantized (has QuantizeLinear/DequantizeLinear nodes)."""
    return any(n.op_type in _QDQ_OPS and n.domain in ("", "ai.onnx") for n in _nodes(proto))


def quantization_problems(proto: onnx.ModelProto) -> list[str]:
    """Q/DQ nodes TensorRT cannot run: it supports only symmetric, signed int8 (zero point
    0, "TRT only supports symmetric quantization - zeroPt must be all zeros" is the parser's
    own assertion). Zero points that are not constants are left to the parser."""
    qdq = [
        n for n in _nodes(proto)
        if n.op_type in _QDQ_OPS and n.domain in ("", "ai.onnx") and len(n.input) >= 3 and n.input[2]
    ]  # fmt: skip
    wanted = {n.input[2] for n in qdq}  # convert only the zero points, never the weights
    constants: dict[str, np.ndarray] = {}
    for init in proto.graph.initializer:
        if init.name in wanted and init.data_location != onnx.TensorProto.EXTERNAL:
            constants[init.name] = onnx.numpy_helper.to_array(init)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in wanted:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    constants[node.output[0]] = onnx.numpy_helper.to_array(attr.t)
    bad: set[str] = set()
    for node in qdq:
        zero = constants.get(node.input[2])
        if zero is None:
            continue
        if zero.dtype == np.uint8:
            bad.add(f"{node.op_type} (uint8 zero point: TensorRT runs signed, symmetric int8 only)")
        elif np.issubdtype(zero.dtype, np.integer) and np.any(zero != 0):
            bad.add(f"{node.op_type} (non-zero zero point: TensorRT runs symmetric int8 only)")
    return sorted(bad)


def _graph_inputs(proto: onnx.ModelProto) -> list[str]:
    """Graph inputs a caller feeds (old IRs also list initializers as inputs)."""
    constants = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in constants]


def _describe_parser_error(err: Any) -> str:
    """One line per ``IParserError``: node index, operator and name when the error has them."""

    def get(attr: str) -> Any:
        try:
            return getattr(err, attr)()
        except Exception:  # older parsers lack node_name()/node_operator()
            return None

    where = []
    node = get("node")
    if isinstance(node, int) and node >= 0:
        where.append(f"node {node}")
    op, node_name = get("node_operator"), get("node_name")
    if op:
        where.append(str(op))
    if node_name:
        where.append(repr(str(node_name)))
    desc = get("desc") or str(err)
    code = get("code")
    prefix = f"{' '.join(where)}: " if where else ""
    return f"{prefix}{desc}" + (f" ({code})" if code is not None else "")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write whole or not at all: a reader never sees half a plan, two writers the last one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- CUDA: device memory and streams ---------------------------------------------------------


@dataclass
class DeviceBuffer:
    """GPU memory a block owns: its address and size, and what keeps it alive."""

    ptr: int
    nbytes: int
    owner: Any = None


class CudaApi:
    """The few CUDA runtime calls this backend needs, over cuda-python or torch.cuda."""

    name = "cuda"

    def device_count(self) -> tuple[int, str]:
        """(visible GPUs, why none when 0). Never raises."""
        raise NotImplementedError

    def set_device(self, device_id: int) -> None:
        raise NotImplementedError

    def device_name(self, device_id: int) -> str:
        raise NotImplementedError

    def capability(self, device_id: int) -> str:
        """Compute capability as ``"major.minor"`` (``"8.7"`` on Orin)."""
        raise NotImplementedError

    def alloc(self, nbytes: int, device_id: int) -> DeviceBuffer:
        raise NotImplementedError

    def free(self, buf: DeviceBuffer) -> None:
        raise NotImplementedError

    def stream_create(self, device_id: int) -> Any:
        raise NotImplementedError

    def stream_handle(self, stream: Any) -> int:
        """The ``cudaStream_t`` address ``execute_async_v3`` takes."""
        raise NotImplementedError

    def stream_destroy(self, stream: Any) -> None:
        raise NotImplementedError

    def upload(self, buf: DeviceBuffer, array: np.ndarray, stream: Any) -> None:
        """Copy a C-contiguous host array into ``buf`` on ``stream``."""
        raise NotImplementedError

    def download(self, array: np.ndarray, buf: DeviceBuffer, stream: Any) -> None:
        """Copy ``buf`` into a C-contiguous host array on ``stream`` (valid after ``synchronize``)."""
        raise NotImplementedError

    def synchronize(self, stream: Any) -> None:
        raise NotImplementedError


class _CudaPython(CudaApi):
    """cuda-python's runtime bindings: every call returns ``(cudaError_t, *results)``."""

    def __init__(self, rt: Any, name: str) -> None:
        self._rt = rt
        self.name = name
        self._ok = rt.cudaError_t.cudaSuccess
        try:  # cuda-bindings 13 deprecates int(cuda_obj) in favour of this
            from cuda.bindings.utils import get_cuda_native_handle

            self._native: Any = get_cuda_native_handle
        except ImportError:
            self._native = None

    def _call(self, what: str, result: Any) -> Any:
        values = result if isinstance(result, tuple) else (result,)
        err, rest = values[0], values[1:]
        if err != self._ok:
            raise BackendError(f"CUDA {what} failed: {getattr(err, 'name', err)}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    def device_count(self) -> tuple[int, str]:
        try:
            err, count = self._rt.cudaGetDeviceCount()
        except Exception as exc:  # no driver library at all
            return 0, f"cudaGetDeviceCount failed: {type(exc).__name__}: {exc}"
        if err != self._ok:
            return 0, f"cudaGetDeviceCount: {getattr(err, 'name', err)}"
        return int(count), "" if count else "cudaGetDeviceCount found 0 devices"

    def set_device(self, device_id: int) -> None:
        self._call("cudaSetDevice", self._rt.cudaSetDevice(device_id))

    def _props(self, device_id: int) -> Any:
        return self._call("cudaGetDeviceProperties", self._rt.cudaGetDeviceProperties(device_id))

    def device_name(self, device_id: int) -> str:
        name = self._props(device_id).name
        if isinstance(name, bytes):
            name = name.split(b"\x00", 1)[0].decode("utf-8", "replace")
        return str(name).strip()

    def capability(self, device_id: int) -> str:
        props = self._props(device_id)
        return f"{int(props.major)}.{int(props.minor)}"

    def alloc(self, nbytes: int, device_id: int) -> DeviceBuffer:
        ptr = self._call("cudaMalloc", self._rt.cudaMalloc(max(int(nbytes), 1)))
        return DeviceBuffer(int(ptr), int(nbytes))

    def free(self, buf: DeviceBuffer) -> None:
        if buf.ptr:
            self._call("cudaFree", self._rt.cudaFree(buf.ptr))
            buf.ptr = 0

    def stream_create(self, device_id: int) -> Any:
        return self._call("cudaStreamCreate", self._rt.cudaStreamCreate())

    def stream_handle(self, stream: Any) -> int:
        return int(self._native(stream)) if self._native is not None else int(stream)

    def stream_destroy(self, stream: Any) -> None:
        self._call("cudaStreamDestroy", self._rt.cudaStreamDestroy(stream))

    def upload(self, buf: DeviceBuffer, array: np.ndarray, stream: Any) -> None:
        if array.nbytes:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._call(
                "cudaMemcpyAsync", self._rt.cudaMemcpyAsync(buf.ptr, array.ctypes.data, array.nbytes, kind, stream)
            )

    def download(self, array: np.ndarray, buf: DeviceBuffer, stream: Any) -> None:
        if array.nbytes:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._call(
                "cudaMemcpyAsync", self._rt.cudaMemcpyAsync(array.ctypes.data, buf.ptr, array.nbytes, kind, stream)
            )

    def synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", self._rt.cudaStreamSynchronize(stream))


class _TorchCuda(CudaApi):
    """torch.cuda: buffers are uint8 tensors (torch's caching allocator keeps freed
    blocks for reuse, so ``release`` returns them to torch, not to the driver)."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self.name = f"torch {torch.__version__} (torch.cuda)"

    def device_count(self) -> tuple[int, str]:
        try:
            if not self._torch.cuda.is_available():
                return 0, "torch.cuda.is_available() is False"
            return int(self._torch.cuda.device_count()), ""
        except Exception as exc:
            return 0, f"torch.cuda failed: {type(exc).__name__}: {exc}"

    def set_device(self, device_id: int) -> None:
        self._torch.cuda.set_device(device_id)

    def device_name(self, device_id: int) -> str:
        return str(self._torch.cuda.get_device_name(device_id))

    def capability(self, device_id: int) -> str:
        major, minor = self._torch.cuda.get_device_capability(device_id)
        return f"{int(major)}.{int(minor)}"

    def alloc(self, nbytes: int, device_id: int) -> DeviceBuffer:
        t = self._torch.empty(max(int(nbytes), 1), dtype=self._torch.uint8, device=f"cuda:{device_id}")
        return DeviceBuffer(int(t.data_ptr()), int(nbytes), t)

    def free(self, buf: DeviceBuffer) -> None:
        buf.owner = None
        buf.ptr = 0

    def stream_create(self, device_id: int) -> Any:
        return self._torch.cuda.Stream(device=device_id)

    def stream_handle(self, stream: Any) -> int:
        return int(stream.cuda_stream)

    def stream_destroy(self, stream: Any) -> None:
        return None  # torch destroys its streams when they are collected

    def upload(self, buf: DeviceBuffer, array: np.ndarray, stream: Any) -> None:
        if array.nbytes:
            raw = array.reshape(-1).view(np.uint8)
            if not raw.flags.writeable:  # torch.from_numpy warns on read-only arrays
                raw = raw.copy()
            with self._torch.cuda.stream(stream):
                buf.owner[: raw.size].copy_(self._torch.from_numpy(raw))

    def download(self, array: np.ndarray, buf: DeviceBuffer, stream: Any) -> None:
        if array.nbytes:
            with self._torch.cuda.stream(stream):
                host = buf.owner[: array.nbytes].cpu()  # blocking copy on this stream
            array.reshape(-1).view(np.uint8)[:] = host.numpy()

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()


@lru_cache(maxsize=1)
def _detect_cuda() -> CudaApi:
    try:
        from cuda.bindings import runtime as rt  # cuda-python >= 12.6

        return _CudaPython(rt, "cuda-python (cuda.bindings.runtime)")
    except ImportError:
        pass
    try:
        with warnings.catch_warnings():  # 12.x warns that this module is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            from cuda import cudart as rt  # type: ignore[no-redef]  # cuda-python < 13
        return _CudaPython(rt, "cuda-python (cuda.cudart)")
    except ImportError:
        pass
    if compat.is_installed("torch"):
        import torch

        return _TorchCuda(torch)
    raise MissingDependencyError(
        "the tensorrt backend needs a CUDA runtime binding for device memory and streams: "
        "pip install cuda-python (or a CUDA build of torch)"
    )


def cuda_api() -> CudaApi:
    """The CUDA binding found here, cuda-python first, else torch.cuda (detected once).
    ``MissingDependencyError`` (an ``ImportError``) when neither is installed."""
    return _detect_cuda()


# --- TensorRT's logger -------------------------------------------------------------------------

_loggers: dict[int, Any] = {}
_loggers_lock = threading.Lock()


def _logger(trt: Any) -> Any:
    """One logger per process (per tensorrt module), shared by every builder and runtime:
    TensorRT uses the logger an object was created with for everything created through it,
    and it must outlive them all. It keeps the recent errors and warnings so that a failed
    build can quote the builder's own reasons."""
    with _loggers_lock:
        found = _loggers.get(id(trt))
        if found is not None and found[0] is trt:
            return found[1]

        class _RecordingLogger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.lines: list[str] = []
                self.count = 0
                self._lock = threading.Lock()
                sev = trt.ILogger.Severity
                self._keep = {sev.INTERNAL_ERROR: "ERROR", sev.ERROR: "ERROR", sev.WARNING: "WARNING"}

            def log(self, severity: Any, msg: str) -> None:
                label = self._keep.get(severity)
                if label is None:
                    return
                with self._lock:
                    self.lines.append(f"{label}: {msg}")
                    self.count += 1
                    del self.lines[:-200]

            def mark(self) -> int:
                with self._lock:
                    return self.count

            def since(self, mark: int) -> list[str]:
                with self._lock:
                    n = min(self.count - mark, len(self.lines))
                    return self.lines[len(self.lines) - n :] if n > 0 else []

        logger = _RecordingLogger()
        _loggers[id(trt)] = (trt, logger)
        init_plugins = getattr(trt, "init_libnvinfer_plugins", None)
        if init_plugins is not None:  # plugins some ONNX ops map to; harmless otherwise
            with contextlib.suppress(Exception):
                init_plugins(logger, "")
        return logger


# --- the backend ---------------------------------------------------------------------------------


@dataclass
class _Engine:
    """What a loaded block holds. A context is not safe to use from two threads at once;
    the lock makes a block shared by two workers correct."""

    engine: Any
    context: Any
    stream: Any
    inputs: dict[str, tuple[np.dtype, tuple[int, ...], tuple[int, ...]]]  # name -> dtype, min, max shape
    outputs: dict[str, np.dtype]  # name -> dtype TensorRT writes
    onnx_dtypes: dict[str, np.dtype]  # name -> dtype the ONNX graph declares
    buffers: dict[str, DeviceBuffer]
    lock: threading.Lock = field(default_factory=threading.Lock)


class TensorRtBackend(Backend):
    """TensorRT on one GPU (or one of its DLA cores), with its precision and caches.

    Options (a device profile's processor ``options``): ``fp16``, ``int8`` (explicit Q/DQ
    quantization), ``dla_core`` (DLA with GPU fallback), ``workspace_mb`` (builder
    workspace; TensorRT's default is the device's memory), ``engine_cache_dir``,
    ``timing_cache`` (a file), ``device_id``, ``opt_batch``/``max_batch`` (the batch range
    engines are built for), ``cores`` (CPU cores of the worker thread). See the module
    docstring for what each does on TensorRT 10 and 11.
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
        self._cuda = cuda_api()
        count, why = self._cuda.device_count()
        if count == 0:
            raise BackendUnavailableError(f"tensorrt {self.version}: no CUDA GPU visible ({why})")
        if device_id >= count:
            raise BackendUnavailableError(
                f"tensorrt: device_id {device_id} is not visible; {count} CUDA GPU(s): 0..{count - 1}"
            )
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
        self._logger = _logger(trt)
        self._build_lock = threading.Lock()
        self._timing_lock = threading.Lock()
        self._builder: Any = None
        self._probe: Any = None  # (network, parser) kept for supports_operator
        if dla_core is not None:
            builder = self._get_builder()
            have = int(builder.num_DLA_cores)
            if dla_core >= have:
                cores_here = f"cores 0..{have - 1}" if have else "no DLA core"
                raise BackendUnavailableError(
                    f"tensorrt: dla_core {dla_core} does not exist here: the builder sees "
                    f"{have} DLA core(s) ({cores_here}) on GPU {device_id} ({self.gpu_name})"
                )
            if self.weak_typing and not (fp16 or int8):
                warnings.warn(
                    f"tensorrt: dla_core {dla_core} with fp16 and int8 off: the DLA runs only FP16 "
                    f"and INT8 layers, so every layer will fall back to the GPU",
                    TensorRtWarning,
                    stacklevel=2,
                )
        self._runtime = trt.Runtime(self._logger)
        if dla_core is not None:
            self._runtime.DLA_core = dla_core  # the core deserialized engines run on

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
        return True, f"tensorrt {version}, GPU(s) {gpus}, device memory and streams via {cuda.name}"

    def unsupported_ops(self, model: onnx.ModelProto) -> list[str]:
        """Q/DQ nodes TensorRT cannot run (asymmetric or uint8), Q/DQ nodes when this
        processor has ``int8`` off, and op types ``OnnxParser.supports_operator`` denies.

        ``supports_operator`` may answer yes for an op a particular attribute combination
        makes unparseable (its documentation says so): such blocks fail at load with every
        parser error listed (``TensorRtParseError``).
        """
        if not isinstance(model, onnx.ModelProto):
            model = read_source(model).proto
        bad = set(quantization_problems(model))
        if not self.int8:
            present = {n.op_type for n in _nodes(model) if n.op_type in _QDQ_OPS and n.domain in ("", "ai.onnx")}
            bad.update(f"{op} (int8 is off on this processor)" for op in present)
        parser = self._probe_parser()
        kinds = {(n.domain, n.op_type) for n in _nodes(model)}
        for domain, op in sorted(kinds):
            if op in _QDQ_OPS and domain in ("", "ai.onnx"):
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
        """Build (or take from the engine cache), deserialize, bind buffers; see the module docstring."""
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
        plan, cache = self._plan(src)
        mark = self._logger.mark()
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None and cache == "hit":
            warnings.warn(
                f"{src.name}: the cached engine does not deserialize (stale or damaged); rebuilding",
                TensorRtWarning,
                stacklevel=2,
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
        handle = self._bind(src, engine)
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
                # GPU memory, accounted (not RSS): activations + plan + I/O buffers
                "device_memory_bytes": activations,
                "engine_bytes": len(plan),
                "io_bytes": io_bytes,
                "cores": self.cores,
            },
        )

    def run(self, block: LoadedBlock, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        handle: _Engine = check_resident(block)
        inputs = select_feeds(block, feeds)
        cuda = self._cuda
        with handle.lock:
            if handle.context is None:
                raise BackendError(f"block {block.block_id} on {self.name} was released; load it again")
            try:
                cuda.set_device(self.device_id)
                host: dict[str, np.ndarray] = {}
                for name, (dtype, lo, hi) in handle.inputs.items():
                    arr = np.ascontiguousarray(inputs[name], dtype=dtype)
                    if arr.ndim != len(lo) or any(
                        not lo_d <= d <= hi_d for d, lo_d, hi_d in zip(arr.shape, lo, hi, strict=True)
                    ):
                        raise BackendError(
                            f"block {block.block_id} on {self.name}: input {name!r} has shape "
                            f"{arr.shape}; this engine takes {lo} to {hi} (the batch range comes "
                            f"from opt_batch/max_batch)"
                        )
                    if not handle.context.set_input_shape(name, arr.shape):
                        raise BackendError(
                            f"block {block.block_id} on {self.name}: TensorRT refused shape {arr.shape} for {name!r}"
                        )
                    cuda.upload(handle.buffers[name], arr, handle.stream)
                    host[name] = arr  # alive until the stream is synchronized
                outs = {
                    name: np.empty(tuple(int(d) for d in handle.context.get_tensor_shape(name)), dtype=dtype)
                    for name, dtype in handle.outputs.items()
                }
                if not handle.context.execute_async_v3(cuda.stream_handle(handle.stream)):
                    raise BackendError(
                        f"block {block.block_id} on {self.name}: execute_async_v3 failed: "
                        + ("; ".join(self._logger.since(0)[-3:]) or "no error logged")
                    )
                for name, arr in outs.items():
                    cuda.download(arr, handle.buffers[name], handle.stream)
                cuda.synchronize(handle.stream)
            except BackendError:
                raise
            except Exception as exc:
                raise BackendError(
                    f"block {block.block_id} on {self.name} failed: {type(exc).__name__}: {exc}"
                ) from exc
        result: dict[str, np.ndarray] = {}
        for name in block.output_names:
            arr = outs[name]
            want = handle.onnx_dtypes.get(name, arr.dtype)
            result[name] = arr if arr.dtype == want else arr.astype(want)
        return result

    def release(self, block: LoadedBlock) -> None:
        """Free the I/O buffers, then drop the context before the engine, then the stream."""
        handle: _Engine | None = block.handle
        if handle is not None and not block.info.get("released"):
            with handle.lock:
                cuda = self._cuda
                with contextlib.suppress(Exception):  # release must not fail on a broken stream
                    cuda.set_device(self.device_id)
                    cuda.synchronize(handle.stream)
                for buf in handle.buffers.values():
                    with contextlib.suppress(Exception):
                        cuda.free(buf)
                handle.buffers.clear()
                handle.context = None  # the context goes before its engine
                handle.engine = None
                if handle.stream is not None:
                    with contextlib.suppress(Exception):
                        cuda.stream_destroy(handle.stream)
                    handle.stream = None
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
            "cores": self.cores,
        }

    # --- internals ------------------------------------------------------------------

    def _get_builder(self) -> Any:
        if self._builder is None:
            self._cuda.set_device(self.device_id)
            self._builder = self._trt.Builder(self._logger)
        return self._builder

    def _probe_parser(self) -> Any:
        """A parser kept for ``supports_operator`` (it needs a network to exist)."""
        with self._build_lock:
            if self._probe is None:
                network = self._get_builder().create_network(0)
                self._probe = (network, self._trt.OnnxParser(network, self._logger))
            return self._probe[1]

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

    def _plan(self, src: ModelSource, *, rebuild: bool = False) -> tuple[bytes, str]:
        """(serialized plan, where it came from): the engine cache or a build."""
        if self.engine_cache_dir is None:
            return self._build(src), "off"
        key = self.cache_key(src)
        path = self.engine_cache_dir / f"{key}.engine"
        if not rebuild and path.is_file():
            return path.read_bytes(), "hit"
        plan = self._build(src)
        _atomic_write(path, plan)
        meta = {
            "block": src.name,
            "model_sha256": content_sha256(src),
            **{k: v for k, v in self.describe().items() if k != "cores"},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "schema": ENGINE_CACHE_SCHEMA,
        }
        _atomic_write(path.with_suffix(".json"), (json.dumps(meta, indent=2) + "\n").encode())
        return plan, "miss"

    def _build(self, src: ModelSource) -> bytes:
        trt = self._trt
        with self._build_lock:
            self._cuda.set_device(self.device_id)
            builder = self._get_builder()
            network = builder.create_network(0)  # explicit batch: the only mode since TensorRT 10
            parser = trt.OnnxParser(network, self._logger)
            if isinstance(src.data, str):
                parsed = parser.parse_from_file(src.data)  # finds external weights beside the file
            else:
                parsed = parser.parse(src.data)
            if not parsed:
                errors = [_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
                raise TensorRtParseError(src.name, errors)
            config = builder.create_builder_config()
            if self.workspace_mb is not None:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mb << 20)
            if self.fp16:
                config.set_flag(trt.BuilderFlag.FP16)
            if self.int8 and self.weak_typing:
                config.set_flag(trt.BuilderFlag.INT8)  # weakly typed Q/DQ networks need it
            if self.dla_core is not None:
                config.default_device_type = trt.DeviceType.DLA
                config.DLA_core = self.dla_core
                config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
            profile = None
            for i in range(network.num_inputs):
                tensor = network.get_input(i)
                shapes = input_profile(src.name, tensor.name, tuple(tensor.shape), self.batch)
                if shapes is not None:
                    if profile is None:  # not `profile or ...`: a partly set profile is falsy
                        profile = builder.create_optimization_profile()
                    profile.set_shape(tensor.name, *shapes)
            if profile is not None:
                config.add_optimization_profile(profile)
            timing = self._attach_timing_cache(config)
            mark = self._logger.mark()
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                said = self._logger.since(mark)
                raise BackendError(
                    f"{src.name}: TensorRT {self.version} could not build an engine"
                    + (": " + " | ".join(said[-8:]) if said else " (nothing logged)")
                )
            if timing is not None:
                self._save_timing_cache(config, timing)
            return bytes(plan)

    def _attach_timing_cache(self, config: Any) -> Any:
        """Load the timing cache file into the config (an empty cache when there is none)."""
        if self.timing_cache is None:
            return None
        with self._timing_lock:
            blob = self.timing_cache.read_bytes() if self.timing_cache.is_file() else b""
        cache = None
        try:
            cache = config.create_timing_cache(blob)
            attached = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
        except Exception:
            attached = False
        if not attached:
            if blob:
                warnings.warn(
                    f"tensorrt: timing cache {self.timing_cache} was made by another TensorRT "
                    f"version or device (or is damaged); starting a new one",
                    TensorRtWarning,
                    stacklevel=3,
                )
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
        return cache

    def _save_timing_cache(self, config: Any, cache: Any) -> None:
        current = config.get_timing_cache() or cache
        blob = bytes(current.serialize())
        assert self.timing_cache is not None
        with self._timing_lock:
            _atomic_write(self.timing_cache, blob)

    def _bind(self, src: ModelSource, engine: Any) -> _Engine:
        """Execution context, stream and device buffers sized for the largest shapes."""
        trt = self._trt
        cuda = self._cuda
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {n: engine.get_tensor_mode(n) for n in names}
        trt_inputs = [n for n in names if modes[n] == trt.TensorIOMode.INPUT]
        trt_outputs = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
        onnx_outputs = [o.name for o in src.proto.graph.output]
        missing = [n for n in onnx_outputs if n not in trt_outputs]
        extra = [n for n in trt_inputs if n not in _graph_inputs(src.proto)]
        if missing or extra:
            raise BackendError(
                f"{src.name}: the engine's I/O tensors differ from the ONNX graph's (outputs missing: "
                f"{missing}, inputs not in the graph: {extra}); names are how blocks connect"
            )

        def np_dtype(name: str) -> np.dtype:
            dt = engine.get_tensor_dtype(name)
            try:
                return np.dtype(trt.nptype(dt))
            except Exception as exc:
                raise BackendError(f"{src.name}: tensor {name!r} has type {dt}, which numpy cannot hold") from exc

        context = engine.create_execution_context()
        if context is None:
            raise BackendError(f"{src.name}: TensorRT could not create an execution context (GPU memory?)")
        inputs: dict[str, tuple[np.dtype, tuple[int, ...], tuple[int, ...]]] = {}
        for name in [n for n in _graph_inputs(src.proto) if n in trt_inputs]:
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            if all(d >= 0 for d in shape):
                lo = hi = shape
            else:  # profile 0: the one this backend built (min, opt, max)
                lo_d, _, hi_d = engine.get_tensor_profile_shape(name, 0)
                lo, hi = tuple(int(d) for d in lo_d), tuple(int(d) for d in hi_d)
            inputs[name] = (np_dtype(name), lo, hi)
            if not context.set_input_shape(name, hi):
                raise BackendError(f"{src.name}: TensorRT refused the largest shape {hi} of {name!r}")
        outputs = {name: np_dtype(name) for name in onnx_outputs}
        sizes: dict[str, int] = {}
        for name, (dtype, _, hi) in inputs.items():
            sizes[name] = math.prod(hi) * dtype.itemsize
        for name, dtype in outputs.items():
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(
                    f"{src.name}: output {name!r} has a data-dependent shape {shape}; the tensorrt "
                    f"backend needs output shapes that follow from the input shapes"
                )
            sizes[name] = math.prod(shape) * dtype.itemsize
        buffers: dict[str, DeviceBuffer] = {}
        stream = None
        try:
            cuda.set_device(self.device_id)
            for name, nbytes in sizes.items():
                buffers[name] = cuda.alloc(nbytes, self.device_id)
                if not context.set_tensor_address(name, buffers[name].ptr):
                    raise BackendError(f"{src.name}: TensorRT refused the buffer of {name!r}")
            stream = cuda.stream_create(self.device_id)
        except Exception:
            for buf in buffers.values():
                with contextlib.suppress(Exception):
                    cuda.free(buf)
            raise
        return _Engine(
            engine=engine,
            context=context,
            stream=stream,
            inputs=inputs,
            outputs=outputs,
            onnx_dtypes=output_dtypes(src.proto),
            buffers=buffers,
        )
