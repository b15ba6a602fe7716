"""Families whose model has several inputs (token ids and an attention mask, as text
encoders are exported): import, variants, cuts that carry the mask, stitching, scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from loom.core.errors import ManifestError
from loom.model.cutting import partition_family
from loom.model.family import load_family
from loom.model.stitch import StitchedModel, evaluate_config, evaluate_configs
from loom.model.variants import init_family, make_variants

S, D, V, C = 8, 16, 50, 3  # sequence, width, vocabulary, classes


def encoder(seed: int = 0) -> bytes:
    """A small masked encoder: embeddings, three residual layers that each read the float
    mask made once at the top, masked mean pooling, a linear head."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((V, D)).astype(np.float32), "E"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array((0.5 * rng.standard_normal((D, C))).astype(np.float32), "Wh"),
             numpy_helper.from_array(np.zeros(C, np.float32), "bh")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h0"], name="embed"),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT, name="mask_cast"),
             helper.make_node("Unsqueeze", ["maskf", "axis2"], ["m3"], name="mask_3d")]
    for i in range(1, 4):
        inits += [numpy_helper.from_array((0.4 * rng.standard_normal((D, D))).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(D)).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [f"h{i - 1}", f"W{i}"], [f"p{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"p{i}", f"b{i}"], [f"q{i}"], name=f"bias{i}"),
                  helper.make_node("Relu", [f"q{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("Mul", [f"r{i}", "m3"], [f"g{i}"], name=f"masked{i}"),
                  helper.make_node("Add", [f"g{i}", f"h{i - 1}"], [f"h{i}"], name=f"residual{i}")]
    nodes += [helper.make_node("Mul", ["h3", "m3"], ["hm"], name="pool_mask"),
              helper.make_node("ReduceSum", ["hm", "axis1"], ["sum"], keepdims=0, name="pool_sum"),
              helper.make_node("ReduceSum", ["m3", "axis1"], ["count"], keepdims=0, name="pool_count"),
              helper.make_node("Div", ["sum", "count"], ["pooled"], name="pool_mean"),
              helper.make_node("Gemm", ["pooled", "Wh", "bh"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", S]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", S])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", C])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def tokens(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, S + 1, n)
    mask = (np.arange(S)[None] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(1, V, (n, S)) * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("two-inputs")
    src = root / "encoder.onnx"
    src.write_bytes(encoder())
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    ev, cal = tokens(200, 1), tokens(64, 2)
    y = sess.run(None, ev)[0].argmax(1)
    y[::10] = (y[::10] + 1) % C  # labels the dense model gets 90% right
    out = root / "fam"
    out.mkdir()
    np.savez(out / "eval.npz", y=y, **ev)
    np.savez(out / "calib.npz", **cal)
    fam = init_family(src, out, task="two-inputs", num_classes=C)
    return make_variants(fam, unstructured=[0.5], int8=True, fp16=True)


def test_manifest_lists_every_input(family):
    fam = load_family(family.root)
    assert [(i.name, i.dtype, i.shape) for i in fam.manifest.inputs] == [
        ("input_ids", "int64", [None, S]), ("attention_mask", "int64", [None, S])]
    assert fam.variant("dense").accuracy == pytest.approx(0.9)
    feeds, y = fam.eval_feeds(5)
    assert set(feeds) == {"input_ids", "attention_mask"} and len(y) == 5
    with pytest.raises(ManifestError, match="2 inputs"):
        fam.eval_data()


def test_cuts_carry_the_mask_and_chains_match(family, tmp_path: Path):
    part = partition_family(family, tmp_path / "part", k=3)
    assert all("m3" in cut for cut in part.cuts), part.cuts  # every later block reads the mask
    feeds, _ = family.eval_feeds(16)
    full = ort.InferenceSession(str(family.variant_path("dense")), providers=["CPUExecutionProvider"])
    want = full.run(None, feeds)[0]
    with StitchedModel(part, ["dense"] * 3) as chain:
        got = chain.run(feeds)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    configs = [("dense", "unstructured-50-pt", "int8"), ("fp16", "dense", "dense")]
    walked = evaluate_configs(part, configs, family)
    for c in configs:
        assert walked[c] == pytest.approx(evaluate_config(part, c, family))


def test_missing_input_array_is_named(family, tmp_path: Path):
    import shutil

    copy = tmp_path / "fam"
    shutil.copytree(family.root, copy)
    data = dict(np.load(copy / "calib.npz"))
    del data["attention_mask"]
    np.savez(copy / "calib.npz", **data)
    with pytest.raises(ManifestError, match=r"inputs\[1\].*attention_mask"):
        load_family(copy)


def test_runtime_serves_both_inputs_through_the_chain(family, tmp_path: Path):
    """Requests carry ids and mask; later blocks get the mask from the cut: outputs equal
    the whole stitched model's, request by request."""
    from backends import get_backend
    from loom.serving.runtime import Runtime, TaskBinding
    from placement.plan import Plan

    part = partition_family(family, tmp_path / "part", k=3)
    config = ("dense", "int8", "unstructured-50-pt")
    blocks = tuple(part.variants[v][s] for s, v in enumerate(config))
    plan = Plan(task="two-inputs", config=config, placement=("a", "b", "a"), block_ids=blocks,
                latency_ms=3.0, block_ms=(1.0, 1.0, 1.0), transfer_ms=(0.0, 0.0), accuracy=0.9, memory_bytes=0)
    spec = {i.name: (i.dtype, tuple(i.shape)) for i in family.manifest.inputs}
    binding = TaskBinding("two-inputs", [plan], {b: part.block_path(b) for b in blocks}, latency_ms=1000,
                          accuracy_floor=0.0, output_name="logits", inputs=spec)
    feeds, _ = family.eval_feeds(8)
    with StitchedModel(part, config) as whole:
        want = whole.run(feeds)["logits"]
    backends = {p: get_backend("onnxruntime", intra_op_threads=1) for p in ("a", "b")}
    with Runtime(backends=backends, tasks=[binding], adaptive=False) as rt:
        futures = [rt.submit("two-inputs", {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(8)]
        got = np.concatenate([f.result(timeout=30) for f in futures])
        with pytest.raises(Exception, match="attention_mask"):
            rt.submit("two-inputs", {"input_ids": feeds["input_ids"][:1]})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_attention_models_quantize_only_weighted_ops():
    """int8 on a model with a Softmax (attention) leaves Add/Mul/Softmax float: the mask's
    large negative bias cannot share one 8-bit scale with the scores."""
    import onnx

    from loom.model.precision import int8_op_types

    model = onnx.load_from_string(encoder())
    assert int8_op_types(model) is None
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax"))
    assert int8_op_types(model) == ["MatMul", "Gemm", "Conv"]


def test_int8_leaves_no_unread_nodes_when_a_tensor_is_read_twice():
    """A node reading one tensor several times (a grey-to-RGB Concat) got dedicated Q/DQ
    pairs, some unread: they sat after every cut and put that tensor across all of them."""
    from loom.model.precision import quantize_int8

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Concat", ["r", "r", "r"], ["rgb"], axis=1, name="rgb"),
             helper.make_node("Conv", ["rgb", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "grey", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
                              initializer=[numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    q = quantize_int8(model, rng.random((16, 1, 8, 8), dtype=np.float32), preserve=["r"])
    read = {x for n in q.graph.node for x in n.input} | {o.name for o in q.graph.output}
    assert all(o in read for n in q.graph.node for o in n.output), [n.name for n in q.graph.node]
