"""Devices, memory and CUDA graphs for the PyTorch backend.

Every function takes the ``torch`` module as an argument, so importing this module imports
no torch. CUDA graphs: one per input signature (shapes and dtypes) of a block, captured
on its first run with that signature and replayed afterwards. Design: docs/backends.md.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

from loom.core.errors import BackendUnavailableError, ConfigError

#: graphs kept per block; inputs of further signatures run eagerly
MAX_GRAPHS = 8
#: eager runs on a side stream before a capture (lazy initialisation, cuDNN's choices)
_WARMUP_RUNS = 2
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class CudaGraphWarning(RuntimeWarning):
    """A block could not be captured as a CUDA graph and runs eagerly (the reason is given)."""


def resolve_device(torch: Any, spec: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> the device blocks run on (``cuda`` is
    spelled with its index); ``BackendUnavailableError`` for a GPU this machine lacks."""
    if not isinstance(spec, str) or not _DEVICE.match(spec):
        raise ConfigError(f"torch: device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    cuda = bool(torch.cuda.is_available())
    if spec == "auto":
        spec = "cuda" if cuda else "cpu"
    if spec == "cpu":
        return "cpu"
    if not cuda:
        raise BackendUnavailableError(
            f"torch: device {spec!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU"
            + ("" if torch.version.cuda else " (it is a CPU-only build)")
        )
    index = int(spec.split(":")[1]) if ":" in spec else int(torch.cuda.current_device())
    count = int(torch.cuda.device_count())
    if index >= count:
        raise BackendUnavailableError(f"torch: device {spec!r}: this machine has cuda:0..cuda:{count - 1}")
    return f"cuda:{index}"


def device_names(torch: Any) -> list[str]:
    """``cpu`` and each CUDA GPU this torch sees, with its name."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    return names


def allocated(torch: Any, device: str) -> int:
    """Bytes the CUDA caching allocator has handed out on ``device`` (0 on the CPU)."""
    if not device.startswith("cuda"):
        return 0
    torch.cuda.synchronize(device)
    return int(torch.cuda.memory_allocated(device))


def tensor_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once."""
    storages: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def free_tensors(module: Any) -> None:
    """Replace every parameter and buffer with an empty tensor: fx's GraphModule sits in a
    reference cycle (its graph points back at it), so dropping it frees nothing until the
    garbage collector runs; emptying its tensors frees the memory now."""
    module._apply(lambda t: t.new_empty(0))


@dataclass
class _Captured:
    graph: Any
    inputs: list[Any]
    outputs: Any


class CudaGraphs:
    """A block's CUDA graphs: ``graphs(inputs)`` replays the one captured for these input
    shapes and dtypes (capturing it on first sight), or runs the module eagerly when the
    capture failed or ``MAX_GRAPHS`` signatures are captured already.

    The outputs of a replay are the graph's own tensors, overwritten by the next replay:
    the caller copies them out before releasing the block's lock. ``bytes`` is what the
    captures took from the allocator (static inputs, outputs, each graph's private pool).
    """

    def __init__(self, torch: Any, module: Any, device: str) -> None:
        self.torch = torch
        self.module = module
        self.device = device
        self.entries: dict[tuple[Any, ...], _Captured | None] = {}
        self.bytes = 0
        self.failures: list[str] = []

    def __call__(self, *inputs: Any) -> Any:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        if key not in self.entries:
            if len(self.entries) >= MAX_GRAPHS:
                return self.module(*inputs)
            self.entries[key] = self._capture(inputs)
        entry = self.entries[key]
        if entry is None:
            return self.module(*inputs)
        for static, t in zip(entry.inputs, inputs, strict=True):
            static.copy_(t)
        entry.graph.replay()
        return entry.outputs

    def _capture(self, inputs: tuple[Any, ...]) -> _Captured | None:
        torch = self.torch
        before = allocated(torch, self.device)
        try:
            static = [t.clone() for t in inputs]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(_WARMUP_RUNS):
                    self.module(*static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other workers may use CUDA while this one captures
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self.module(*static)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.failures.append(reason)
            warnings.warn(f"CUDA graph capture failed, running eagerly: {reason}", CudaGraphWarning, stacklevel=3)
            return None
        self.bytes += max(0, allocated(torch, self.device) - before)
        return _Captured(graph, static, outputs)

    def release(self) -> None:
        """Drop every graph and its memory pool."""
        for entry in self.entries.values():
            if entry is not None:
                entry.graph.reset()
        self.entries.clear()
