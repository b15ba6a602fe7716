"""CUDA device memory and streams for the TensorRT backend, over cuda-python or torch.cuda.

Which binding is used is detected once (``cuda_api()``): cuda-python's
``cuda.bindings.runtime``, else the older ``cuda.cudart``, else ``torch.cuda``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from loom.core import compat
from loom.core.errors import BackendError, MissingDependencyError

__all__ = ["CudaApi", "DeviceBuffer", "cuda_api"]

@dataclass
class DeviceBuffer:
    """GPU memory a block owns: its address and size, and what keeps it alive."""

    ptr: int
    nbytes: int
    owner: Any = None


class CudaApi:
    """The few CUDA runtime calls this backend needs, over cuda-python or torch.cuda."""

    name = "cuda"
    #: why a binding tried before this one was not used (cuda-python failing to start,
    #: e.g. ``cudaErrorInsufficientDriver`` on a driver too old for it); "" when none was
    fallback = ""

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


def _cuda_python() -> CudaApi | None:
    """cuda-python's runtime bindings (``cuda.bindings.runtime``, else the older
    ``cuda.cudart``), or None when neither is installed. A binding whose import itself
    fails (a driver library that does not load) raises: the caller records why."""
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
        return None


def _torch_cuda() -> CudaApi | None:
    if not compat.is_installed("torch"):
        return None
    import torch

    return _TorchCuda(torch)


@lru_cache(maxsize=1)
def _detect_cuda() -> CudaApi:
    """cuda-python when it starts and sees a GPU; else torch.cuda, with the reason.

    cuda-python 13 needs an R580+ driver: on JetPack 6 (R540) an unpinned ``pip install
    cuda-python`` imports fine and then every call fails with
    ``cudaErrorInsufficientDriver``. So the binding is tried (``cudaGetDeviceCount``), and
    when it fails while torch.cuda sees a GPU, torch's CUDA is used and ``fallback`` says
    why cuda-python was not (``describe()["cuda_api_fallback"]``).
    """
    why_not = ""
    try:
        first = _cuda_python()
    except Exception as exc:  # a binding installed but broken: say so, try torch
        first, why_not = None, f"cuda-python does not import: {type(exc).__name__}: {exc}"
    if first is not None:
        count, why = first.device_count()
        if count:
            return first
        why_not = f"{first.name}: {why}"
    second = _torch_cuda()
    if second is not None:
        if first is None and not why_not:
            return second  # cuda-python is not installed: torch.cuda is the binding, no fallback
        count, _ = second.device_count()
        if count or first is None:
            second.fallback = why_not
            return second
        return first  # neither sees a GPU: cuda-python's reason is the one to read
    if first is not None:
        return first
    raise MissingDependencyError(
        "the tensorrt backend needs a CUDA runtime binding for device memory and streams: "
        "pip install cuda-python (or a CUDA build of torch)"
        + (f"; {why_not}" if why_not else "")
    )


def cuda_api() -> CudaApi:
    """The CUDA binding found here, cuda-python first, else torch.cuda (detected once).
    ``MissingDependencyError`` (an ``ImportError``) when neither is installed."""
    return _detect_cuda()
