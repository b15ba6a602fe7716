"""Unloading a block really returns its memory (RSS, psutil), on every engine installed here.

What users of serving systems fear most about unloading (Triton's long list of
"memory not freed on unload" reports): the runtime evicting a block while the process
keeps its pages. A 64 MB block is loaded and evicted through ``BlockCache`` several
times; the first cycle warms the engine (its arenas, thread pools, kernel caches stay:
that is a one-off, not a leak), and from then on RSS must come back after each eviction.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends import available_backends, get_backend
from loom.serving.cache import BlockCache

MB = 2**20
ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {"onnxruntime": {"intra_op_threads": 1}, "openvino": {"precision": "f32", "threads": 1}}


def big_block(path: Path, n: int = 4096) -> Path:
    rng = np.random.default_rng(0)
    w = rng.random((n, n), dtype=np.float32)  # 64 MB of weights
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


def measure(engine: str, path: Path) -> list[tuple[int, int, int]]:
    """RSS before, loaded and after for four load/evict cycles (the first warms the engine)."""
    backend = get_backend(engine, **OPTIONS[engine])
    cache = BlockCache("p", backend, lambda _b: path)
    proc = psutil.Process()
    x = {"x": np.ones((1, 4096), np.float32)}

    def cycle() -> tuple[int, int, int]:
        gc.collect()
        before = proc.memory_info().rss
        block = cache.get("big")
        backend.run(block, x)
        loaded = proc.memory_info().rss
        del block
        cache.evict("big")  # no gc.collect() here: the release itself must free it
        return before, loaded, proc.memory_info().rss

    cycles = [cycle() for _ in range(4)]
    assert not cache.is_resident("big") and cache.evictions == 4
    return cycles


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(OPTIONS))
def test_evicting_a_block_returns_its_memory(engine: str, tmp_path: Path) -> None:
    ok, why = available_backends().get(engine, (False, "not registered"))
    if not ok:
        pytest.skip(f"{engine}: {why}")
    path = big_block(tmp_path / "big.onnx")
    # in a fresh process: pages that earlier tests freed but the allocator kept would
    # absorb the load, and RSS would show nothing either way
    code = ("import json, sys; from pathlib import Path; from tests.test_unload_memory import measure; "
            "print(json.dumps(measure(sys.argv[1], Path(sys.argv[2]))))")
    run = subprocess.run([sys.executable, "-c", code, engine, str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    cycles = json.loads(run.stdout.strip().splitlines()[-1])[1:]  # the first cycle warms the engine up
    first_before = cycles[0][0]
    for before, loaded, after in cycles:
        assert loaded - before > 48 * MB, "the load did not show in RSS: the check would prove nothing"
        assert after - before < 8 * MB, f"{engine}: evicting kept {(after - before) / MB:.1f} MB"
    # and nothing accumulates over the cycles
    assert cycles[-1][2] - first_before < 8 * MB
