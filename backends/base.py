"""The one protocol every backend implements.

A backend turns a *block* (a standalone ONNX model whose inputs and outputs are
float tensors at the cuts) into something runnable on one processor. It is a thin
shell over an engine: availability is queried, never assumed; everything the
engine cannot do is reported before anything is loaded.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from loom.core.errors import BackendError, ConfigError, ModelError


@dataclass
class LoadedBlock:
    """A block made resident by a backend. ``handle`` is the engine's own object."""

    block_id: str
    backend: str
    input_names: list[str]
    output_names: list[str]
    handle: Any
    #: resident memory the load added, measured with psutil (bytes; may be 0 when the
    #: allocator reused freed pages: it is a measurement, not an estimate)
    memory_bytes: int = 0
    load_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """Protocol: available here? which ops can it run? load, run, memory held, release.

    Constructors take keyword-only options (threads, cores, precision, ...), which
    come from a device profile's processor entry.
    """

    #: registry name, e.g. ``"onnxruntime"``
    name: str = ""
    #: CPU cores this processor's compute is meant to run on (``None``: wherever the OS likes)
    cores: list[int] | None = None

    @classmethod
    @abstractmethod
    def is_available(cls) -> tuple[bool, str]:
        """Whether this backend can run here, and why not when it cannot."""

    @abstractmethod
    def unsupported_ops(self, model: onnx.ModelProto) -> list[str]:
        """Every op type of ``model`` this backend cannot run (empty when all can run)."""

    @abstractmethod
    def load(self, model: onnx.ModelProto | str | Path, *, block_id: str | None = None) -> LoadedBlock:
        """Make a block resident. Raises ``UnsupportedOpsError`` listing every bad op."""

    @abstractmethod
    def run(self, block: LoadedBlock, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a loaded block; returns its outputs by name."""

    def memory_bytes(self, block: LoadedBlock) -> int:
        """Resident memory the block holds (as measured at load)."""
        return block.memory_bytes

    @abstractmethod
    def release(self, block: LoadedBlock) -> None:
        """Free what ``load`` took. The block cannot be run afterwards."""

    def describe(self) -> dict[str, Any]:
        """Name, engine version and options: part of a profile's hardware fingerprint."""
        return {"backend": self.name}

    def pin_current_thread(self) -> bool:
        """Pin the calling thread to ``self.cores``; a processor's worker calls it once.

        With one compute thread the engines run every kernel on the thread that calls
        ``run`` (docs/backends.md), so this puts the processor on its cores. False when
        there is nothing to pin or the OS cannot pin (no ``sched_setaffinity``).
        """
        return pin_current_thread(self.cores)


# --- helpers shared by the backends -------------------------------------------------


def check_cores(cores: Iterable[int] | None) -> list[int] | None:
    """Validate a ``cores`` option (CPU ids of this machine); ``ConfigError`` when bad."""
    if cores is None:
        return None
    try:
        result = sorted({int(c) for c in cores})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cores must be a list of CPU ids, got {cores!r}") from exc
    n = os.cpu_count() or 1
    bad = [c for c in result if not 0 <= c < n]
    if not result or bad:
        raise ConfigError(f"cores {list(cores)!r}: this machine has CPU ids 0..{n - 1}")
    return result


def pin_current_thread(cores: Iterable[int] | None) -> bool:
    """Restrict the calling thread (only it, not the process) to ``cores``.

    On Linux, affinity is per thread and ``sched_setaffinity(0, ...)`` means "the
    calling thread" (the kernel's pid 0), so other threads of the process keep their
    masks; threads created afterwards by this one inherit it.
    """
    if cores is None or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(0, set(cores))
    except OSError as exc:  # e.g. a core outside this container's cpuset
        raise BackendError(f"cannot pin thread to cores {sorted(cores)}: {exc}") from exc
    return True


def rss_bytes() -> int:
    """Resident set size of the whole process now (psutil imported here: it is cheap)."""
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def warm_model() -> onnx.ModelProto:
    """The smallest useful model (one Relu): loaded once per engine and thrown away, so
    the engine's one-time start-up memory is not charged to the first real block."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "warmup",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node carries in its attributes (If branches, Loop and Scan bodies)."""
    out: list[onnx.GraphProto] = []
    for attr in node.attribute:
        out.extend([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)
    return out


def op_label(domain: str, op_type: str) -> str:
    """One spelling of an op across backends: ``Conv``, ``com.microsoft.QGemm``.

    It is the spelling OpenVINO's conversion report uses, so messages read the same.
    """
    domain = "" if domain in ("", "ai.onnx") else domain
    return f"{domain}.{op_type}" if domain else op_type


@dataclass
class ModelSource:
    """A block as a backend receives it: the parsed graph plus what to hand the engine.

    ``data`` is a path (so the engine can find external weights beside it) or the
    serialized bytes. ``proto`` is read without external data: it is for metadata
    (op types, input and output names), never for weights.
    """

    proto: onnx.ModelProto
    data: str | bytes
    name: str


def read_source(model: onnx.ModelProto | str | Path | bytes, block_id: str | None = None) -> ModelSource:
    """Accept a ModelProto, a path or serialized bytes; ``ModelError`` naming it on failure."""
    if isinstance(model, onnx.ModelProto):
        data = model.SerializeToString()
        return ModelSource(model, data, block_id or _content_id(model, data))
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        name = block_id or f"<{len(data)} bytes>"
        try:
            proto = onnx.load_from_string(data)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise ModelError(f"{name}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
        return ModelSource(proto, data, block_id or _content_id(proto, data))
    if isinstance(model, (str, Path)):
        path = Path(model)
        name = block_id or str(path)
        if not path.is_file():
            raise ModelError(f"{name}: no such ONNX file ({path})")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise ModelError(f"{name}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
        return ModelSource(proto, str(path), name)
    raise ModelError(f"cannot load a block from a {type(model).__name__}: pass a ModelProto, path or bytes")


def _content_id(proto: onnx.ModelProto, data: bytes) -> str:
    """Default block id of an in-memory model: graph name plus a content hash, as in the store."""
    return f"{proto.graph.name or 'block'}@{hashlib.sha256(data).hexdigest()[:12]}"


def graph_inputs(proto: onnx.ModelProto) -> list[str]:
    """Graph inputs a caller feeds, in order (old IRs also list initializers as inputs)."""
    constants = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in constants]


def output_dtypes(proto: onnx.ModelProto) -> dict[str, np.dtype]:
    """Declared numpy dtype of each graph output (float32 when the type is not declared)."""
    result: dict[str, np.dtype] = {}
    for out in proto.graph.output:
        elem = out.type.tensor_type.elem_type
        try:
            result[out.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        except Exception:  # undefined or non-numpy type (bfloat16, strings)
            result[out.name] = np.dtype(np.float32)
    return result


#: numpy-less types engines hand back packed, two values a byte (low nibble first)
_PACKED_4BIT = ("int4", "uint4", "float4_e2m1fn")


def as_declared(arr: Any, want: np.dtype, shape: Iterable[int] | None = None) -> np.ndarray:
    """An engine's output array as the graph's declared dtype ``want``.

    numpy types convert by value. Types numpy lacks (``ml_dtypes``' bfloat16, float8,
    float4, int4) come back from engines in a container: the same bits in a type of the
    same width (OpenVINO: bf16 in float16, float8 in uint8), read by bit pattern here,
    or 4-bit values packed two a byte, unpacked to ``shape`` (the declared shape). An
    output that cannot be read back exactly raises ``BackendError`` rather than
    returning wrong values.
    """
    arr = np.asarray(arr)
    want = np.dtype(want)
    if arr.dtype == want:
        return arr
    if not _numpy_lacks(want) or _numpy_lacks(arr.dtype):  # numpy's own types: by value
        return arr.astype(want)
    if want.name in _PACKED_4BIT and arr.dtype.itemsize == 1:
        return _unpack_4bit(arr, want, shape)
    if arr.dtype.itemsize == want.itemsize and arr.dtype.kind in "iuf":
        return arr.view(want)  # the engine's bit container
    if arr.dtype.kind == "f" and want.name not in _PACKED_4BIT:
        return arr.astype(want)  # a wider float holding the values themselves
    raise BackendError(f"an output declared {want.name} came back as {arr.dtype}: cannot read it exactly")


def _numpy_lacks(dtype: np.dtype) -> bool:
    """A type numpy has only through an extension (ml_dtypes: kind "V", or "f" for float8_e5m2)."""
    return dtype.isbuiltin == 2


def _unpack_4bit(arr: np.ndarray, want: np.dtype, shape: Iterable[int] | None) -> np.ndarray:
    dims = None if shape is None else [int(d) for d in shape]
    count = None if dims is None else int(np.prod(dims, dtype=np.int64))
    if count is None or arr.size not in (count, (count + 1) // 2):
        raise BackendError(
            f"an output declared {want.name} came back as {arr.dtype}{list(arr.shape)}: its "
            f"shape is unknown, so it cannot be unpacked"
        )
    flat = arr.reshape(-1).view(np.uint8)
    if arr.size == count and count > 1:  # one value a byte already
        nibbles = flat & 0x0F
    else:
        nibbles = np.stack([flat & 0x0F, flat >> 4], axis=-1).reshape(-1)[:count]
    if want.name == "float4_e2m1fn":
        return nibbles.view(want).reshape(dims)
    values = nibbles.astype(np.int8)
    if want.name == "int4":
        values = np.where(values > 7, values - 16, values).astype(np.int8)
    return values.astype(want).reshape(dims)


def select_feeds(block: LoadedBlock, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feeds this block reads (a stitched pipeline may pass more); ``BackendError`` if any is missing."""
    missing = [n for n in block.input_names if n not in feeds]
    if missing:
        raise BackendError(
            f"block {block.block_id} on {block.backend}: missing input(s) {missing}; got {sorted(feeds)}"
        )
    return {n: feeds[n] for n in block.input_names}


def check_resident(block: LoadedBlock) -> Any:
    """The engine handle of a block, or ``BackendError`` when it was released."""
    if block.handle is None or block.info.get("released"):
        raise BackendError(f"block {block.block_id} on {block.backend} was released; load it again")
    return block.handle


def mark_released(block: LoadedBlock) -> None:
    block.handle = None
    block.info["released"] = True
