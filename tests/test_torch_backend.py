"""The PyTorch backend: converted blocks match onnxruntime, unsupported ops, options, memory.

Tests that need torch and onnx2torch skip when either is missing (``pip install
'sparseloom[torch]'``); the GPU ones skip where torch sees no CUDA GPU. Tolerances are the
partition chain check's: fp32 max abs difference <= 1e-5; fp16 and int8 relative to the
largest |output| <= 3e-2 and 5e-2, and the same top-1 class on logits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_backends import B as B_REF
from test_backends import W as W_REF
from test_backends import dense_relu, make_model, reference, small_cnn, with_bad_ops

import backends
from backends.base import Backend
from loom.core import compat
from loom.core.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    MissingDependencyError,
    UnsupportedOpsError,
)

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "zoo"
RNG = np.random.default_rng(11)
HAVE_TORCH = compat.is_installed("torch") and compat.is_installed("onnx2torch")
needs_torch = pytest.mark.skipif(
    not HAVE_TORCH, reason="torch and onnx2torch are not installed (pip install 'sparseloom[torch]')"
)
#: relative tolerance by block precision (fp32 is checked in absolute terms, 1e-5)
REL = {"fp16": 3e-2, "int8": 5e-2}


def _cuda_reason() -> str | None:
    if not HAVE_TORCH:
        return "torch and onnx2torch are not installed (pip install 'sparseloom[torch]')"
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU here (torch {torch.__version__} sees none)"
    return None


@pytest.fixture(scope="module")
def cuda_skip() -> None:
    reason = _cuda_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def pt() -> Backend:
    if not HAVE_TORCH:
        pytest.skip("torch and onnx2torch are not installed (pip install 'sparseloom[torch]')")
    return backends.get_backend("torch", device="cpu")


@pytest.fixture(scope="module")
def ort() -> Backend:
    return backends.get_backend("onnxruntime")


def assert_close(out: dict, ref: dict, precision: str, *, logits: str | None = None) -> float:
    """The chain check's tolerances; returns the worst difference (absolute for fp32)."""
    assert set(out) == set(ref)
    worst = 0.0
    for name, want in ref.items():
        assert out[name].dtype == want.dtype and out[name].shape == want.shape, name
        diff = float(np.abs(out[name].astype(np.float64) - want).max())
        if precision == "fp32":
            assert diff <= 1e-5, (name, diff)
        else:
            diff /= float(np.abs(want).max())
            assert diff <= REL[precision], (name, precision, diff)
        worst = max(worst, diff)
    if logits is not None:
        np.testing.assert_array_equal(out[logits].argmax(-1), ref[logits].argmax(-1))
    return worst


# --- registry, lazy import, missing packages ---------------------------------------------


def test_registered_and_importing_it_imports_no_torch():
    assert backends.REGISTRY["torch"] == "backends.torch:TorchBackend"
    code = (
        "import sys, backends, backends.torch\n"
        "assert backends.backend_class('torch').name == 'torch'\n"
        "loaded = [m for m in ('torch', 'onnx2torch', 'torchvision') if m in sys.modules]\n"
        "assert not loaded, f'imported eagerly: {loaded}'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("absent", ["torch", "onnx2torch"])
def test_missing_package_says_what_to_install(monkeypatch, absent):
    import loom.core.compat
    from backends.torch import TorchBackend

    real = loom.core.compat.is_installed
    monkeypatch.setattr(loom.core.compat, "is_installed", lambda m: m != absent and real(m))
    with pytest.raises(MissingDependencyError, match=r"pip install 'sparseloom\[torch\]'") as info:
        TorchBackend()
    assert isinstance(info.value, ImportError) and absent in str(info.value)
    ok, why = TorchBackend.is_available()
    assert not ok and "sparseloom[torch]" in why
    assert backends.available_backends()["torch"][0] is False


# --- against onnxruntime -------------------------------------------------------------------


@needs_torch
def test_synthetic_partition_blocks_match_onnxruntime(pt, ort, synth_partition):
    """Every block of every variant (fp32, pruned, int8 QDQ, fp16), fed onnxruntime's chain."""
    x = synth_partition.family().eval_data(16)[0]
    for variant in synth_partition.variants:
        feeds = {"input": x}
        for slot in range(synth_partition.k):
            info = synth_partition.block(variant, slot)
            path = synth_partition.block_path(info.id)
            block = pt.load(path)
            assert block.info["precision"] == info.precision and pt.unsupported_ops(path) == []
            ref = ort.run(ort.load(path), feeds)
            out = pt.run(block, feeds)
            last = slot == synth_partition.k - 1
            assert_close(out, ref, info.precision, logits="logits" if last else None)
            feeds = ref


@needs_torch
def test_fp16_blocks_can_run_in_float16_on_the_cpu(ort, synth_partition):
    half = backends.get_backend("torch", device="cpu", cpu_fp16="float16")
    widened = backends.get_backend("torch", device="cpu")
    path = synth_partition.block_path(synth_partition.block("fp16", 0).id)
    x = synth_partition.family().eval_data(4)[0]
    ref = ort.run(ort.load(path), {"input": x})
    block = half.load(path)
    assert block.info["fp16_compute"] == "float16"
    assert {str(p.dtype) for p in block.handle.module.parameters()} == {"torch.float16"}
    assert_close(half.run(block, {"input": x}), ref, "fp16")
    assert widened.load(path).info["fp16_compute"] == "float32"


@needs_torch
@pytest.mark.parametrize("variant", ["dense", "fp16", "int8"])
def test_zoo_cnn_matches_onnxruntime(pt, ort, variant):
    """A model built elsewhere (the embedded zoo's trained CNN), on its own eval data."""
    path = ZOO / "image-cls" / f"{variant}.onnx"
    x = np.load(ZOO / "image-cls" / "eval.npz")["x"][:16]
    precision = {"dense": "fp32"}.get(variant, variant)
    block = pt.load(path)
    assert block.info["precision"] == precision
    assert_close(pt.run(block, {"input": x}), ort.run(ort.load(path), {"input": x}), precision, logits="logits")


@needs_torch
def test_zoo_int8_transformer_matches_the_qdq_reference(pt):
    """onnxruntime's optimized int8 kernels (QLinearMatMul, ...) round differently from the
    QDQ graph they replace: by up to 5e-2 of the largest logit on this model (measured),
    so the reference here is onnxruntime running the QDQ graph as written."""
    plain = backends.get_backend("onnxruntime", graph_optimization_level="disable")
    path = ZOO / "seq-cls" / "int8.onnx"
    x = np.load(ZOO / "seq-cls" / "eval.npz")["x"][:16]
    out = pt.run(pt.load(path), {"input": x})
    assert_close(out, plain.run(plain.load(path), {"input": x}), "int8", logits="logits")


def qdq_edges() -> onnx.ModelProto:
    """Quantize to int8 with a zero point (ties, saturation), a uint8 graph input
    dequantized per axis (a negative axis), both returned as outputs."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
        helper.make_node("DequantizeLinear", ["u", "us", "uzp"], ["d"], axis=-1),
    ]
    return make_model(
        nodes,
        inputs=[
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
            helper.make_tensor_value_info("u", TensorProto.UINT8, [2, 3]),
        ],
        outputs=[
            helper.make_tensor_value_info("q", TensorProto.INT8, [2, 6]),
            helper.make_tensor_value_info("d", TensorProto.FLOAT, [2, 3]),
        ],
        inits=[
            numpy_helper.from_array(np.array(0.5, np.float32), "s"),
            numpy_helper.from_array(np.array(3, np.int8), "zp"),
            numpy_helper.from_array(np.array([0.1, 0.2, 0.4], np.float32), "us"),
            numpy_helper.from_array(np.array([0, 128, 255], np.uint8), "uzp"),
        ],
    )


@needs_torch
def test_qdq_rounds_half_to_even_and_saturates_like_onnxruntime(pt, ort):
    feeds = {
        "x": np.array([[-300, -1.25, -0.25, 0.25, 0.75, 1.25], [300, 62, 62.25, 0, -65.5, 1e-3]], np.float32),
        "u": np.array([[0, 128, 255], [7, 200, 3]], np.uint8),
    }
    out = pt.run(pt.load(qdq_edges()), feeds)
    ref = ort.run(ort.load(qdq_edges()), feeds)
    assert out["q"].dtype == np.int8
    np.testing.assert_array_equal(out["q"], ref["q"])
    np.testing.assert_allclose(out["d"], ref["d"], rtol=1e-6)


@needs_torch
def test_newer_opsets_convert(pt, ort):
    """ReduceMean with its axes as an input (opset 18) and Identity/Reshape at opset 21,
    whose schemas changed only in types (onnx2torch registers them up to 16 and 14)."""
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
        helper.make_node("Reshape", ["m", "shape"], ["r"]),
        helper.make_node("Identity", ["r"], ["y"]),
    ]
    model = make_model(
        nodes,
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        inits=[
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
            numpy_helper.from_array(np.array([1, 3], np.int64), "shape"),
        ],
    )
    model.opset_import[0].version = 21
    assert pt.unsupported_ops(model) == []
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    assert_close(pt.run(pt.load(model), {"x": x}), ort.run(ort.load(model), {"x": x}), "fp32")


# --- unsupported ops ---------------------------------------------------------------------------


@needs_torch
def test_every_unsupported_op_in_one_error(pt, tmp_path):
    assert pt.unsupported_ops(with_bad_ops()) == ["NotAnOp", "my.ops.Blorp", "my.ops.Frob"]
    path = tmp_path / "bad.onnx"
    onnx.save(with_bad_ops(), path)
    with pytest.raises(UnsupportedOpsError) as info:
        pt.load(path)
    assert info.value.ops == ["NotAnOp", "my.ops.Blorp", "my.ops.Frob"]
    assert str(path) in str(info.value) and info.value.backend == "torch"


def refused_forms() -> onnx.ModelProto:
    """Ops with a converter that refuses their form (blocked quantization, DCR
    DepthToSpace), one with no converter at all, and one hidden in an If branch."""
    branch = helper.make_graph(
        [helper.make_node("Det", ["d"], ["z"])], "then", [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)]
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["d"], ["z2"])], "else", [], [helper.make_tensor_value_info("z2", TensorProto.FLOAT, None)]
    )
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s"], ["q"], block_size=2, axis=1),
        helper.make_node("DequantizeLinear", ["q", "s"], ["dq"], block_size=2, axis=1),
        helper.make_node("Reshape", ["dq", "shape"], ["r"]),
        helper.make_node("DepthToSpace", ["r"], ["d"], blocksize=2, mode="DCR"),
        helper.make_node("Greater", ["d", "zero"], ["c"]),
        helper.make_node("ReduceMin", ["c"], ["cond"], keepdims=0),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other),
    ]
    model = make_model(
        nodes,
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits=[
            numpy_helper.from_array(np.ones((1, 4), np.float32), "s"),
            numpy_helper.from_array(np.array([1, 4, 1, 2], np.int64), "shape"),
            numpy_helper.from_array(np.zeros((), np.float32), "zero"),
        ],
    )
    model.opset_import[0].version = 21  # block_size
    return model


@needs_torch
def test_refused_forms_are_listed_with_their_reason(pt):
    bad = pt.unsupported_ops(refused_forms())
    assert "Det" in bad and "If" in bad
    assert "QuantizeLinear (blocked quantization (block_size))" in bad
    assert "DequantizeLinear (blocked quantization (block_size))" in bad
    assert any(b.startswith("DepthToSpace (") and "CRD" in b for b in bad), bad
    assert "ReduceMin" not in bad and "Reshape" not in bad
    with pytest.raises(UnsupportedOpsError) as info:
        pt.load(refused_forms(), block_id="blk-forms")
    assert info.value.ops == bad and "blk-forms" in str(info.value)


@needs_torch
def test_torchvision_ops_are_refused_when_torchvision_is_unusable(pt):
    from backends import _torch_convert

    problem = _torch_convert._state["torchvision"]
    # the stand-in onnx2torch was imported against is not left behind
    for name in ("torchvision", "torchvision.ops"):
        assert name not in sys.modules or sys.modules[name].__spec__ is not None, name
    nms = make_model(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"])],
        inputs=[
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 4]),
        ],
        outputs=[helper.make_tensor_value_info("sel", TensorProto.INT64, [None, 3])],
    )
    bad = pt.unsupported_ops(nms)
    if problem is None:
        assert bad == []
    else:
        assert bad == [f"NonMaxSuppression (needs torchvision: {problem})"]


# --- load, run, release, memory ---------------------------------------------------------------


@needs_torch
def test_load_run_release_and_memory(pt):
    block = pt.load(dense_relu(), block_id="blk-dense")
    assert block.input_names == ["x"] and block.output_names == ["y"]
    assert block.memory_bytes == pt.memory_bytes(block) == W_REF.nbytes + B_REF.nbytes
    assert block.load_seconds > 0 and block.info["device"] == "cpu"
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    out = pt.run(block, {"x": x, "unused": x})
    np.testing.assert_allclose(out["y"], reference(x), rtol=1e-5, atol=1e-6)
    kept = out["y"].copy()
    pt.run(block, {"x": np.zeros_like(x)})
    np.testing.assert_array_equal(out["y"], kept)  # outputs are the caller's, not reused
    module = block.handle.module
    pt.release(block)
    assert sum(t.numel() for t in [*module.parameters(), *module.buffers()]) == 0  # freed now
    with pytest.raises(BackendError, match="blk-dense.*released"):
        pt.run(block, {"x": x})
    pt.release(block)  # twice is harmless


@needs_torch
@pytest.mark.parametrize("form", ["path", "bytes"])
def test_paths_bytes_and_several_outputs(pt, ort, tmp_path, form):
    """small_cnn returns an intermediate too: outputs come back by name, at their dtypes."""
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)
    block = pt.load(path if form == "path" else path.read_bytes())
    assert block.output_names == ["prob", "r"]
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert_close(pt.run(block, {"img": x}), ort.run(ort.load(path), {"img": x}), "fp32")
    with pytest.raises(BackendError, match="missing input"):
        pt.run(block, {"image": x})
    with pytest.raises(BackendError, match=r"torch \(cpu\) failed"):
        pt.run(block, {"img": np.ones((2, 5, 8, 8), np.float32)})


# --- options, threads, cores -------------------------------------------------------------------


@needs_torch
def test_options_are_checked(pt):
    with pytest.raises(ConfigError, match="threads"):
        backends.get_backend("torch", threads=0)
    with pytest.raises(ConfigError, match="device"):
        backends.get_backend("torch", device="tpu")
    with pytest.raises(ConfigError, match="cpu_fp16"):
        backends.get_backend("torch", cpu_fp16="bf16")
    with pytest.raises(ConfigError, match="cuda_graphs"):
        backends.get_backend("torch", device="cpu", cuda_graphs=True)
    with pytest.raises(ConfigError, match="accepts"):
        backends.get_backend("torch", num_threads=2)
    if _cuda_reason():
        with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
            backends.get_backend("torch", device="cuda:0")
        assert backends.get_backend("torch").device == "cpu"  # auto
    info = pt.describe()
    assert info["backend"] == "torch" and info["version"] and info["onnx2torch"]
    assert info["device"] == "cpu" and info["threads"] == 1
    ok, why = pt.is_available()
    assert ok and "cpu" in why


@needs_torch
def test_threads_are_set_on_the_thread_that_runs(pt):
    """torch keeps a thread's intra-op count per thread: the backend sets it where it runs."""
    import torch

    block = pt.load(dense_relu())
    x = np.ones((1, 8), np.float32)
    seen: dict[str, int] = {}

    def worker() -> None:
        torch.set_num_threads(2)
        pt.run(block, {"x": x})
        seen["with"] = torch.get_num_threads()
        torch.set_num_threads(2)
        backends.get_backend("torch", device="cpu", threads=None).run(block, {"x": x})
        seen["without"] = torch.get_num_threads()

    default = torch.get_num_threads()
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    torch.set_num_threads(default)
    assert seen == {"with": 1, "without": 2}


@needs_torch
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="thread affinity is Linux-only")
def test_pins_the_worker_and_its_threads(pt):
    backend = backends.get_backend("torch", device="cpu", cores=[0], threads=2)
    block = backend.load(small_cnn())
    seen: dict[str, object] = {}

    def worker() -> None:
        seen["pinned"] = backend.pin_current_thread()
        backend.run(block, {"img": np.ones((4, 3, 8, 8), np.float32)})
        seen["mask"] = os.sched_getaffinity(0)

    main = os.sched_getaffinity(0)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"pinned": True, "mask": {0}} and os.sched_getaffinity(0) == main


# --- CUDA graphs, against a recording fake of torch.cuda (the logic, not CUDA itself) ----------


class FakeGraph:
    """Records the module call made while capturing; a replay makes it again into the
    captured output tensors, as a real graph replays its kernels into the same memory."""

    def __init__(self) -> None:
        self.call: tuple | None = None
        self.replays = 0

    def replay(self) -> None:
        fn, args, out = self.call
        out.copy_(fn(*args))
        self.replays += 1

    def reset(self) -> None:
        self.call = None


class FakeCuda:
    def __init__(self) -> None:
        self.capturing: FakeGraph | None = None
        self.allocated = 1000
        self.CUDAGraph = FakeGraph

    def Stream(self, device):  # noqa: N802 - torch's spelling
        return self

    def current_stream(self, device):
        return self

    def wait_stream(self, other) -> None:
        pass

    def stream(self, s):
        import contextlib

        return contextlib.nullcontext()

    def graph(self, g, capture_error_mode):
        import contextlib

        @contextlib.contextmanager
        def capture():
            assert capture_error_mode == "thread_local"
            self.capturing = g
            try:
                yield
            finally:
                self.capturing = None

        return capture()

    def synchronize(self, device) -> None:
        pass

    def memory_allocated(self, device) -> int:
        return self.allocated


class Doubler:
    """A block's module: ``2 x``; it allocates 64 bytes (and records itself) when captured."""

    def __init__(self, cuda: FakeCuda, *, fail: bool = False) -> None:
        self.cuda, self.fail, self.calls = cuda, fail, 0

    def __call__(self, x):
        self.calls += 1
        if self.cuda.capturing is not None:
            if self.fail:
                raise RuntimeError("operation not permitted when stream is capturing")
            out = x * 2
            self.cuda.allocated += 64
            self.cuda.capturing.call = (lambda t: t * 2, (x,), out)
            return out
        return x * 2


@needs_torch
def test_cuda_graphs_capture_once_per_signature_and_replay(monkeypatch):
    import types

    import torch

    from backends import _torch_cuda

    cuda = FakeCuda()
    module = Doubler(cuda)
    graphs = _torch_cuda.CudaGraphs(types.SimpleNamespace(cuda=cuda), module, "cuda:0")
    a, b = torch.ones(2, 3), torch.full((2, 3), 5.0)
    assert torch.equal(graphs(a), a * 2) and module.calls == 3  # 2 warm-up runs + the capture
    assert torch.equal(graphs(b), b * 2) and module.calls == 3  # replayed, not run
    assert torch.equal(graphs(torch.ones(4, 3)), torch.full((4, 3), 2.0))
    assert len(graphs.entries) == 2 and graphs.bytes == 128 and not graphs.failures
    monkeypatch.setattr(_torch_cuda, "MAX_GRAPHS", 2)
    assert torch.equal(graphs(torch.ones(1, 3)), torch.full((1, 3), 2.0))  # eager: full
    assert len(graphs.entries) == 2
    graphs.release()
    assert graphs.entries == {}


@needs_torch
def test_a_failed_capture_runs_eagerly_with_a_warning():
    import types

    import torch

    from backends._torch_cuda import CudaGraphs, CudaGraphWarning

    cuda = FakeCuda()
    graphs = CudaGraphs(types.SimpleNamespace(cuda=cuda), Doubler(cuda, fail=True), "cuda:0")
    with pytest.warns(CudaGraphWarning, match="capturing"):
        assert torch.equal(graphs(torch.ones(2)), torch.full((2,), 2.0))
    assert torch.equal(graphs(torch.ones(2)), torch.full((2,), 2.0))  # eager, no second try
    assert len(graphs.failures) == 1 and graphs.bytes == 0


# --- GPU ---------------------------------------------------------------------------------------


def test_gpu_fp16_block_runs_in_half_and_frees_its_memory(cuda_skip, ort, synth_partition):
    import torch

    gpu = backends.get_backend("torch", device="cuda")
    path = synth_partition.block_path(synth_partition.block("fp16", 1).id)
    x = RNG.standard_normal((4, 8, 8, 8)).astype(np.float32)
    before = torch.cuda.memory_allocated(gpu.device)
    block = gpu.load(path)
    assert block.info["fp16_compute"] == "float16" and block.memory_bytes > 0
    assert {str(p.dtype) for p in block.handle.module.parameters()} == {"torch.float16"}
    assert_close(gpu.run(block, {"b0.out": x}), ort.run(ort.load(path), {"b0.out": x}), "fp16")
    gpu.release(block)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(gpu.device) <= before


def test_gpu_cuda_graphs_replay_per_shape(cuda_skip, ort):
    gpu = backends.get_backend("torch", device="cuda", cuda_graphs=True)
    eager = backends.get_backend("torch", device="cuda")
    model = small_cnn()
    block, plain = gpu.load(model), eager.load(model)
    for batch in (2, 2, 5):
        x = RNG.standard_normal((batch, 3, 8, 8)).astype(np.float32)
        out = gpu.run(block, {"img": x})
        assert_close(out, ort.run(ort.load(model), {"img": x}), "fp32")
        assert_close(out, eager.run(plain, {"img": x}), "fp32")
    graphs = block.handle.graphs
    assert len(graphs.entries) == 2 and not graphs.failures
    assert block.memory_bytes == block.handle.base_bytes + graphs.bytes > block.handle.base_bytes
    gpu.release(block)
    assert block.handle is None
