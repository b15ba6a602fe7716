"""The TensorRT backend's CUDA copies and streams (backends/_tensorrt_cuda.py), and which
binding it picks.

- ``_TorchCuda`` moves real bytes through real torch tensors on CPU torch: a shim maps
  ``cuda:N`` to the CPU and makes streams no-ops, so the copy code (views, read-only
  arrays, sizes, empty arrays) is exercised without a GPU;
- ``_CudaPython`` against a recording fake of cuda-python's runtime module (every call
  returns ``(cudaError_t, *results)``): argument order, error reporting, handles;
- binding detection: cuda-python that imports but cannot start (cuda-python 13 on a
  JetPack 6 R540 driver: ``cudaErrorInsufficientDriver``) falls back to torch's CUDA
  with the reason;
- the same copies on a real GPU (torch.cuda, and cuda-python where installed), skipped
  with the reason where there is none.
"""

from __future__ import annotations

import contextlib
import enum
import types
import warnings
from typing import Any

import numpy as np
import pytest

import backends._tensorrt_cuda as tc
from loom.core.errors import BackendError, MissingDependencyError

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'sparseloom[torch]')")


# --- _TorchCuda on CPU torch -----------------------------------------------------------------


class _Stream:
    """A torch.cuda.Stream stand-in: an id, and synchronize() counted."""

    def __init__(self, device: int | None = None) -> None:
        self.device, self.cuda_stream, self.synced = device, 0x5000 + (device or 0), 0

    def synchronize(self) -> None:
        self.synced += 1


def cpu_torch(devices: int = 1) -> Any:
    """Real torch, with ``cuda:N`` tensors made on the CPU and CUDA queries answered."""
    entered: list[Any] = []

    def empty(n, *, dtype, device):
        assert str(device).startswith("cuda:"), device
        return torch.empty(n, dtype=dtype, device="cpu")

    cuda = types.SimpleNamespace(
        is_available=lambda: devices > 0,
        device_count=lambda: devices,
        set_device=lambda i: entered.append(("set_device", i)),
        get_device_name=lambda i: f"Shim GPU {i}",
        get_device_capability=lambda i: (9, 0),
        Stream=_Stream,
        stream=lambda s: (entered.append(("stream", s)), contextlib.nullcontext())[1],
    )
    shim = types.SimpleNamespace(
        __version__=torch.__version__, empty=empty, uint8=torch.uint8,
        from_numpy=torch.from_numpy, cuda=cuda, entered=entered,
    )  # fmt: skip
    return shim


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.int64])
def test_torch_binding_round_trip_on_cpu_torch(dtype):
    shim = cpu_torch()
    api = tc._TorchCuda(shim)
    assert api.device_count() == (1, "") and api.capability(0) == "9.0"
    x = (np.arange(24).reshape(2, 3, 4) % 100).astype(dtype)
    buf = api.alloc(x.nbytes + 16, 0)  # buffers are sized for max_batch: bigger than a run's feed
    assert buf.nbytes == x.nbytes + 16 and buf.ptr == buf.owner.data_ptr() and buf.owner.numel() == x.nbytes + 16
    stream = api.stream_create(0)
    api.upload(buf, x, stream)
    out = np.empty_like(x)
    api.download(out, buf, stream)
    api.synchronize(stream)
    np.testing.assert_array_equal(out, x)
    assert stream.synced == 1 and api.stream_handle(stream) == 0x5000
    assert [e for e in shim.entered if e[0] == "stream"] == [("stream", stream)] * 2  # both copies on the block's stream
    api.free(buf)
    assert buf.ptr == 0 and buf.owner is None  # back to torch's allocator


def test_torch_binding_copies_read_only_and_empty_arrays():
    api = tc._TorchCuda(cpu_torch())
    x = np.arange(8, dtype=np.float32)
    x.flags.writeable = False  # torch.from_numpy warns on read-only arrays: the binding copies first
    buf = api.alloc(x.nbytes, 0)
    stream = api.stream_create(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        api.upload(buf, x, stream)
    out = np.zeros(8, np.float32)
    api.download(out, buf, stream)
    np.testing.assert_array_equal(out, x)
    empty = np.zeros((0, 4), np.float32)
    api.upload(buf, empty, stream)  # nothing to copy: no call, no error
    api.download(empty, buf, stream)
    assert api.alloc(0, 0).owner.numel() == 1  # a zero-size tensor still gets an address


def test_torch_binding_reports_no_gpu_without_raising():
    assert tc._TorchCuda(cpu_torch(devices=0)).device_count() == (0, "torch.cuda.is_available() is False")
    broken = cpu_torch()
    broken.cuda.is_available = lambda: 1 / 0
    count, why = tc._TorchCuda(broken).device_count()
    assert count == 0 and "ZeroDivisionError" in why


# --- _CudaPython against a recording fake runtime ----------------------------------------------


class FakeRuntime:
    """cuda-python's runtime module as documented: each call returns (cudaError_t, *results)."""

    def __init__(self, *, count_error: str = "cudaSuccess", devices: int = 1) -> None:
        self.cudaError_t = enum.Enum(
            "cudaError_t", ["cudaSuccess", "cudaErrorInsufficientDriver", "cudaErrorMemoryAllocation"]
        )
        self.cudaMemcpyKind = enum.Enum("cudaMemcpyKind", ["cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost"])
        self.count_error, self.devices = getattr(self.cudaError_t, count_error), devices
        self.calls: list[tuple[Any, ...]] = []
        self.fail_malloc = False

    def cudaGetDeviceCount(self):
        self.calls.append(("count",))
        return self.count_error, (self.devices if self.count_error.name == "cudaSuccess" else 0)

    def cudaSetDevice(self, i):
        self.calls.append(("set", i))
        return (self.cudaError_t.cudaSuccess,)

    def cudaGetDeviceProperties(self, i):
        props = types.SimpleNamespace(name=b"NVIDIA H200\x00\x00junk", major=9, minor=0)
        return self.cudaError_t.cudaSuccess, props

    def cudaMalloc(self, n):
        self.calls.append(("malloc", n))
        if self.fail_malloc:
            return self.cudaError_t.cudaErrorMemoryAllocation, 0
        return self.cudaError_t.cudaSuccess, 0xD000

    def cudaFree(self, ptr):
        self.calls.append(("free", ptr))
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamCreate(self):
        return self.cudaError_t.cudaSuccess, 77

    def cudaStreamDestroy(self, s):
        self.calls.append(("stream_destroy", s))
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        self.calls.append(("memcpy", dst, src, n, kind.name, stream))
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, s):
        self.calls.append(("sync", s))
        return (self.cudaError_t.cudaSuccess,)


def test_cuda_python_calls_and_argument_order():
    rt = FakeRuntime()
    api = tc._CudaPython(rt, "cuda-python (fake)")
    assert api.device_count() == (1, "")
    assert api.device_name(0) == "NVIDIA H200" and api.capability(0) == "9.0"
    buf = api.alloc(0, 0)
    assert ("malloc", 1) in rt.calls and buf.ptr == 0xD000 and buf.nbytes == 0
    x = np.arange(4, dtype=np.float32)
    stream = api.stream_create(0)
    api.upload(buf, x, stream)
    api.download(x, buf, stream)
    api.upload(buf, np.zeros(0, np.float32), stream)  # empty: no copy
    api.synchronize(stream)
    copies = [c for c in rt.calls if c[0] == "memcpy"]
    assert copies == [
        ("memcpy", 0xD000, x.ctypes.data, 16, "cudaMemcpyHostToDevice", 77),  # dst, src, bytes, kind, stream
        ("memcpy", x.ctypes.data, 0xD000, 16, "cudaMemcpyDeviceToHost", 77),
    ]
    api.free(buf)
    api.free(buf)  # freed once: the second is a no-op
    assert rt.calls.count(("free", 0xD000)) == 1
    api.stream_destroy(stream)
    assert ("stream_destroy", 77) in rt.calls


def test_cuda_python_errors_name_the_call_and_the_error():
    rt = FakeRuntime()
    rt.fail_malloc = True
    with pytest.raises(BackendError, match="CUDA cudaMalloc failed: cudaErrorMemoryAllocation"):
        tc._CudaPython(rt, "fake").alloc(64, 0)
    bad = FakeRuntime(count_error="cudaErrorInsufficientDriver")
    assert tc._CudaPython(bad, "fake").device_count() == (0, "cudaGetDeviceCount: cudaErrorInsufficientDriver")


# --- which binding: cuda-python that cannot start falls back to torch's CUDA -------------------


@pytest.fixture
def detect(monkeypatch):
    """Set what ``_cuda_python`` and ``_torch_cuda`` find; returns ``_detect_cuda`` uncached."""

    def setup(first: Any, second: Any):
        monkeypatch.setattr(tc, "_cuda_python", first if callable(first) else lambda: first)
        monkeypatch.setattr(tc, "_torch_cuda", lambda: second)
        tc._detect_cuda.cache_clear()
        return tc._detect_cuda()

    yield setup
    tc._detect_cuda.cache_clear()


def test_insufficient_driver_falls_back_to_torch_with_the_reason(detect):
    """cuda-python 13 on JetPack 6 (R540 < R580): imports, then every call fails."""
    cp = tc._CudaPython(FakeRuntime(count_error="cudaErrorInsufficientDriver"), "cuda-python (cuda.bindings.runtime)")
    api = detect(cp, tc._TorchCuda(cpu_torch()))
    assert isinstance(api, tc._TorchCuda)
    assert api.fallback == "cuda-python (cuda.bindings.runtime): cudaGetDeviceCount: cudaErrorInsufficientDriver"


def test_broken_cuda_python_import_falls_back_to_torch(detect):
    def broken():
        raise OSError("libcuda.so.1: cannot open shared object file")

    api = detect(broken, tc._TorchCuda(cpu_torch()))
    assert isinstance(api, tc._TorchCuda) and "does not import: OSError: libcuda.so.1" in api.fallback


def test_working_cuda_python_is_preferred_and_torch_alone_is_no_fallback(detect):
    cp = tc._CudaPython(FakeRuntime(), "cuda-python (fake)")
    assert detect(cp, tc._TorchCuda(cpu_torch())) is cp and cp.fallback == ""
    alone = detect(None, tc._TorchCuda(cpu_torch()))
    assert isinstance(alone, tc._TorchCuda) and alone.fallback == ""


def test_no_gpu_for_either_keeps_cuda_python_and_its_reason(detect):
    cp = tc._CudaPython(FakeRuntime(count_error="cudaErrorInsufficientDriver"), "cuda-python (fake)")
    assert detect(cp, tc._TorchCuda(cpu_torch(devices=0))) is cp
    assert cp.device_count() == (0, "cudaGetDeviceCount: cudaErrorInsufficientDriver")


def test_no_binding_at_all_says_what_to_install(detect):
    def broken():
        raise RuntimeError("driver too old")

    with pytest.raises(MissingDependencyError, match=r"pip install cuda-python.*does not import: RuntimeError"):
        detect(broken, None)


# --- on a real GPU ----------------------------------------------------------------------------


def _gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return f"no CUDA GPU here (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
    return None


def _round_trip(api: tc.CudaApi) -> None:
    x = np.random.default_rng(0).standard_normal((8, 33)).astype(np.float32)  # odd size: no alignment luck
    buf = api.alloc(x.nbytes, 0)
    stream = api.stream_create(0)
    try:
        api.upload(buf, x, stream)
        out = np.empty_like(x)
        api.download(out, buf, stream)
        api.synchronize(stream)
        np.testing.assert_array_equal(out, x)
        assert api.stream_handle(stream) != 0  # a real stream, not the legacy default one
    finally:
        api.free(buf)
        api.stream_destroy(stream)


def test_gpu_torch_binding_round_trip():
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    api = tc._TorchCuda(torch)
    count, _ = api.device_count()
    assert count >= 1 and api.device_name(0)
    _round_trip(api)


def test_gpu_cuda_python_round_trip():
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    try:
        api = tc._cuda_python()
    except Exception as exc:
        pytest.skip(f"cuda-python does not import here: {type(exc).__name__}: {exc}")
    if api is None:
        pytest.skip("cuda-python is not installed here (pip install cuda-python)")
    count, why = api.device_count()
    if not count:
        pytest.skip(f"cuda-python cannot start here ({why}); the backend uses torch's CUDA then")
    _round_trip(api)
