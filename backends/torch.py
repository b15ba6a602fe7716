"""PyTorch: blocks converted from ONNX to ``torch.nn.Module`` (onnx2torch), run eagerly on
the CPU or a CUDA GPU, optionally replayed as CUDA graphs.

``torch`` and ``onnx2torch`` are optional (``pip install 'sparseloom[torch]'``): imported on
first use, so importing this module imports neither. Helpers beside it: ``_torch_convert``
(imports, converters, op checks), ``_torch_qdq`` (QDQ int8 and Reduce* converters),
``_torch_cuda`` (devices, memory, CUDA graphs). Precision, threads, memory: docs/backends.md.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends import _torch_convert as conv
from backends._torch_cuda import (
    CudaGraphs,
    CudaGraphWarning,
    allocated,
    device_names,
    free_tensors,
    resolve_device,
    tensor_bytes,
)
from backends.base import (
    Backend,
    LoadedBlock,
    check_cores,
    check_resident,
    graph_inputs,
    mark_released,
    read_source,
    select_feeds,
)
from loom.core.errors import BackendError, ConfigError, UnsupportedOpsError

__all__ = ["CudaGraphWarning", "TorchBackend"]

#: how fp16 blocks may run on the CPU
CPU_FP16 = ("float32", "float16")
#: feeds of a widened fp16 block enter the module as float32
_HALF_AS_FLOAT = {np.dtype(np.float16): np.dtype(np.float32)}

_warm_lock = threading.Lock()
_warmed: set[str] = set()


@dataclass
class _Module:
    """What a loaded block holds. Runs hold the lock: CUDA graphs replay into shared buffers."""

    module: Any
    graphs: CudaGraphs | None
    #: dtype each feed enters the module at; the dtype each output is returned at
    inputs: dict[str, np.dtype]
    outputs: dict[str, np.dtype]
    #: memory at load (before any CUDA graph was captured)
    base_bytes: int
    lock: threading.Lock


class TorchBackend(Backend):
    """PyTorch on one device: ``auto`` (the GPU when torch sees one), ``cpu``, ``cuda[:N]``.

    ``threads``: torch's intra-op threads for the threads that run this processor's blocks
    (``None``: leave torch's setting alone); ``cores``: CPU cores the worker pins itself to;
    ``cuda_graphs``: capture each block as a CUDA graph per input shape (cuda only);
    ``cpu_fp16``: how fp16 blocks run on the CPU, ``float32`` (widened: torch's CPU float16
    kernels are 9-40x slower here) or ``float16``. On a GPU they always run in float16.
    """

    name = "torch"

    def __init__(
        self,
        *,
        device: str = "auto",
        threads: int | None = 1,
        cores: list[int] | None = None,
        cuda_graphs: bool = False,
        cpu_fp16: str = "float32",
    ) -> None:
        torch, _ = conv.require()  # MissingDependencyError (an ImportError) saying what to install
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            # 0 ("one per core") would defeat pinning a processor to its cores
            raise ConfigError(f"torch: threads must be an integer >= 1 or None, got {threads!r}")
        self.device = resolve_device(torch, device)
        if cuda_graphs and self.device == "cpu":
            raise ConfigError(
                f"torch: cuda_graphs needs a CUDA device; device {device!r} runs on the CPU here"
            )
        if cpu_fp16 not in CPU_FP16:
            raise ConfigError(f"torch: cpu_fp16 {cpu_fp16!r} is not one of {CPU_FP16}")
        self.requested_device = device
        self.cpu_fp16 = cpu_fp16
        self.threads = threads
        self.cores = check_cores(cores)
        self.cuda_graphs = bool(cuda_graphs)

    # --- protocol -------------------------------------------------------------------

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            torch, _ = conv.require()
            facts = conv.status()
        except ImportError as exc:  # MissingDependencyError included
            return False, str(exc)
        except Exception as exc:  # a broken install
            return False, f"torch is installed but does not start: {type(exc).__name__}: {exc}"
        return True, (
            f"torch {torch.__version__}, onnx2torch {facts['onnx2torch']}, devices {device_names(torch)}"
        )

    def unsupported_ops(self, model: onnx.ModelProto | str | Path | bytes) -> list[str]:
        """Every op of the block that cannot be converted, all at once: ops with no
        converter at the block's opset, then ops whose converter refuses the node's form
        (``Op (why)``), found by converting each node on its own."""
        src = read_source(model)
        return conv.unsupported(conv.full_model(src))

    def load(
        self, model: onnx.ModelProto | str | Path | bytes, *, block_id: str | None = None
    ) -> LoadedBlock:
        """Convert the block, move it to the device; ``memory_bytes`` is the CUDA allocator's
        growth across the move on a GPU, the module's parameter and buffer bytes on the CPU."""
        torch, _ = conv.require()
        src = read_source(model, block_id)
        proto = conv.full_model(src)
        if conv.missing(proto):
            raise UnsupportedOpsError(self.name, src.name, conv.unsupported(proto))
        self._use_threads(torch)
        self._warm_up(torch)
        t0 = time.perf_counter()
        widen = self.device == "cpu" and self.cpu_fp16 == "float32"
        module = self._convert(src.name, proto, widen)
        before = allocated(torch, self.device)
        with torch.no_grad():
            module.to(self.device)
        memory = allocated(torch, self.device) - before if self.device != "cpu" else tensor_bytes(module)
        seconds = time.perf_counter() - t0
        graphs = CudaGraphs(torch, module, self.device) if self.cuda_graphs else None
        names = graph_inputs(proto)
        feeds = conv.io_dtypes(i for i in proto.graph.input if i.name in names)
        handle = _Module(
            module,
            graphs,
            {n: _HALF_AS_FLOAT.get(d, d) if widen else d for n, d in feeds.items()},
            conv.io_dtypes(proto.graph.output),
            max(0, memory),
            threading.Lock(),
        )
        precision = conv.precision(proto)
        return LoadedBlock(
            block_id=src.name,
            backend=self.name,
            input_names=names,
            output_names=[o.name for o in proto.graph.output],
            handle=handle,
            memory_bytes=handle.base_bytes,
            load_seconds=seconds,
            info={
                "device": self.device,
                "precision": precision,
                # what an fp16 block computes in (widened to float32 on the CPU by default)
                "fp16_compute": ("float32" if widen else "float16") if precision == "fp16" else None,
                "threads": self.threads,
                "cores": self.cores,
                "cuda_graphs": self.cuda_graphs,
            },
        )

    def run(self, block: LoadedBlock, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds go in at the block's declared input dtypes, outputs come back as numpy
        arrays at its declared output dtypes (copies: nothing the next run overwrites)."""
        handle: _Module = check_resident(block)
        inputs = select_feeds(block, feeds)
        torch, _ = conv.require()
        self._use_threads(torch)
        try:
            with handle.lock, torch.inference_mode(), self._on_device(torch):
                if handle.module is None:  # released while this run waited for the lock
                    raise BackendError(f"block {block.block_id} on {self.name} was released")
                tensors = [self._tensor(torch, inputs[n], handle.inputs[n]) for n in block.input_names]
                result = (handle.graphs or handle.module)(*tensors)
                outputs = result if isinstance(result, (list, tuple)) else [result]
                arrays = {
                    name: _array(t, handle.outputs[name])
                    for name, t in zip(block.output_names, outputs, strict=True)
                }
                if handle.graphs is not None:
                    block.memory_bytes = handle.base_bytes + handle.graphs.bytes
                    block.info["cuda_graph_failures"] = list(handle.graphs.failures)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(
                f"block {block.block_id} on {self.name} ({self.device}) failed: {type(exc).__name__}: {exc}"
            ) from exc
        return arrays

    def release(self, block: LoadedBlock) -> None:
        """Drop the block's graphs and empty its tensors at once (see ``free_tensors``).

        On a GPU the memory goes back to torch's caching allocator, which keeps it for the
        next load rather than returning it to the driver (``torch.cuda.empty_cache()``).
        """
        handle: _Module | None = block.handle
        mark_released(block)
        if handle is None:
            return
        with handle.lock:
            if handle.graphs is not None:
                handle.graphs.release()
                handle.graphs = None
            if handle.module is not None:
                free_tensors(handle.module)
                handle.module = None

    def describe(self) -> dict[str, Any]:
        torch, _ = conv.require()
        facts = conv.status()
        info: dict[str, Any] = {
            "backend": self.name,
            "version": torch.__version__,
            "onnx2torch": facts["onnx2torch"],
            "torchvision": facts["torchvision"],
            "device": self.device,
            "threads": self.threads,
            "cores": self.cores,
            "cuda_graphs": self.cuda_graphs,
            "cpu_fp16": self.cpu_fp16,
        }
        if self.device != "cpu":
            info["device_name"] = torch.cuda.get_device_name(self.device)
            info["cuda"] = torch.version.cuda
        return info

    # --- internals ------------------------------------------------------------------

    def _convert(self, name: str, proto: onnx.ModelProto, widen: bool) -> Any:
        """onnx2torch's conversion; a refusal becomes ``UnsupportedOpsError`` listing every op."""
        try:
            return conv.convert(proto, widen=widen)
        except NotImplementedError as exc:
            raise UnsupportedOpsError(self.name, name, conv.unsupported(proto) or [str(exc)]) from exc
        except Exception as exc:
            raise BackendError(f"{name}: onnx2torch cannot convert it: {type(exc).__name__}: {exc}") from exc

    def _use_threads(self, torch: Any) -> None:
        """Give the calling thread this processor's intra-op thread count.

        ``torch.set_num_threads`` sets the calling thread's OpenMP and MKL counts and the
        default of threads that have not run a parallel kernel yet; a thread keeps the
        count it started with (measured, torch 2.13). So it is set on the thread that
        runs, whenever that thread's count differs.
        """
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def _warm_up(self, torch: Any) -> None:
        """Create the CUDA context before the first measured load (it is not the block's)."""
        with _warm_lock:
            if self.device == "cpu" or self.device in _warmed:
                return
            _warmed.add(self.device)
        torch.zeros(1, device=self.device)
        torch.cuda.synchronize(self.device)

    def _on_device(self, torch: Any) -> Any:
        """``torch.cuda.device`` for a GPU (CUDA graphs capture on the current device)."""
        return torch.cuda.device(self.device) if self.device != "cpu" else contextlib.nullcontext()

    def _tensor(self, torch: Any, value: np.ndarray, dtype: np.dtype) -> Any:
        array = np.asarray(value, dtype=dtype)
        if not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array, dtype=dtype, order="C")  # torch wants writable, contiguous
        tensor = torch.from_numpy(array)
        return tensor if self.device == "cpu" else tensor.to(self.device)


def _array(tensor: Any, dtype: np.dtype) -> np.ndarray:
    """A tensor as a numpy array of the declared dtype (a copy, off the GPU)."""
    array = tensor.detach().cpu().numpy()
    return array if array.dtype == dtype else array.astype(dtype)
