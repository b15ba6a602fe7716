"""The TensorRT backend: what can be checked without TensorRT, a fake of it, and the real thing.

Three kinds of test, and what each proves:

- pure functions and option checks (no TensorRT, no GPU): they run everywhere;
- a *fake* ``tensorrt`` module (and a fake CUDA binding) injected with
  ``monkeypatch.setitem(sys.modules, "tensorrt", ...)``: it records the calls the backend
  makes and moves bytes between fake device buffers. It proves this backend's call
  sequence (flags set, DLA settings, profiles, caches, parser errors, release order)
  against the API as documented; it proves nothing about TensorRT itself;
- a real build and run compared with onnxruntime, skipped with the reason when this
  machine has no TensorRT or no CUDA GPU.
"""

from __future__ import annotations

import enum
import gc
import importlib.machinery
import json
import os
import subprocess
import sys
import types
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_backends import small_cnn

import backends
import backends._tensorrt_cuda as trt_cuda
import backends.tensorrt as trt_backend
from backends.base import read_source
from backends.tensorrt import (
    INSTALL_HINT,
    CudaApi,
    DeviceBuffer,
    TensorRtBackend,
    TensorRtParseError,
    TensorRtWarning,
    batch_range,
    check_options,
    content_sha256,
    engine_cache_key,
    has_qdq,
    input_profile,
    quantization_problems,
)
from loom.core.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    MissingDependencyError,
    ModelError,
    UnsupportedOpsError,
)
from loom.processors.device import parse_device_profile

ROOT = Path(__file__).resolve().parents[1]


# --- models ------------------------------------------------------------------------------------


def identity_model(batch: str | int = "N") -> onnx.ModelProto:
    """y = x, x of shape (batch, 4): the fake engine copies input bytes to output bytes."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], name="id")],
        "ident",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def qdq_model(zero_point_type: int = TensorProto.INT8, zero: int = 0) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> y (explicit quantization)."""
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    dtype = helper.tensor_dtype_to_np_dtype(zero_point_type)
    zp = numpy_helper.from_array(np.array(zero, dtype), "zp")
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
            helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq"),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [scale, zp],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make tensorrt look uninstalled, whether or not this machine has it."""
    import loom.core.compat

    real = loom.core.compat.is_installed
    monkeypatch.setattr(loom.core.compat, "is_installed", lambda m: m != "tensorrt" and real(m))


# --- options, without TensorRT ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "where"),
    [
        ({"fp16": "yes"}, "fp16"),
        ({"int8": 1}, "int8"),
        ({"dla_core": -1}, "dla_core"),
        ({"dla_core": True}, "dla_core"),
        ({"workspace_mb": 0}, "workspace_mb"),
        ({"device_id": -1}, "device_id"),
        ({"max_batch": 0}, "max_batch"),
        ({"opt_batch": 4, "max_batch": 2}, "opt_batch"),
        ({"engine_cache_dir": 3}, "engine_cache_dir"),
        ({"timing_cache": ["a"]}, "timing_cache"),
    ],
)
def test_malformed_options_are_config_errors_naming_the_option(options, where):
    problems = check_options(**options)
    assert len(problems) == 1 and problems[0].startswith(where + ":"), problems
    # raised before tensorrt is imported, so a profile typo is reported on any machine
    with pytest.raises(ConfigError, match=rf"tensorrt: {where}:"):
        backends.get_backend("tensorrt", **options)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        backends.get_backend("tensorrt", fp16="on", max_batch=0, device_id=-2)
    for name in ("fp16", "max_batch", "device_id"):
        assert name in str(info.value)


def test_cache_paths_are_checked_against_this_machine(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="engine_cache_dir: .* is a file"):
        backends.get_backend("tensorrt", engine_cache_dir=str(a_file))
    with pytest.raises(ConfigError, match="timing_cache: .* is a directory"):
        backends.get_backend("tensorrt", timing_cache=tmp_path)


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(ConfigError, match="max_batch"):
        backends.get_backend("tensorrt", batch=4)


def test_device_profile_options_are_checked_without_tensorrt():
    """A profile for a Jetson is validated on a laptop: forms here, hardware there."""
    data = {
        "name": "t",
        "processors": [{"name": "dla0", "kind": "npu", "backend": "tensorrt",
                        "options": {"dla_core": "zero", "int8": True}}],
    }  # fmt: skip
    with pytest.raises(ConfigError, match=r"processors\[0\]\.options\.dla_core"):
        parse_device_profile(data, source="t.yaml")
    data["processors"][0]["options"]["dla_core"] = 0
    profile = parse_device_profile(data, source="t.yaml")
    assert profile.processor("dla0").options["dla_core"] == 0
    assert TensorRtBackend.option_problems({"max_batch": 0, "bogus": 1}) == [
        "options.max_batch: an integer >= 1, got 0"
    ]


# --- availability and the missing package ------------------------------------------------------


def test_is_available_says_why_not_here():
    ok, why = TensorRtBackend.is_available()
    if ok:
        pytest.skip(f"tensorrt runs here: {why}")
    assert isinstance(why, str) and why
    assert backends.available_backends()["tensorrt"] == (False, why)


def test_missing_tensorrt_reason_is_the_install_hint(no_tensorrt):
    assert TensorRtBackend.is_available() == (False, INSTALL_HINT)
    assert INSTALL_HINT == "tensorrt is not installed: pip install tensorrt (NVIDIA GPUs only)"


def test_get_backend_without_tensorrt_is_a_missing_dependency_with_pip_hint(no_tensorrt):
    with pytest.raises(MissingDependencyError, match="pip install tensorrt") as info:
        backends.get_backend("tensorrt")
    assert isinstance(info.value, ImportError)
    # the registry imports the module fine (it imports no engine): the class says what is missing
    assert backends.backend_class("tensorrt") is TensorRtBackend


def test_importing_the_module_imports_no_engine():
    code = (
        "import sys, backends, backends.tensorrt\n"
        "backends.backend_class('tensorrt'); backends.get_backend\n"
        "assert 'tensorrt' not in sys.modules, 'tensorrt imported eagerly'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_no_cuda_binding_is_a_missing_dependency(monkeypatch):
    import loom.core.compat

    trt_cuda._detect_cuda.cache_clear()
    real_import = __import__

    def fake_import(name, *args, **kwargs):
        if name == "cuda" or name.startswith("cuda."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", fake_import)
    monkeypatch.setattr(loom.core.compat, "is_installed", lambda m: False)
    try:
        with pytest.raises(MissingDependencyError, match="pip install cuda-python"):
            trt_backend.cuda_api()
    finally:
        trt_cuda._detect_cuda.cache_clear()


# --- pure helpers --------------------------------------------------------------------------------

KEY_ARGS: dict[str, Any] = {
    "model_sha256": "ab" * 32,
    "trt_version": "10.9.0",
    "gpu_name": "Orin",
    "compute_capability": "8.7",
    "fp16": False,
    "int8": False,
    "dla_core": None,
    "workspace_mb": None,
    "batch": (1, 1, 8),
}


def test_engine_cache_key_is_stable_and_hex():
    key = engine_cache_key(**KEY_ARGS)
    assert key == engine_cache_key(**dict(KEY_ARGS))
    assert len(key) == 64 and int(key, 16) >= 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_sha256", "cd" * 32),
        ("trt_version", "10.9.1"),
        ("trt_version", "11.4.0"),
        ("gpu_name", "NVIDIA H100"),
        ("compute_capability", "9.0"),
        ("fp16", True),
        ("int8", True),
        ("dla_core", 0),
        ("dla_core", 1),
        ("workspace_mb", 512),
        ("batch", (1, 1, 16)),
        ("batch", (4, 4, 4)),
    ],
)
def test_engine_cache_key_changes_with_every_input(field, value):
    assert engine_cache_key(**{**KEY_ARGS, field: value}) != engine_cache_key(**KEY_ARGS)


def test_batch_ranges_and_profiles():
    assert batch_range(opt_batch=2, max_batch=8, dla=False) == (1, 2, 8)
    # the DLA has no dynamic shapes: min = opt = max
    assert batch_range(opt_batch=2, max_batch=8, dla=True) == (2, 2, 2)
    assert input_profile("b", "x", (-1, 3, 8, 8), (1, 2, 8)) == ((1, 3, 8, 8), (2, 3, 8, 8), (8, 3, 8, 8))
    assert input_profile("b", "x", (2, 3), (1, 2, 8)) is None  # static: no profile needed
    with pytest.raises(ModelError, match=r"blk.*'mask'.*axis \[1\]"):
        input_profile("blk", "mask", (-1, -1), (1, 1, 8))


def test_quantization_problems_name_what_tensorrt_refuses():
    assert quantization_problems(qdq_model()) == []
    assert has_qdq(qdq_model()) and not has_qdq(identity_model())
    assert quantization_problems(qdq_model(TensorProto.UINT8, 128)) == [
        "DequantizeLinear (uint8 zero point: TensorRT runs signed, symmetric int8 only)",
        "QuantizeLinear (uint8 zero point: TensorRT runs signed, symmetric int8 only)",
    ]
    assert all("non-zero" in p for p in quantization_problems(qdq_model(TensorProto.INT8, 3)))


def test_content_hash_covers_external_weights(tmp_path):
    model = small_cnn()
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)  # fmt: skip
    first = content_sha256(read_source(path))
    data = bytearray((tmp_path / "m.data").read_bytes())
    data[0] ^= 0xFF
    (tmp_path / "m.data").write_bytes(bytes(data))
    assert content_sha256(read_source(path)) != first
    raw = model.SerializeToString()
    assert content_sha256(read_source(raw)) == content_sha256(read_source(raw))


def test_parse_error_lists_every_error_and_names_the_block():
    err = TensorRtParseError("blocks/b3.onnx", ["node 2 Frob 'f': no importer", "node 5 Blorp: bad attr"])
    text = str(err)
    assert "blocks/b3.onnx" in text and "2 error(s)" in text
    assert "[1] node 2 Frob" in text and "[2] node 5 Blorp" in text
    assert isinstance(err, BackendError) and err.errors[1].startswith("node 5")


# --- a fake tensorrt: our call sequence, not TensorRT ------------------------------------------


class FakeCuda(CudaApi):
    """Device memory as host bytearrays, keyed by made-up addresses."""

    name = "fake-cuda"

    def __init__(self, devices: int = 1) -> None:
        self.devices = devices
        self.mem: dict[int, bytearray] = {}
        self.next = 0x10000
        self.freed: list[int] = []
        self.streams_destroyed = 0
        self.synced = 0

    def device_count(self):
        return self.devices, "" if self.devices else "fake: no GPU"

    def set_device(self, device_id):
        assert device_id < self.devices

    def device_name(self, device_id):
        return "Fake Orin"

    def capability(self, device_id):
        return "8.7"

    def alloc(self, nbytes, device_id):
        ptr = self.next
        self.next += max(nbytes, 1) + 256
        self.mem[ptr] = bytearray(max(nbytes, 1))
        return DeviceBuffer(ptr, nbytes)

    def free(self, buf):
        del self.mem[buf.ptr]
        self.freed.append(buf.ptr)
        buf.ptr = 0

    def stream_create(self, device_id):
        return types.SimpleNamespace(handle=0xABC)

    def stream_handle(self, stream):
        return stream.handle

    def stream_destroy(self, stream):
        self.streams_destroyed += 1

    def upload(self, buf, array, stream):
        self.mem[buf.ptr][: array.nbytes] = array.tobytes()

    def download(self, array, buf, stream):
        array.reshape(-1).view(np.uint8)[:] = np.frombuffer(bytes(self.mem[buf.ptr][: array.nbytes]), np.uint8)

    def synchronize(self, stream):
        self.synced += 1


class FakeTrt:
    """A ``tensorrt`` module built to the documented Python API, recording every call.

    ``version`` "10.x" has the precision builder flags; "11.x" does not (strong typing).
    The engine it "builds" copies its first input to every output.
    """

    def __init__(self, cuda: FakeCuda, *, version: str = "10.9.0", dla_cores: int = 0,
                 parse_errors: tuple[str, ...] = (), unsupported: tuple[str, ...] = (),
                 build_fails: bool = False) -> None:  # fmt: skip
        self.cuda = cuda
        self.calls: list[tuple[Any, ...]] = []
        self.configs: list[Any] = []
        self.runtimes: list[Any] = []
        self.deleted: list[str] = []
        self.parse_errors = parse_errors
        self.unsupported = set(unsupported)
        self.build_fails = build_fails
        self.dla_cores = dla_cores
        self.module = self._module(version)

    def _module(self, version: str) -> types.ModuleType:
        fake = self
        m = types.ModuleType("tensorrt")
        m.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
        m.__version__ = version
        weak = version.startswith("10.")
        flags = ["GPU_FALLBACK", "TF32"] + (["FP16", "INT8"] if weak else [])
        m.BuilderFlag = enum.Enum("BuilderFlag", flags)
        m.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM"])
        m.DeviceType = enum.Enum("DeviceType", ["GPU", "DLA"])
        m.TensorIOMode = enum.Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
        m.DataType = enum.Enum("DataType", ["FLOAT", "HALF", "INT8", "INT32"])
        np_types = {m.DataType.FLOAT: np.float32, m.DataType.HALF: np.float16,
                    m.DataType.INT8: np.int8, m.DataType.INT32: np.int32}  # fmt: skip
        m.nptype = lambda dt: np_types[dt]

        class ILogger:
            Severity = enum.Enum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])

            def __init__(self) -> None:
                pass

        m.ILogger = ILogger
        m.init_libnvinfer_plugins = lambda logger, ns: fake.calls.append(("init_plugins",))

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self):
                self.inputs: list[Tensor] = []
                self.outputs: list[Tensor] = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        def dims(value_info):
            return tuple(d.dim_value if d.HasField("dim_value") else -1
                         for d in value_info.type.tensor_type.shape.dim)  # fmt: skip

        class ParserError:
            def __init__(self, i, text):
                self.i, self.text = i, text

            def code(self):
                return "ErrorCode.UNSUPPORTED_NODE"

            def desc(self):
                return self.text

            def node(self):
                return self.i

            def node_name(self):
                return f"n{self.i}"

            def node_operator(self):
                return "Frob"

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network

            def _fill(self, proto):
                if fake.parse_errors:
                    return False
                consts = {t.name for t in proto.graph.initializer}
                self.network.inputs = [Tensor(i.name, dims(i)) for i in proto.graph.input if i.name not in consts]
                self.network.outputs = [Tensor(o.name, dims(o)) for o in proto.graph.output]
                return True

            def parse(self, data):
                fake.calls.append(("parse", len(data)))
                return self._fill(onnx.load_from_string(data))

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", path))
                return self._fill(onnx.load(path))

            @property
            def num_errors(self):
                return len(fake.parse_errors)

            def get_error(self, i):
                return ParserError(i, fake.parse_errors[i])

            def supports_operator(self, op):
                return op not in fake.unsupported

        class Profile:
            def __init__(self):
                self.shapes = {}

            def __bool__(self):  # like TensorRT's: falsy until every dynamic input is set
                return False

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class TimingCache:
            def __init__(self, blob):
                self.blob = bytes(blob)

            def serialize(self):
                return self.blob + b"+entry"

        class Config:
            def __init__(self):
                self.flags: list[Any] = []
                self.pools: dict[Any, int] = {}
                self.profiles: list[Profile] = []
                self.default_device_type = m.DeviceType.GPU
                self.DLA_core = -1
                self.timing_cache = None
                self.timing_blob_in = None

            def set_flag(self, flag):
                self.flags.append(flag)

            def set_memory_pool_limit(self, pool, size):
                self.pools[pool] = size

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def create_timing_cache(self, blob):
                self.timing_blob_in = bytes(blob)
                return TimingCache(blob)

            def set_timing_cache(self, cache, ignore_mismatch):
                assert ignore_mismatch is False
                if cache.blob.startswith(b"OTHER-GPU"):
                    return False
                self.timing_cache = cache
                return True

            def get_timing_cache(self):
                return self.timing_cache

        class Builder:
            def __init__(self, logger):
                self.logger = logger
                fake.calls.append(("Builder",))

            @property
            def num_DLA_cores(self):
                return fake.dla_cores

            def create_network(self, flags):
                fake.calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                config = Config()
                fake.configs.append(config)
                return config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build",))
                if fake.build_fails:
                    self.logger.log(m.ILogger.Severity.ERROR, "fake: no implementation for layer x")
                    return None
                profile = config.profiles[0].shapes if config.profiles else {}
                meta = {
                    "inputs": [[t.name, list(t.shape)] for t in network.inputs],
                    "outputs": [[t.name, list(t.shape)] for t in network.outputs],
                    "profile": {k: [list(s) for s in v] for k, v in profile.items()},
                    "flags": sorted(f.name for f in config.flags),
                }
                return b"FAKEPLAN" + json.dumps(meta).encode()

        class Context:
            def __init__(self, engine):
                self.engine = engine
                self.shapes: dict[str, tuple[int, ...]] = {}
                self.addresses: dict[str, int] = {}
                weakref.finalize(self, fake.deleted.append, "context")

            def set_input_shape(self, name, shape):
                lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
                if len(shape) != len(lo) or not all(a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
                    return False
                self.shapes[name] = tuple(shape)
                return True

            def get_tensor_shape(self, name):
                if name in self.shapes:
                    return self.shapes[name]
                batch = next(iter(self.shapes.values()))[0]
                return tuple(batch if d < 0 else d for d in self.engine.shape_of(name))

            def set_tensor_address(self, name, ptr):
                self.addresses[name] = ptr
                return True

            def execute_async_v3(self, stream_handle):
                fake.calls.append(("execute_async_v3", stream_handle))
                first = self.engine.meta["inputs"][0][0]
                n = int(np.prod(self.shapes[first])) * 4
                for out, _ in self.engine.meta["outputs"]:
                    src = fake.cuda.mem[self.addresses[first]]
                    fake.cuda.mem[self.addresses[out]][:n] = src[:n]
                return True

        class Engine:
            device_memory_size_v2 = 4096

            def __init__(self, meta):
                self.meta = meta
                self.names = [n for n, _ in meta["inputs"]] + [n for n, _ in meta["outputs"]]
                weakref.finalize(self, fake.deleted.append, "engine")

            @property
            def num_io_tensors(self):
                return len(self.names)

            def get_tensor_name(self, i):
                return self.names[i]

            def get_tensor_mode(self, name):
                inputs = [n for n, _ in self.meta["inputs"]]
                return m.TensorIOMode.INPUT if name in inputs else m.TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name):
                return m.DataType.FLOAT

            def shape_of(self, name):
                return tuple(dict(self.meta["inputs"] + self.meta["outputs"])[name])

            def get_tensor_shape(self, name):
                return self.shape_of(name)

            def get_tensor_profile_shape(self, name, index):
                assert index == 0
                shape = self.shape_of(name)
                return self.meta["profile"].get(name, [shape, shape, shape])

            def create_execution_context(self):
                return Context(self)

        class Runtime:
            def __init__(self, logger):
                self.DLA_core = -1
                fake.runtimes.append(self)

            def deserialize_cuda_engine(self, plan):
                plan = bytes(plan)
                fake.calls.append(("deserialize", self.DLA_core))
                if not plan.startswith(b"FAKEPLAN"):
                    return None
                return Engine(json.loads(plan[len(b"FAKEPLAN"):]))

        m.Builder, m.OnnxParser, m.Runtime = Builder, OnnxParser, Runtime
        return m

    def count(self, name: str) -> int:
        return sum(1 for c in self.calls if c[0] == name)


@pytest.fixture
def fake(monkeypatch):
    """Install a fake tensorrt (10.x) and a fake CUDA binding; returns a factory to reconfigure."""

    def install(**kwargs: Any) -> FakeTrt:
        cuda = FakeCuda(kwargs.pop("devices", 1))
        world = FakeTrt(cuda, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", world.module)
        monkeypatch.setattr(trt_backend, "cuda_api", lambda: cuda)
        return world

    return install


def test_fake_build_and_run_call_sequence(fake, tmp_path):
    """Default options on TensorRT 10: explicit-batch network, a batch profile, no precision
    flags; a run sets shapes, binds, executes on the block's stream and copies back."""
    world = fake()
    trt = backends.get_backend("tensorrt", opt_batch=2, max_batch=4, workspace_mb=64)
    path = tmp_path / "ident.onnx"
    onnx.save(identity_model(), path)
    block = trt.load(path, block_id="blk-ident")
    assert ("create_network", 0) in world.calls
    assert ("parse_from_file", str(path)) in world.calls  # a path: external weights are found
    config = world.configs[-1]
    assert config.flags == []
    assert config.pools == {world.module.MemoryPoolType.WORKSPACE: 64 << 20}
    assert config.profiles[0].shapes == {"x": ((1, 4), (2, 4), (4, 4))}
    assert block.input_names == ["x"] and block.output_names == ["y"]
    assert block.info["engine_cache"] == "off" and block.info["cuda_api"] == "fake-cuda"
    assert block.info["batch_range"] == [1, 2, 4]
    io = 2 * 4 * 4 * 4  # x and y, 4 rows of 4 float32 at max_batch
    assert block.memory_bytes == 4096 + block.info["engine_bytes"] + io
    x = np.arange(12, dtype=np.float64).reshape(3, 4)  # float64 in: cast to the engine's float32
    out = trt.run(block, {"x": x, "unused": x})
    np.testing.assert_array_equal(out["y"], x.astype(np.float32))
    assert out["y"].dtype == np.float32 and out["y"].shape == (3, 4)
    assert ("execute_async_v3", 0xABC) in world.calls
    with pytest.raises(BackendError, match=r"blk-ident.*\(5, 4\).*\(1, 4\) to \(4, 4\)"):
        trt.run(block, {"x": np.zeros((5, 4), np.float32)})
    assert trt.describe()["version"] == "10.9.0" and trt.describe()["strongly_typed"] is False


def test_fake_bytes_are_parsed_from_memory(fake):
    world = fake()
    trt = backends.get_backend("tensorrt")
    trt.load(identity_model(), block_id="mem")
    assert world.count("parse") == 1 and world.count("parse_from_file") == 0


def test_fake_fp16_sets_the_flag_on_10_and_is_refused_on_11(fake):
    world = fake()
    backends.get_backend("tensorrt", fp16=True).load(identity_model())
    assert world.configs[-1].flags == [world.module.BuilderFlag.FP16]
    fake(version="11.4.0")
    with pytest.raises(BackendUnavailableError, match="TensorRT 11 removed.*fp16 variant"):
        backends.get_backend("tensorrt", fp16=True)


def test_fake_int8_is_explicit_quantization_only(fake):
    world = fake()
    backends.get_backend("tensorrt", int8=True).load(qdq_model())
    assert world.configs[-1].flags == [world.module.BuilderFlag.INT8]  # weakly typed Q/DQ needs it
    with pytest.warns(TensorRtWarning, match="no Q/DQ nodes"):
        backends.get_backend("tensorrt", int8=True).load(identity_model())
    off = backends.get_backend("tensorrt")
    assert off.unsupported_ops(qdq_model()) == [
        "DequantizeLinear (int8 is off on this processor)",
        "QuantizeLinear (int8 is off on this processor)",
    ]
    with pytest.raises(UnsupportedOpsError, match="int8 is off"):
        off.load(qdq_model())
    uint8 = backends.get_backend("tensorrt", int8=True)
    with pytest.raises(UnsupportedOpsError, match="uint8 zero point"):
        uint8.load(qdq_model(TensorProto.UINT8, 128))
    world11 = fake(version="11.4.0")
    backends.get_backend("tensorrt", int8=True).load(qdq_model())
    assert world11.configs[-1].flags == []  # strong typing: the Q/DQ nodes alone decide


def test_fake_dla_settings_and_fixed_batch(fake):
    world = fake(dla_cores=2)
    trt = backends.get_backend("tensorrt", dla_core=1, fp16=True, opt_batch=2, max_batch=8)
    block = trt.load(identity_model())
    config = world.configs[-1]
    m = world.module
    assert config.default_device_type == m.DeviceType.DLA and config.DLA_core == 1
    assert set(config.flags) == {m.BuilderFlag.FP16, m.BuilderFlag.GPU_FALLBACK}
    assert world.runtimes[-1].DLA_core == 1 and ("deserialize", 1) in world.calls
    # the DLA has no dynamic shapes: min = opt = max = opt_batch
    assert config.profiles[0].shapes == {"x": ((2, 4), (2, 4), (2, 4))}
    assert block.info["dla_core"] == 1 and block.info["batch_range"] == [2, 2, 2]
    np.testing.assert_array_equal(trt.run(block, {"x": np.ones((2, 4))})["y"], np.ones((2, 4)))
    with pytest.raises(BackendError, match="takes"):
        trt.run(block, {"x": np.ones((1, 4))})


def test_fake_missing_dla_core_is_named(fake):
    fake(dla_cores=2)
    with pytest.raises(BackendUnavailableError, match=r"dla_core 2 does not exist.*2 DLA core\(s\) \(cores 0\.\.1\)"):
        backends.get_backend("tensorrt", dla_core=2, fp16=True)
    fake(dla_cores=0)
    with pytest.raises(BackendUnavailableError, match=r"dla_core 0 .*no DLA core.*Fake Orin"):
        backends.get_backend("tensorrt", dla_core=0, int8=True)


def test_fake_dla_without_reduced_precision_warns(fake):
    fake(dla_cores=1)
    with pytest.warns(TensorRtWarning, match="fall back to the GPU"):
        backends.get_backend("tensorrt", dla_core=0)


def test_fake_no_gpu_and_bad_device_id(fake):
    fake(devices=0)
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU visible"):
        backends.get_backend("tensorrt")
    assert TensorRtBackend.is_available() == (False, "no CUDA GPU visible (fake: no GPU; tensorrt 10.9.0, fake-cuda)")
    fake(devices=1)
    with pytest.raises(BackendUnavailableError, match="device_id 1"):
        backends.get_backend("tensorrt", device_id=1)
    ok, why = TensorRtBackend.is_available()
    assert ok and "Fake Orin (sm 8.7)" in why and "fake-cuda" in why


def test_fake_timing_cache_is_loaded_before_and_saved_after(fake, tmp_path):
    world = fake()
    cache = tmp_path / "tc" / "timing.cache"
    trt = backends.get_backend("tensorrt", timing_cache=cache)
    trt.load(identity_model())
    assert world.configs[-1].timing_blob_in == b""  # no file yet: a new cache
    assert cache.read_bytes() == b"+entry"
    trt.load(identity_model(batch=2))
    assert world.configs[-1].timing_blob_in == b"+entry"  # loaded before the build
    assert cache.read_bytes() == b"+entry+entry"  # saved after it
    cache.write_bytes(b"OTHER-GPU")
    with pytest.warns(TensorRtWarning, match="another TensorRT version or device"):
        trt.load(identity_model())
    assert cache.read_bytes() == b"+entry"


def test_fake_engine_cache_hit_miss_and_key(fake, tmp_path):
    world = fake()
    cache_dir = tmp_path / "engines"
    model = identity_model()
    first = backends.get_backend("tensorrt", engine_cache_dir=cache_dir)
    assert first.load(model).info["engine_cache"] == "miss"
    key = first.cache_key(read_source(model))
    assert (cache_dir / f"{key}.engine").is_file()
    meta = json.loads((cache_dir / f"{key}.json").read_text())
    assert meta["gpu"] == "Fake Orin" and meta["version"] == "10.9.0"
    builds = world.count("build")
    again = backends.get_backend("tensorrt", engine_cache_dir=cache_dir)
    block = again.load(model)
    assert block.info["engine_cache"] == "hit" and world.count("build") == builds  # no build
    np.testing.assert_array_equal(again.run(block, {"x": np.ones((1, 4))})["y"], np.ones((1, 4)))
    other = backends.get_backend("tensorrt", engine_cache_dir=cache_dir, fp16=True)
    assert other.cache_key(read_source(model)) != key
    assert other.load(model).info["engine_cache"] == "miss"
    (cache_dir / f"{key}.engine").write_bytes(b"damaged")
    with pytest.warns(TensorRtWarning, match="does not deserialize"):
        assert backends.get_backend("tensorrt", engine_cache_dir=cache_dir).load(model).info["engine_cache"] == "rebuilt"
    assert (cache_dir / f"{key}.engine").read_bytes().startswith(b"FAKEPLAN")


def test_fake_parser_errors_are_all_reported_naming_the_file(fake, tmp_path):
    fake(parse_errors=("no importer for Frob", "attribute 'mode' unsupported"))
    path = tmp_path / "broken-block.onnx"
    onnx.save(identity_model(), path)
    with pytest.raises(TensorRtParseError) as info:
        backends.get_backend("tensorrt").load(path)
    text = str(info.value)
    assert str(path) in text and "2 error(s)" in text
    assert "[1] node 0 Frob 'n0': no importer for Frob" in text
    assert "[2] node 1 Frob 'n1': attribute 'mode' unsupported" in text


def test_fake_unsupported_operator_is_listed(fake):
    fake(unsupported=("Identity",))
    trt = backends.get_backend("tensorrt")
    assert trt.unsupported_ops(identity_model()) == ["Identity"]
    with pytest.raises(UnsupportedOpsError) as info:
        trt.load(identity_model(), block_id="blk-u")
    assert info.value.ops == ["Identity"] and "blk-u" in str(info.value)


def test_fake_build_failure_quotes_the_builder(fake):
    fake(build_fails=True)
    with pytest.raises(BackendError, match="could not build an engine.*no implementation for layer x"):
        backends.get_backend("tensorrt").load(identity_model(), block_id="blk-f")


def test_fake_non_batch_dynamic_axis_is_refused(fake):
    fake()
    model = identity_model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "T"
    with pytest.raises(ModelError, match=r"'x'.*axis \[1\]"):
        backends.get_backend("tensorrt").load(model, block_id="blk-t")


def test_fake_release_frees_buffers_then_context_then_engine(fake):
    world = fake()
    trt = backends.get_backend("tensorrt")
    block = trt.load(identity_model(), block_id="blk-r")
    allocated = set(world.cuda.mem)
    assert len(allocated) == 2
    trt.release(block)
    gc.collect()
    assert set(world.cuda.freed) == allocated and not world.cuda.mem
    assert world.cuda.streams_destroyed == 1
    assert world.deleted == ["context", "engine"]
    with pytest.raises(BackendError, match="blk-r.*released"):
        trt.run(block, {"x": np.ones((1, 4))})
    trt.release(block)  # twice is harmless


# --- the real thing ----------------------------------------------------------------------------


def test_real_engine_matches_onnxruntime():
    """Build and run a small CNN with TensorRT and compare with onnxruntime (CPU)."""
    ok, why = TensorRtBackend.is_available()
    if not ok:
        pytest.skip(f"no TensorRT engine can run here: {why}")
    trt = backends.get_backend("tensorrt", max_batch=4)
    ort = backends.get_backend("onnxruntime")
    model = small_cnn()
    x = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    want = ort.run(ort.load(model), {"img": x})
    block = trt.load(model, block_id="cnn")
    got = trt.run(block, {"img": x})
    assert block.memory_bytes > 0
    for name in ("prob", "r"):
        # TF32 may be used for float32 convolutions on Ampere and later: ~1e-3 relative
        np.testing.assert_allclose(got[name], want[name], rtol=2e-3, atol=2e-3)
    trt.release(block)


# --- deployment traps (issue 14) ---------------------------------------------------------------


def fp16_model() -> onnx.ModelProto:
    """y = x, in float16: a block of a family's fp16 variant (its types say fp16)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], name="id")],
        "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_block_precision_reads_the_blocks_own_types():
    from backends._tensorrt_checks import block_precision

    assert block_precision(identity_model()) == "fp32"
    assert block_precision(fp16_model()) == "fp16"
    assert block_precision(qdq_model()) == "int8"
    cast = identity_model()
    cast.graph.node.append(helper.make_node("Cast", ["y"], ["z"], to=TensorProto.FLOAT16))
    assert block_precision(cast) == "fp16"


def test_fake_strongly_typed_dla_refuses_an_fp32_block(fake):
    """TensorRT 11.4 brought the DLA back for strongly typed networks only: an fp32 block
    would run every layer on the GPU under the DLA's name, so it is refused, by name."""
    world = fake(version="11.4.0", dla_cores=2)
    dla = backends.get_backend("tensorrt", dla_core=0)
    assert dla.describe()["strongly_typed"] is True
    bad = dla.unsupported_ops(identity_model())
    assert len(bad) == 1 and bad[0].startswith("float32 network (the DLA runs only fp16 and int8 layers")
    with pytest.raises(UnsupportedOpsError, match="float32 network.*fp16 or int8 variant"):
        dla.load(identity_model(), block_id="fp32-block")
    assert world.configs == []  # refused before any build
    # the family's fp16 and int8 variants go to the DLA, and say what they are
    half = dla.load(fp16_model(), block_id="fp16-block")
    assert half.info["precision"] == "fp16" and half.info["dla_core"] == 0
    assert world.configs[-1].default_device_type == world.module.DeviceType.DLA
    dla8 = backends.get_backend("tensorrt", dla_core=1, int8=True)
    assert dla8.load(qdq_model(), block_id="int8-block").info["precision"] == "int8"
    # the GPU processor of the same TensorRT takes the fp32 block
    gpu = backends.get_backend("tensorrt")
    assert gpu.load(identity_model()).info["precision"] == "fp32"
    # TensorRT 10 (weak typing) lowers precision itself with fp16 on: no refusal there
    fake(version="10.9.0", dla_cores=1)
    assert backends.get_backend("tensorrt", dla_core=0, fp16=True).unsupported_ops(identity_model()) == []


def test_fake_cuda_python_fallback_is_described(fake):
    """When cuda-python could not start and torch's CUDA is used, describe(), each block and
    is_available() say which binding runs and why."""
    cuda = fake().cuda
    cuda.fallback = "cuda-python (cuda.bindings.runtime): cudaGetDeviceCount: cudaErrorInsufficientDriver"
    trt = backends.get_backend("tensorrt")
    assert trt.describe()["cuda_api"] == "fake-cuda"
    assert trt.describe()["cuda_api_fallback"].endswith("cudaErrorInsufficientDriver")
    assert trt.load(identity_model()).info["cuda_api_fallback"] == cuda.fallback
    ok, why = TensorRtBackend.is_available()
    assert ok and "via fake-cuda (used because cuda-python" in why
    cuda.devices = 0
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU visible.*used because cuda-python"):
        backends.get_backend("tensorrt")


def test_fake_cache_folders_are_made_at_construction_or_refused_by_name(fake, tmp_path):
    fake()
    engines, timing = tmp_path / "var" / "cache" / "sparseloom" / "trt", tmp_path / "t" / "a" / "timing.cache"
    backends.get_backend("tensorrt", engine_cache_dir=engines, timing_cache=timing)
    assert engines.is_dir() and timing.parent.is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BackendUnavailableError, match=r"engine_cache_dir .*cannot be made.*sudo install -d"):
        backends.get_backend("tensorrt", engine_cache_dir=blocker / "trt")
