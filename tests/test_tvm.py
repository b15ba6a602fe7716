"""The TVM backend: compiled blocks match onnxruntime, the disk cache, unsupported ops, options.

Every test that needs TVM skips when it is not installed (``pip install
'sparseloom[tvm]'``). Nothing here tunes: the one test that touches MetaSchedule
(tuning logs and sampled schedules) writes a log without measuring anything, and is
marked slow because importing TVM's tensor intrinsics costs ~30 s once per process.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_backends import W as W_REF
from test_backends import dense_relu, make_model, reference, small_cnn

import backends
from backends.base import Backend
from loom.core.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    MissingDependencyError,
    ModelError,
    UnsupportedOpsError,
)

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def tvm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tvm-cache")


@pytest.fixture(scope="module")
def tvm(tvm_cache: Path) -> Backend:
    pytest.importorskip("tvm", reason="tvm is not installed (pip install 'sparseloom[tvm]')")
    return backends.get_backend("tvm", cache_dir=str(tvm_cache))


@pytest.fixture(scope="module")
def ort() -> Backend:
    return backends.get_backend("onnxruntime")


def conv_matmul() -> onnx.ModelProto:
    """Conv -> Relu -> Reshape -> MatMul + Add: a conv and a matmul kernel, symbolic batch."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32) * 0.3, "cw"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32) * 0.1, "cb"),
        numpy_helper.from_array(np.array([-1, 4 * 6 * 6], np.int64), "shape"),
        numpy_helper.from_array(rng.standard_normal((144, 7)).astype(np.float32) * 0.1, "mw"),
        numpy_helper.from_array(rng.standard_normal(7).astype(np.float32) * 0.1, "mb"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "mw"], ["m"]),
        helper.make_node("Add", ["m", "mb"], ["y"]),
    ]
    return make_model(
        nodes,
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7])],
        inits=inits,
    )


def with_conv_integer() -> onnx.ModelProto:
    """Dynamic int8 (``ConvInteger``, which TVM's frontend rejects) and ``Det`` (it has no
    converter), plus ``Col2Im`` hidden inside an ``If`` branch: all three must be named."""
    branch = helper.make_graph(
        [helper.make_node("Col2Im", ["d", "shape", "shape"], ["z"])],
        "then",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["d"], ["z2"])],
        "else",
        [],
        [helper.make_tensor_value_info("z2", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("ConvInteger", ["x", "w"], ["ci"]),
        helper.make_node("Cast", ["ci"], ["cf"], to=TensorProto.FLOAT),
        helper.make_node("Det", ["cf"], ["d"]),
        helper.make_node("Greater", ["d", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other),
    ]
    return make_model(
        nodes,
        inputs=[helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 4, 4])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits=[
            numpy_helper.from_array(np.ones((1, 1, 2, 2), np.uint8), "w"),
            numpy_helper.from_array(np.zeros((), np.float32), "zero"),
            numpy_helper.from_array(np.array([2, 2], np.int64), "shape"),
        ],
    )


# --- registry and availability ------------------------------------------------------


def test_tvm_is_registered_and_importing_it_imports_no_tvm():
    assert backends.REGISTRY["tvm"] == "backends.tvm:TvmBackend"
    code = (
        "import sys, backends\n"
        "cls = backends.backend_class('tvm')\n"
        "assert cls.name == 'tvm'\n"
        "assert 'tvm' not in sys.modules, 'tvm imported eagerly'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_missing_tvm_says_what_to_install(monkeypatch):
    import loom.core.compat
    from backends.tvm import TvmBackend

    real = loom.core.compat.is_installed
    monkeypatch.setattr(loom.core.compat, "is_installed", lambda m: m != "tvm" and real(m))
    with pytest.raises(MissingDependencyError, match="pip install") as info:
        TvmBackend()
    assert isinstance(info.value, ImportError)
    ok, why = TvmBackend.is_available()
    assert not ok and "pip install" in why
    # a device profile's options are still checked, without TVM
    assert TvmBackend.option_problems({"threads": 0, "target": "llvm -mcpu=znver3", "opt_level": 2}) == [
        "options.threads: an integer >= 1, got 0",
        "options.target: 'llvm -mcpu=znver3': give a dict such as {'kind': 'llvm', 'mcpu': 'znver3'}, "
        "or a bare kind name (TVM 0.27 refuses the 'llvm -mcpu=...' form)",
    ]
    assert TvmBackend.option_problems({"target": {"kind": "cuda", "arch": "sm_87"}, "batch_size": 1}) == []


def test_is_available_lists_the_targets_here(tvm):
    ok, why = type(tvm).is_available()
    assert ok and "llvm" in why
    info = tvm.describe()
    assert info["backend"] == "tvm" and info["version"].startswith("0.")
    target = json.loads(info["target"])
    assert target["kind"] == "llvm" and target["mcpu"]  # the host CPU LLVM detects
    assert info["threads"] == 1


# --- compile and run -----------------------------------------------------------------


@pytest.mark.parametrize("make", [conv_matmul, small_cnn], ids=["conv-matmul", "cnn"])
def test_matches_onnxruntime(tvm, ort, make):
    model = make()
    x_name = model.graph.input[0].name
    shape = [2, *(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])]
    x = RNG.standard_normal(shape).astype(np.float32)
    ref = ort.run(ort.load(model), {x_name: x})
    block = tvm.load(model, block_id=f"blk-{make.__name__}")
    assert block.input_names == [x_name]
    assert block.output_names == [o.name for o in model.graph.output]
    assert isinstance(block.memory_bytes, int) and block.memory_bytes >= 0
    out = tvm.run(block, {x_name: x, "not-an-input": x})  # extra feeds are ignored
    assert set(out) == set(ref)
    for name in ref:
        assert out[name].dtype == np.float32 and out[name].shape == ref[name].shape
        np.testing.assert_allclose(out[name], ref[name], atol=1e-5, rtol=1e-5)
    # outputs are copies: the next run must not overwrite them
    kept = {k: v.copy() for k, v in out.items()}
    tvm.run(block, {x_name: np.zeros_like(x)})
    for name in kept:
        np.testing.assert_array_equal(out[name], kept[name])
    tvm.release(block)


def test_loads_paths_and_bytes(tvm, tmp_path):
    path = tmp_path / "dense.onnx"
    onnx.save(dense_relu(), path)
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    for source in (path, str(path), path.read_bytes()):
        block = tvm.load(source)
        np.testing.assert_allclose(tvm.run(block, {"x": x})["y"], reference(x), atol=1e-5)
        tvm.release(block)


def test_missing_input_and_bad_feed_name_block_and_backend(tvm):
    block = tvm.load(dense_relu(), block_id="blk-feeds")
    with pytest.raises(BackendError, match="blk-feeds.*missing input"):
        tvm.run(block, {"nope": np.zeros((1, 8), np.float32)})
    with pytest.raises(BackendError, match="blk-feeds on tvm"):
        tvm.run(block, {"x": np.zeros((1, 9), np.float32)})  # wrong shape: TVM refuses it


def test_static_batch_size_is_enforced(tvm_cache):
    pytest.importorskip("tvm")
    static = backends.get_backend("tvm", cache_dir=str(tvm_cache), batch_size=2)
    block = static.load(dense_relu(), block_id="blk-static")
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(static.run(block, {"x": x})["y"], reference(x), atol=1e-5)
    with pytest.raises(BackendError, match="batch_size=2"):
        static.run(block, {"x": x[:1]})


def test_release_frees_the_module(tvm):
    block = tvm.load(dense_relu(), block_id="blk-release")
    vm = weakref.ref(block.handle.vm)
    tvm.run(block, {"x": np.ones((1, 8), np.float32)})
    tvm.release(block)
    gc.collect()
    assert vm() is None, "the VM (and the library and constants it holds) is still referenced"
    assert block.handle is None and block.info["released"]
    with pytest.raises(BackendError, match="blk-release"):
        tvm.run(block, {"x": np.ones((1, 8), np.float32)})


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="thread affinity is Linux-only")
def test_run_keeps_the_workers_pinning(tvm_cache):
    """TVM's pool would re-pin the calling thread; with one thread it runs inline and the
    worker stays on its core."""
    pytest.importorskip("tvm")
    backend = backends.get_backend("tvm", cache_dir=str(tvm_cache), cores=[0])
    block = backend.load(dense_relu())
    seen: dict[str, object] = {}

    def worker() -> None:
        try:
            assert backend.pin_current_thread()
            backend.run(block, {"x": np.ones((1, 8), np.float32)})
            seen["mask"] = os.sched_getaffinity(0)
            seen["threads"] = backend_threads()
        except Exception as exc:  # reported below, in the test's own thread
            seen["error"] = exc

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert "error" not in seen, seen.get("error")
    assert seen["mask"] == {0}
    assert seen["threads"] == 1
    assert os.environ.get("TVM_BIND_THREADS") == "0"


def backend_threads() -> int:
    """The calling thread's TVM pool size (``runtime.NumThreads``)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())


# --- the compiled-module cache ------------------------------------------------------------


def test_second_load_is_a_cache_hit(tmp_path):
    pytest.importorskip("tvm")
    cache = tmp_path / "cache"
    backend = backends.get_backend("tvm", cache_dir=str(cache))
    model = dense_relu()
    first = backend.load(model, block_id="blk-cache")
    assert first.info["cache_hit"] is False and first.info["compile_seconds"] > 0
    library = Path(first.info["cache_path"])
    assert library.is_file() and library == backend.cache_path(model)
    meta = json.loads(library.with_suffix(".json").read_text())
    assert meta["block_hash"] == first.info["block_hash"]
    assert json.loads(meta["target"])["kind"] == "llvm"
    assert meta["inputs"] == ["x"] and meta["outputs"] == ["y"]

    # a second load, and a second backend with the same options: no compilation
    for again in (backend, backends.get_backend("tvm", cache_dir=str(cache))):
        block = again.load(model, block_id="blk-cache")
        assert block.info["cache_hit"] is True and block.info["compile_seconds"] == 0
        x = RNG.standard_normal((2, 8)).astype(np.float32)
        np.testing.assert_allclose(again.run(block, {"x": x})["y"], reference(x), atol=1e-5)
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".so"]

    # other weights (another block hash) or other compile options: a miss each
    other = dense_relu()
    other.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros(5, np.float32), "B"))
    assert backend.load(other).info["cache_hit"] is False
    assert backends.get_backend("tvm", cache_dir=str(cache), opt_level=2).load(model).info["cache_hit"] is False
    # an entry without its meta file is incomplete, a library that does not load is
    # useless: compiled again (and replaced) either way
    library.with_suffix(".json").unlink()
    assert backend.load(model).info["cache_hit"] is False
    # (a library is opened by path, and the dynamic loader keeps what it opened under a
    # path: so the broken one is a block this process has not loaded yet)
    fresh = dense_relu()
    fresh.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ones(5, np.float32), "B"))
    broken = backend.cache_path(fresh)
    broken.write_bytes(b"not a shared library")
    broken.with_suffix(".json").write_text(json.dumps({**meta, "key": broken.stem}))
    block = backend.load(fresh)
    assert block.info["cache_hit"] is False
    np.testing.assert_allclose(backend.run(block, {"x": x})["y"], np.maximum(x @ W_REF + 1, 0), atol=1e-5)
    assert backend.load(fresh).info["cache_hit"] is True


def test_cache_can_be_turned_off(tmp_path):
    pytest.importorskip("tvm")
    backend = backends.get_backend("tvm", cache_dir=str(tmp_path / "c"), cache=False)
    block = backend.load(dense_relu())
    assert block.info["cache_hit"] is False and block.info["cache_path"] is None
    assert not (tmp_path / "c").exists()
    x = np.ones((1, 8), np.float32)
    np.testing.assert_allclose(backend.run(block, {"x": x})["y"], reference(x), atol=1e-5)


# --- unsupported ops and bad models ------------------------------------------------------


def test_every_unsupported_op_in_one_error_naming_the_file(tvm, tmp_path):
    path = tmp_path / "dynamic-int8.onnx"
    onnx.save(with_conv_integer(), path)
    cached = sorted(tvm.cache_dir.iterdir())
    assert tvm.unsupported_ops(with_conv_integer()) == ["Col2Im", "ConvInteger", "Det"]
    with pytest.raises(UnsupportedOpsError) as info:
        tvm.load(path)
    assert info.value.ops == ["Col2Im", "ConvInteger", "Det"]
    message = str(info.value)
    assert str(path) in message and "ConvInteger" in message and "Det" in message
    assert sorted(tvm.cache_dir.iterdir()) == cached  # refused before compiling anything


def test_ops_of_other_domains_are_unsupported_even_with_onnx_names(tvm):
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Relu", ["h"], ["y"], domain="my.ops"),
        ],
        extra_opsets=["my.ops"],
        inits=[numpy_helper.from_array(np.ones((8, 5), np.float32), "W")],
    )
    assert tvm.unsupported_ops(model) == ["my.ops.Relu"]
    assert tvm.unsupported_ops(dense_relu()) == []


def test_unreadable_model_is_a_model_error_naming_it(tvm):
    with pytest.raises(ModelError, match="blk-garbage"):
        tvm.load(b"\x08\x01garbage\xff\xff", block_id="blk-garbage")


# --- options -------------------------------------------------------------------------------


def test_bad_options_are_config_errors_naming_the_option(tmp_path):
    pytest.importorskip("tvm")
    bad = [
        ({"threads": 0}, "threads"),
        ({"threads": 1.5}, "threads"),
        ({"opt_level": 7}, "opt_level"),
        ({"schedule": "fastest"}, "schedule"),
        ({"batch_size": 0}, "batch_size"),
        ({"target": "llvm -mcpu=znver3"}, "target"),
        ({"target": {"kind": "no-such-kind"}}, "target"),
        ({"target": {"mcpu": "znver3"}}, "target"),
        ({"target": 3}, "target"),
        ({"tuning_log": str(tmp_path)}, "tuning_log"),  # not a MetaSchedule database
        ({"schedule": "sampled"}, "batch_size"),  # static shapes needed
        ({"cores": [10_000]}, "cores"),
        ({"seed": -1}, "seed"),
    ]
    for options, named in bad:
        with pytest.raises(ConfigError, match=named):
            backends.get_backend("tvm", cache_dir=str(tmp_path), **options)
    with pytest.raises(ConfigError, match="cache_dir"):
        backends.get_backend("tvm", cache_dir=3)
    with pytest.raises(ConfigError, match="threads"):  # a typo'd option name
        backends.get_backend("tvm", thread=1)


def test_a_target_without_its_device_is_unavailable(tmp_path):
    pytest.importorskip("tvm")
    from backends.tvm import available_targets

    if "cuda" in available_targets():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        backends.get_backend("tvm", target={"kind": "cuda"}, cache_dir=str(tmp_path))


# --- MetaSchedule: tuning logs and sampled schedules (no measuring) -----------------------


@pytest.mark.slow
def test_tuning_log_and_sampled_schedules(tmp_path, ort):
    """A tuning log is applied: written here from unmeasured samples (no tuning), then
    loaded as a log. Sampled schedules give the same numbers as the default ones."""
    pytest.importorskip("tvm")
    from tvm.s_tir import meta_schedule as ms

    from backends.base import read_source

    model = conv_matmul()
    x = RNG.standard_normal((1, 2, 6, 6)).astype(np.float32)
    ref = ort.run(ort.load(model), {"x": x})["y"]

    writer = backends.get_backend("tvm", cache_dir=str(tmp_path / "c"), batch_size=1)
    src = read_source(model)
    log = tmp_path / "log"
    log.mkdir()
    database = ms.database.JSONDatabase(work_dir=str(log))
    _, written = writer.compiler.sampled(writer.compiler.lower(src, src.proto), database)
    assert written > 0

    tuned = backends.get_backend("tvm", cache_dir=str(tmp_path / "c"), batch_size=1, tuning_log=str(log))
    block = tuned.load(model)
    assert block.info["schedules"]["tuned"] == written
    np.testing.assert_allclose(tuned.run(block, {"x": x})["y"], ref, atol=1e-5, rtol=1e-5)

    sampled = backends.get_backend("tvm", cache_dir=str(tmp_path / "c"), batch_size=1, schedule="sampled")
    block = sampled.load(model)
    assert block.info["schedules"]["sampled"] > 0
    np.testing.assert_allclose(sampled.run(block, {"x": x})["y"], ref, atol=1e-5, rtol=1e-5)
