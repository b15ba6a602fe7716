"""Building TensorRT plans: the builder and its config, the parser's errors, the logger.

``PlanBuilder`` turns a block into a serialized plan with the backend's precision, DLA,
workspace and batch-range options, loading and saving the timing cache around each
build. The TensorRT API calls and why each is made: docs/backends.md.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends._tensorrt_cache import atomic_write
from backends._tensorrt_checks import input_profile
from backends._tensorrt_cuda import CudaApi
from backends.base import ModelSource
from loom.core.errors import BackendError


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


# --- TensorRT's logger -------------------------------------------------------------------------

_loggers: dict[int, Any] = {}
_loggers_lock = threading.Lock()


def recording_logger(trt: Any) -> Any:
    """One logger per process (per tensorrt module), shared by every builder and runtime:
    TensorRT uses the logger an object was created with for everything created through it,
    and it must outlive them all. It keeps the recent errors and warnings so that a failed
    build can quote the builder's own reasons."""
    with _loggers_lock:
        found = _loggers.get(id(trt))
        if found is not None and found[0] is trt:
            return found[1]
        logger = _logger_class(trt)()
        _loggers[id(trt)] = (trt, logger)
        init_plugins = getattr(trt, "init_libnvinfer_plugins", None)
        if init_plugins is not None:  # plugins some ONNX ops map to; harmless otherwise
            with contextlib.suppress(Exception):
                init_plugins(logger, "")
        return logger


def _logger_class(trt: Any) -> type:
    """A ``trt.ILogger`` that keeps the last 200 errors and warnings, numbered."""

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

    return _RecordingLogger


def describe_parser_error(err: Any) -> str:
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


# --- the builder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOptions:
    """What a plan is built with (all of it is part of the engine cache key)."""

    fp16: bool
    int8: bool
    #: TensorRT 10 has the precision builder flags; TensorRT 11 is strongly typed only
    weak_typing: bool
    dla_core: int | None
    workspace_mb: int | None
    #: (min, opt, max) of a dynamic batch axis
    batch: tuple[int, int, int]


class PlanBuilder:
    """One ``trt.Builder`` (made on first use) and the builds of one backend, one at a time."""

    def __init__(
        self,
        trt: Any,
        logger: Any,
        cuda: CudaApi,
        *,
        device_id: int,
        options: BuildOptions,
        timing_cache: Path | None,
    ) -> None:
        self._trt = trt
        self._logger = logger
        self._cuda = cuda
        self.device_id = device_id
        self.options = options
        self.timing_cache = timing_cache
        self.version = str(trt.__version__)
        self._lock = threading.Lock()
        self._timing_lock = threading.Lock()
        self._builder: Any = None
        self._probe: Any = None  # (network, parser) kept for supports_operator

    def builder(self) -> Any:
        """The ``trt.Builder``, created on the first call (on this backend's GPU)."""
        if self._builder is None:
            self._cuda.set_device(self.device_id)
            self._builder = self._trt.Builder(self._logger)
        return self._builder

    def probe_parser(self) -> Any:
        """A parser kept for ``supports_operator`` (it needs a network to exist)."""
        with self._lock:
            if self._probe is None:
                network = self.builder().create_network(0)
                self._probe = (network, self._trt.OnnxParser(network, self._logger))
            return self._probe[1]

    def build(self, src: ModelSource) -> bytes:
        """Parse the block, configure, build: the serialized plan, or an error saying why not."""
        with self._lock:
            self._cuda.set_device(self.device_id)
            builder = self.builder()
            network = builder.create_network(0)  # explicit batch: the only mode since TensorRT 10
            self._parse(network, src)
            config = builder.create_builder_config()
            self._configure(config)
            self._add_profile(builder, network, config, src.name)
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

    def _parse(self, network: Any, src: ModelSource) -> None:
        """Fill ``network`` from the block; ``TensorRtParseError`` with every parser error."""
        parser = self._trt.OnnxParser(network, self._logger)
        if isinstance(src.data, str):
            parsed = parser.parse_from_file(src.data)  # finds external weights beside the file
        else:
            parsed = parser.parse(src.data)
        if not parsed:
            errors = [describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
            raise TensorRtParseError(src.name, errors)

    def _configure(self, config: Any) -> None:
        """Workspace, precision flags and DLA settings."""
        trt, opts = self._trt, self.options
        if opts.workspace_mb is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
        if opts.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if opts.int8 and opts.weak_typing:
            config.set_flag(trt.BuilderFlag.INT8)  # weakly typed Q/DQ networks need it
        if opts.dla_core is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = opts.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

    def _add_profile(self, builder: Any, network: Any, config: Any, block: str) -> None:
        """One optimization profile giving every dynamic batch axis the batch range."""
        profile = None
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shapes = input_profile(block, tensor.name, tuple(tensor.shape), self.options.batch)
            if shapes is not None:
                if profile is None:  # not `profile or ...`: a partly set profile is falsy
                    profile = builder.create_optimization_profile()
                profile.set_shape(tensor.name, *shapes)
        if profile is not None:
            config.add_optimization_profile(profile)

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
            atomic_write(self.timing_cache, blob)
