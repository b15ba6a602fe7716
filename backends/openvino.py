"""OpenVINO: Intel's engine, reading ONNX directly, on its CPU (or GPU/NPU) plugin.

``openvino`` is optional: it is imported on first use through ``loom.core.compat.require``,
so importing this module costs nothing and a missing package says what to install.
Precision (f32 by default, to match onnxruntime) and threads and cores: docs/backends.md.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.base import (
    Backend,
    LoadedBlock,
    ModelSource,
    as_declared,
    check_cores,
    check_resident,
    graph_inputs,
    mark_released,
    op_label,
    output_dtypes,
    read_source,
    rss_bytes,
    select_feeds,
    subgraphs,
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

PRECISIONS = ("f32", "bf16", "f16")
HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
#: devices that stand for others ("AUTO:GPU,CPU"); their targets are checked by OpenVINO
_VIRTUAL = ("AUTO", "MULTI", "HETERO", "BATCH")
#: graph plumbing that every device "supports" and that has no ONNX op behind it
_PLUMBING = {"Parameter", "Result", "Constant"}

_core_lock = threading.Lock()
_core_instance: Any = None
_warmed: set[str] = set()


def _ov() -> Any:
    return compat.require("openvino")


def _core() -> Any:
    """One ``ov.Core`` per process: it is thread-safe, and each one loads the plugins again."""
    global _core_instance
    with _core_lock:
        if _core_instance is None:
            _core_instance = _ov().Core()
        return _core_instance


@dataclass
class _Compiled:
    """What a loaded block holds: the compiled model and its one infer request.

    An infer request is not safe to use from two threads at once; the lock makes a
    block shared by two workers correct (and costs nothing uncontended).
    """

    compiled: Any
    request: Any
    #: ONNX input name -> compiled model input port (inputs the engine dropped have none)
    inputs: dict[str, Any]
    outputs: dict[str, Any]  # ONNX output name -> compiled model output port
    dtypes: dict[str, np.dtype]
    lock: threading.Lock


class OpenVinoBackend(Backend):
    """OpenVINO on one device, with its inference precision, threads and cores."""

    name = "openvino"

    def __init__(
        self,
        *,
        device: str = "CPU",
        precision: str = "f32",
        threads: int = 1,
        cores: list[int] | None = None,
        performance_hint: str = "LATENCY",
        cache_dir: str | None = None,
        cpu_pinning: bool = False,
    ) -> None:
        ov = _ov()  # MissingDependencyError (an ImportError) saying what to pip install
        if precision not in PRECISIONS:
            raise ConfigError(f"openvino: precision {precision!r} is not one of {PRECISIONS}")
        if performance_hint not in HINTS:
            raise ConfigError(f"openvino: performance_hint {performance_hint!r} is not one of {HINTS}")
        if threads < 1:
            raise ConfigError(f"openvino: threads must be >= 1, got {threads}")
        self.cores = check_cores(cores)
        if cpu_pinning and self.cores is not None:
            raise ConfigError(
                "openvino: cpu_pinning=True lets OpenVINO choose the cores itself, which "
                "overrides cores=...; use one or the other"
            )
        available = list(_core().available_devices)
        if not _device_present(device, available):
            raise BackendUnavailableError(
                f"openvino device {device!r} is not available here; devices: {available}"
            )
        self.device = device
        self.precision = precision
        self.threads = int(threads)
        self.performance_hint = performance_hint
        self.cache_dir = cache_dir
        self.cpu_pinning = cpu_pinning
        self._version = ov.__version__

    # --- protocol -------------------------------------------------------------------

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            ov = _ov()
            devices = list(_core().available_devices)
        except ImportError as exc:  # MissingDependencyError included
            return False, str(exc)
        except Exception as exc:  # a broken install or plugin
            return False, f"openvino is installed but does not start: {type(exc).__name__}: {exc}"
        if not devices:
            return False, f"openvino {ov.__version__} sees no device"
        return True, f"openvino {ov.__version__}, devices {devices}"

    def unsupported_ops(self, model: onnx.ModelProto) -> list[str]:
        """Ops the ONNX frontend cannot convert, else ops the device cannot run.

        Conversion comes first: an op with no conversion rule stops ``read_model``, and
        the frontend's partial conversion then lists every such op. Once converted,
        ``query_model`` says which nodes the device takes; the refused ones are mapped
        back to the ONNX op that produced them (the CPU plugin takes everything).
        """
        src = model if isinstance(model, ModelSource) else read_source(model)
        try:
            ov_model = self._read(src)
            return self._device_unsupported(ov_model, src.proto)
        except UnsupportedOpsError as exc:
            return exc.ops
        except (ModelError, BackendError) as exc:
            # the whole model is refused, by no op in particular: one entry saying why
            return [f"<whole model> ({_first_reason(exc)})"]

    def load(
        self, model: onnx.ModelProto | str | Path | bytes, *, block_id: str | None = None
    ) -> LoadedBlock:
        """Convert, check, compile; ``memory_bytes`` is the RSS growth across all three.

        The converted ``ov.Model`` is dropped once compiled; what the allocator keeps of
        it still counts, so this can overstate residency a little (it is a measurement).
        """
        src = read_source(model, block_id)
        config = self._config()
        self._warm_up(config)
        before = rss_bytes()
        t0 = time.perf_counter()
        ov_model = self._read(src)
        bad = self._device_unsupported(ov_model, src.proto)
        if bad:
            raise UnsupportedOpsError(self.name, src.name, bad)
        try:
            compiled = _core().compile_model(ov_model, self.device, config)
            request = compiled.create_infer_request()
        except Exception as exc:
            raise BackendError(f"{src.name}: openvino cannot compile it for {self.device}: {exc}") from exc
        del ov_model
        inputs = graph_inputs(src.proto)
        in_ports, outputs = _ports(compiled, src)
        seconds = time.perf_counter() - t0
        memory = max(0, rss_bytes() - before)
        handle = _Compiled(compiled, request, in_ports, outputs, output_dtypes(src.proto), threading.Lock())
        return LoadedBlock(
            block_id=src.name,
            backend=self.name,
            input_names=inputs,
            output_names=list(outputs),
            handle=handle,
            memory_bytes=memory,
            load_seconds=seconds,
            info={
                "device": self.device,
                # what the plugin really chose: a hint it cannot honour is silently changed
                "precision": _prop(compiled, "INFERENCE_PRECISION_HINT"),
                "threads": _prop(compiled, "INFERENCE_NUM_THREADS"),
                "execution_devices": _prop(compiled, "EXECUTION_DEVICES"),
                "cores": self.cores,
                "config": {k: str(v) for k, v in config.items()},
            },
        )

    def run(self, block: LoadedBlock, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        handle: _Compiled = check_resident(block)
        inputs = select_feeds(block, feeds)
        # by port: the engine may have renamed a pass-through input or dropped an unused one
        ports = {port: inputs[name] for name, port in handle.inputs.items()}
        with handle.lock:
            try:
                # share_outputs=False: the arrays are copies, not views of the request's
                # buffers, which the next infer overwrites
                result = handle.request.infer(ports, share_outputs=False)
                out: dict[str, np.ndarray] = {}
                for name, port in handle.outputs.items():
                    # bf16/float8/4-bit outputs come back in bit containers: read by bits
                    shape = handle.request.get_tensor(port).shape
                    out[name] = as_declared(result[port], handle.dtypes[name], shape)
            except Exception as exc:
                raise BackendError(
                    f"block {block.block_id} on {self.name} ({self.device}) failed: {type(exc).__name__}: {exc}"
                ) from exc
        return out

    def release(self, block: LoadedBlock) -> None:
        mark_released(block)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "backend": self.name,
            "version": self._version,
            "device": self.device,
            "precision": self.precision,
            "threads": self.threads,
            "cores": self.cores,
            "performance_hint": self.performance_hint,
            "cpu_pinning": self.cpu_pinning,
        }
        with contextlib.suppress(Exception):  # virtual devices have no single name
            info["device_name"] = str(_core().get_property(self.device, "FULL_DEVICE_NAME"))
        return info

    # --- internals ------------------------------------------------------------------

    def _warm_up(self, config: dict[str, Any]) -> None:
        """Load the device plugin before the first measured load (~20 MB on the CPU here)."""
        with _core_lock:
            if self.device in _warmed:
                return
            _warmed.add(self.device)
        with contextlib.suppress(Exception):  # the real load reports real problems
            _core().compile_model(_core().read_model(warm_model().SerializeToString()), self.device, config)

    def _config(self) -> dict[str, Any]:
        wanted: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": self.precision,
            "PERFORMANCE_HINT": self.performance_hint,
            "INFERENCE_NUM_THREADS": self.threads,
            "ENABLE_CPU_PINNING": self.cpu_pinning,
        }
        try:
            supported = set(_core().get_property(self.device, "SUPPORTED_PROPERTIES"))
        except Exception:
            supported = set(wanted)
        # GPU/NPU plugins reject CPU-only keys (threads, pinning) instead of ignoring them
        config = {k: v for k, v in wanted.items() if k in supported}
        if self.cache_dir:
            config["CACHE_DIR"] = str(self.cache_dir)  # a core property, accepted per compile
        return config

    def _read(self, src: ModelSource) -> Any:
        """ONNX -> ov.Model; every op without a conversion rule -> ``UnsupportedOpsError``."""
        core = _core()
        try:
            if isinstance(src.data, str):
                return core.read_model(src.data)
            return core.read_model(model=src.data, weights=b"")
        except Exception as exc:
            bad = _unconverted_ops(src) or _reported_ops(str(exc), src.proto)
            if bad:
                raise UnsupportedOpsError(self.name, src.name, bad) from exc
            raise ModelError(f"{src.name}: openvino cannot read it: {exc}") from exc

    def _device_unsupported(self, ov_model: Any, proto: onnx.ModelProto) -> list[str]:
        labels = _onnx_labels(proto)
        try:
            taken = _core().query_model(ov_model, self.device)
        except Exception as exc:
            # A plugin transformation can crash on a graph it should take (OpenVINO 2026.4's
            # MultiplyPartialTransformation on the scalar scale of a QDQ attention block).
            # The device cannot run the block either way: name the op it failed on, so the
            # block is refused like any unsupported op instead of failing its caller.
            m = re.search(r"\[(\w+)\].*?node: \w+::(\w+) (\S+)", str(exc), re.S)
            if m is None:
                raise BackendError(f"openvino cannot query {self.device} about {proto.graph.name!r}: {exc}") from exc
            transformation, ov_type, name = m.groups()
            return [f"{labels.get(name) or 'openvino:' + ov_type} ({transformation} fails on {name})"]
        bad: set[str] = set()
        for op in ov_model.get_ops():
            name = op.get_friendly_name()
            if name in taken or op.get_type_name() in _PLUMBING:
                continue
            bad.add(labels.get(name) or f"openvino:{op.get_type_name()}")
        return sorted(bad)


def _device_present(device: str, available: list[str]) -> bool:
    root = device.split(":")[0].split(".")[0]
    if root in _VIRTUAL:
        return True
    return device in available or any(d.split(".")[0] == device for d in available)


def _ports(compiled: Any, src: ModelSource) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ONNX input name -> input port, ONNX output name -> output port) of a compiled model.

    By tensor name first (not position or ``get_any_name()``: a tensor may carry several
    names, and OpenVINO may reorder results). OpenVINO renames a pass-through input after
    the output it flows to (``Dropout``, ``Identity``: the input ``x`` becomes ``y``) and
    drops inputs nothing reads (``CastLike``'s type source, ``Reduce*``'s empty ``axes``):
    the inputs left unmatched then take the unmatched ports in order, where their element
    types agree, and an input with no port is not fed. Outputs left unmatched take the
    results by position when every result is accounted for.
    """
    names = graph_inputs(src.proto)
    ports = list(compiled.inputs)  # (a port's get_index() is its node's output index: 0)
    matched = {n: i for n in names for i, p in enumerate(ports) if n in p.get_names()}
    free = [i for i in range(len(ports)) if i not in matched.values()]
    types = {i.name: i.type.tensor_type.elem_type for i in src.proto.graph.input}
    for name in (n for n in names if n not in matched):
        if free and _same_type(ports[free[0]], types.get(name)):
            matched[name] = free.pop(0)
    inputs = {n: ports[i] for n, i in matched.items()}
    free = [ports[i] for i in free]
    if free:
        raise BackendError(
            f"{src.name}: openvino kept input port(s) {[sorted(p.get_names()) for p in free]} that "
            f"match no graph input of {names}; names are how blocks connect"
        )
    outputs: dict[str, Any] = {}
    results = list(compiled.outputs)
    for i, out in enumerate(src.proto.graph.output):
        match = [p for p in results if out.name in p.get_names()]
        if match:
            outputs[out.name] = match[0]
        elif len(results) == len(src.proto.graph.output):
            outputs[out.name] = results[i]
        else:
            raise BackendError(
                f"{src.name}: openvino has no result for graph output {out.name!r} (results: "
                f"{[sorted(p.get_names()) for p in results]}); names are how blocks connect"
            )
    return inputs, outputs


def _same_type(port: Any, elem_type: int | None) -> bool:
    """Whether a port's element type is the ONNX type ``elem_type`` (True when unknown)."""
    try:
        want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type or 0))
        return np.dtype(port.get_element_type().to_dtype()) == want
    except Exception:
        return True


def _reported_ops(message: str, proto: onnx.ModelProto) -> list[str]:
    """ONNX ops named in OpenVINO's "No conversion rule found for operations: util::X, ..."
    (sequence ops, which the partial conversion does not leave as framework nodes)."""
    m = re.search(r"No conversion rule found for operations: ([^\n]+)", message)
    if m is None:
        return []
    named = {part.strip().split("::")[-1] for part in m.group(1).split(",")}
    present = {(n.domain, n.op_type) for n in _all_nodes(proto.graph)}
    return sorted(op_label(d, t) for d, t in present if t in named)


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = list(graph.node)
    for node in graph.node:
        for g in subgraphs(node):
            nodes.extend(_all_nodes(g))
    return nodes


def _first_reason(exc: Exception) -> str:
    """The line of an OpenVINO error that says what is wrong (not where it was raised)."""
    lines = [ln.strip() for ln in str(exc.__cause__ or exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '", "FrontEnd API"))]
    return (useful[0] if useful else lines[0] if lines else type(exc).__name__)[:200]


def _onnx_labels(proto: onnx.ModelProto) -> dict[str, str]:
    """OpenVINO names a converted node after the ONNX node, or after its output tensor."""
    labels: dict[str, str] = {}
    for node in proto.graph.node:
        label = op_label(node.domain, node.op_type)
        for out in node.output:
            labels[out] = label
        if node.name:
            labels[node.name] = label
    return labels


def _unconverted_ops(src: ModelSource) -> list[str]:
    """Every ONNX op the frontend has no rule for, from a partial conversion.

    The frontend leaves such nodes in the graph as framework nodes that remember the
    ONNX op (``ONNX_META_type``/``ONNX_META_domain``): read those rather than parse the
    error message. Empty when the partial conversion itself fails (a broken model).
    """
    ov = _ov()
    try:
        fe = ov.frontend.FrontEndManager().load_by_framework("onnx")
        source = src.data if isinstance(src.data, str) else io.BytesIO(src.data)
        partial = fe.convert_partially(fe.load(source))
    except Exception:
        return []
    bad: set[str] = set()
    for op in partial.get_ops():
        try:
            attrs = op.get_attributes()
        except Exception:  # ops whose attributes Python cannot render
            continue
        if "ONNX_META_type" in attrs:
            bad.add(op_label(str(attrs.get("ONNX_META_domain", "")), str(attrs["ONNX_META_type"])))
    return sorted(bad)


def _prop(compiled: Any, key: str) -> Any:
    try:
        value = compiled.get_property(key)
    except Exception:
        return None
    if hasattr(value, "get_type_name"):  # an ov.Type prints as "<Type: 'float32'>"
        return value.get_type_name()
    return value if isinstance(value, (int, float, bool, list)) else str(value)
