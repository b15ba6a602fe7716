"""A deserialized TensorRT engine made runnable: context, stream and device buffers.

``bind`` sizes one buffer per I/O tensor for the largest shapes, ``execute`` runs one
batch (shapes set, inputs copied in, ``execute_async_v3``, outputs copied out) and
``free`` lets go of it all in the order TensorRT wants.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends._tensorrt_cuda import CudaApi, DeviceBuffer
from backends.base import ModelSource, graph_inputs, output_dtypes
from loom.core.errors import BackendError

#: an input's dtype and its smallest and largest shapes
InputSpec = tuple[np.dtype, tuple[int, ...], tuple[int, ...]]


@dataclass
class EngineHandle:
    """What a loaded block holds. A context is not safe to use from two threads at once;
    the lock makes a block shared by two workers correct."""

    engine: Any
    context: Any
    stream: Any
    inputs: dict[str, InputSpec]  # name -> dtype, min, max shape
    outputs: dict[str, np.dtype]  # name -> dtype TensorRT writes
    onnx_dtypes: dict[str, np.dtype]  # name -> dtype the ONNX graph declares
    buffers: dict[str, DeviceBuffer]
    lock: threading.Lock = field(default_factory=threading.Lock)


def bind(trt: Any, cuda: CudaApi, src: ModelSource, engine: Any, device_id: int) -> EngineHandle:
    """Execution context, stream and device buffers sized for the largest shapes."""
    trt_inputs = _check_io(trt, src, engine)
    context = engine.create_execution_context()
    if context is None:
        raise BackendError(f"{src.name}: TensorRT could not create an execution context (GPU memory?)")
    inputs: dict[str, InputSpec] = {}
    for name in [n for n in graph_inputs(src.proto) if n in trt_inputs]:
        lo, hi = _shape_range(engine, name)
        inputs[name] = (_np_dtype(trt, engine, name, src.name), lo, hi)
        if not context.set_input_shape(name, hi):
            raise BackendError(f"{src.name}: TensorRT refused the largest shape {hi} of {name!r}")
    outputs = {o.name: _np_dtype(trt, engine, o.name, src.name) for o in src.proto.graph.output}
    sizes = _buffer_sizes(context, inputs, outputs, src.name)
    buffers, stream = _allocate(cuda, context, sizes, device_id, src.name)
    return EngineHandle(
        engine=engine,
        context=context,
        stream=stream,
        inputs=inputs,
        outputs=outputs,
        onnx_dtypes=output_dtypes(src.proto),
        buffers=buffers,
    )


def _check_io(trt: Any, src: ModelSource, engine: Any) -> list[str]:
    """The engine's input tensors, after checking its I/O names are the graph's."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    modes = {n: engine.get_tensor_mode(n) for n in names}
    trt_inputs = [n for n in names if modes[n] == trt.TensorIOMode.INPUT]
    trt_outputs = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
    missing = [o.name for o in src.proto.graph.output if o.name not in trt_outputs]
    extra = [n for n in trt_inputs if n not in graph_inputs(src.proto)]
    if missing or extra:
        raise BackendError(
            f"{src.name}: the engine's I/O tensors differ from the ONNX graph's (outputs missing: "
            f"{missing}, inputs not in the graph: {extra}); names are how blocks connect"
        )
    return trt_inputs


def _np_dtype(trt: Any, engine: Any, name: str, block: str) -> np.dtype:
    dt = engine.get_tensor_dtype(name)
    try:
        return np.dtype(trt.nptype(dt))
    except Exception as exc:
        raise BackendError(f"{block}: tensor {name!r} has type {dt}, which numpy cannot hold") from exc


def _shape_range(engine: Any, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(smallest, largest) shape of an input: its own when static, else profile 0's."""
    shape = tuple(int(d) for d in engine.get_tensor_shape(name))
    if all(d >= 0 for d in shape):
        return shape, shape
    lo_d, _, hi_d = engine.get_tensor_profile_shape(name, 0)  # the profile this backend built
    return tuple(int(d) for d in lo_d), tuple(int(d) for d in hi_d)


def _buffer_sizes(
    context: Any, inputs: Mapping[str, InputSpec], outputs: Mapping[str, np.dtype], block: str
) -> dict[str, int]:
    """Bytes of each I/O buffer at the largest input shapes (already set on ``context``)."""
    sizes = {name: math.prod(hi) * dtype.itemsize for name, (dtype, _, hi) in inputs.items()}
    for name, dtype in outputs.items():
        shape = tuple(int(d) for d in context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise BackendError(
                f"{block}: output {name!r} has a data-dependent shape {shape}; the tensorrt "
                f"backend needs output shapes that follow from the input shapes"
            )
        sizes[name] = math.prod(shape) * dtype.itemsize
    return sizes


def _allocate(
    cuda: CudaApi, context: Any, sizes: Mapping[str, int], device_id: int, block: str
) -> tuple[dict[str, DeviceBuffer], Any]:
    """Device buffers bound to the context, and a stream; nothing left allocated on failure."""
    buffers: dict[str, DeviceBuffer] = {}
    try:
        cuda.set_device(device_id)
        for name, nbytes in sizes.items():
            buffers[name] = cuda.alloc(nbytes, device_id)
            if not context.set_tensor_address(name, buffers[name].ptr):
                raise BackendError(f"{block}: TensorRT refused the buffer of {name!r}")
        stream = cuda.stream_create(device_id)
    except Exception:
        for buf in buffers.values():
            with contextlib.suppress(Exception):
                cuda.free(buf)
        raise
    return buffers, stream


def execute(
    handle: EngineHandle,
    cuda: CudaApi,
    inputs: Mapping[str, np.ndarray],
    *,
    device_id: int,
    label: str,
    logger: Any,
) -> dict[str, np.ndarray]:
    """One run, in the dtypes TensorRT writes; ``label`` (``block b on tensorrt``) starts errors."""
    with handle.lock:
        if handle.context is None:
            raise BackendError(f"{label} was released; load it again")
        try:
            cuda.set_device(device_id)
            host = _upload(handle, cuda, inputs, label)
            outs = {
                name: np.empty(tuple(int(d) for d in handle.context.get_tensor_shape(name)), dtype=dtype)
                for name, dtype in handle.outputs.items()
            }
            if not handle.context.execute_async_v3(cuda.stream_handle(handle.stream)):
                raise BackendError(
                    f"{label}: execute_async_v3 failed: "
                    + ("; ".join(logger.since(0)[-3:]) or "no error logged")
                )
            for name, arr in outs.items():
                cuda.download(arr, handle.buffers[name], handle.stream)
            cuda.synchronize(handle.stream)
            del host  # the host inputs had to live until the stream was synchronized
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"{label} failed: {type(exc).__name__}: {exc}") from exc
    return outs


def _upload(
    handle: EngineHandle, cuda: CudaApi, inputs: Mapping[str, np.ndarray], label: str
) -> dict[str, np.ndarray]:
    """Set each input's shape and copy it in; returns the host arrays the copies read."""
    host: dict[str, np.ndarray] = {}
    for name, (dtype, lo, hi) in handle.inputs.items():
        arr = np.ascontiguousarray(inputs[name], dtype=dtype)
        if arr.ndim != len(lo) or any(
            not lo_d <= d <= hi_d for d, lo_d, hi_d in zip(arr.shape, lo, hi, strict=True)
        ):
            raise BackendError(
                f"{label}: input {name!r} has shape {arr.shape}; this engine takes {lo} to {hi} "
                f"(the batch range comes from opt_batch/max_batch)"
            )
        if not handle.context.set_input_shape(name, arr.shape):
            raise BackendError(f"{label}: TensorRT refused shape {arr.shape} for {name!r}")
        cuda.upload(handle.buffers[name], arr, handle.stream)
        host[name] = arr
    return host


def free(handle: EngineHandle, cuda: CudaApi, device_id: int) -> None:
    """Free the I/O buffers, then drop the context before the engine, then the stream."""
    with handle.lock:
        with contextlib.suppress(Exception):  # release must not fail on a broken stream
            cuda.set_device(device_id)
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
