"""Cuts: found on the graph, aligned across variants, meaning checked, chains reproduce variants."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import yaml
from synth import residual_cnn

from loom.core.errors import AlignmentError, LoomError
from loom.core.onnxutil import save_model
from loom.model.align import CutTolerance, align, choose_cuts, cut_drift, meaning_problem
from loom.model.cuts import GraphIndex, candidate_cuts
from loom.model.cutting import partition_family
from loom.model.family import load_family
from loom.model.variants import add_variant


def test_single_tensor_cuts_of_a_residual_cnn():
    cands = candidate_cuts(GraphIndex.build(residual_cnn()), max_tensors=1)
    assert [c.tensors for c in cands] == [
        ("stem",), ("stem_relu",), ("b0.add",), ("b0.out",), ("b1.add",), ("b1.out",),
        ("b2.add",), ("b2.out",), ("pool",), ("flat",),
    ]
    shares = [c.macs_before for c in cands]
    assert shares == sorted(shares) and 0 < shares[0] < shares[-1] <= 1


def test_two_tensor_cuts_inside_residual_blocks():
    cands = candidate_cuts(GraphIndex.build(residual_cnn()), max_tensors=2)
    assert ("b0.r1", "stem_relu") in [c.tensors for c in cands]


def _transformer_like() -> onnx.ModelProto:
    """Every layer reads the graph input ``mask`` again: no single-tensor cut exists."""
    h = onnx.helper
    nodes, inits = [], []
    prev = "x"
    for i in range(3):
        w = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32) * (i + 1), f"w{i}")
        inits.append(w)
        nodes += [
            h.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            h.make_node("Mul", [f"m{i}", "mask"], [f"h{i}"]),
        ]
        prev = f"h{i}"
    graph = h.make_graph(
        nodes, "t",
        [h.make_tensor_value_info("x", 1, ["b", 4]), h.make_tensor_value_info("mask", 1, ["b", 4])],
        [h.make_tensor_value_info(prev, 1, ["b", 4])], initializer=inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_cut_carries_a_graph_input_read_by_later_layers():
    cands = candidate_cuts(GraphIndex.build(_transformer_like()), max_tensors=1)
    assert ("h0", "mask") in [c.tensors for c in cands]
    assert ("h1", "mask") in [c.tensors for c in cands]


def test_choose_cuts_balances_macs():
    cands = candidate_cuts(GraphIndex.build(residual_cnn(blocks=3)), max_tensors=1)
    for k in (2, 3, 4):
        chosen = choose_cuts(cands, k)
        assert len(chosen) == k - 1
        bounds = [0.0, *[c.macs_before for c in chosen], 1.0]
        assert bounds == sorted(bounds)
        assert max(b - a for a, b in zip(bounds, bounds[1:], strict=False)) <= 1 / k + 0.2
    assert choose_cuts(cands, 1) == []
    with pytest.raises(AlignmentError):
        choose_cuts(cands[:1], 4)


def test_alignment_of_the_synthetic_family(synth_family):
    report = align(synth_family)
    aligned = [c.tensors for c in report.aligned]
    for t in ("stem_relu", "b0.out", "b1.out", "b2.out"):
        assert (t,) in aligned
    # the structured variant narrows the inside of each block: those cuts are refused, with why
    refused = [r for r in report.refusals if r.variant == "structured-25-pt"]
    assert any("has shape" in r.reason for r in refused)


def test_chains_reproduce_every_variant(synth_partition):
    p = synth_partition
    assert p.k == 3 and len(p.cuts) == 2
    for name, r in p.verification.items():
        assert r["ok"], (name, r)
        if name in ("dense", "unstructured-50-pt", "structured-25-pt"):
            assert r["max_abs_diff"] <= 1e-5
        # quantized and half-precision chains are compared without boundary-dependent fusions
        assert r["graph_optimizations"] == ("all" if p.family().variant(name).precision == "fp32" else "basic")
    for name, ids in p.variants.items():
        assert len(ids) == 3 and all((p.root / p.blocks[b].file).is_file() for b in ids), name


def test_identical_blocks_are_stored_once(synth_family, tmp_path):
    folder = tmp_path / "fam"
    shutil.copytree(synth_family.root, folder)
    family = load_family(folder)
    shutil.copy(folder / "dense.onnx", folder / "dense-copy.onnx")
    add_variant(family, "dense-copy", folder / "dense-copy.onnx", kind="dense")
    p = partition_family(family, tmp_path / "part", k=3)
    assert p.variants["dense-copy"] == p.variants["dense"]
    assert len(p.blocks) == 3 * (len(p.variants) - 1)


def _moved_cut_variant(model: onnx.ModelProto, cut: str) -> onnx.ModelProto:
    """What PROBE.md saw: the activation moved past the cut, so the tensor named ``cut``
    now holds the pre-ReLU value while the model's outputs stay the same."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    relu = next(n for n in g.node if n.output[0] == cut)
    pre = relu.input[0]
    for n in g.node:
        for j, x in enumerate(n.input):
            if x == cut:
                n.input[j] = f"{cut}.after"
    relu.input[0] = cut
    relu.output[0] = f"{cut}.after"
    writer = next(n for n in g.node if pre in n.output)
    writer.output[list(writer.output).index(pre)] = cut
    for n in g.node:
        for j, x in enumerate(n.input):
            if x == pre:
                n.input[j] = cut
    # restore a valid topological order: the relu now follows its (renamed) input's writer
    nodes = list(g.node)
    nodes.remove(relu)
    nodes.insert(nodes.index(writer) + 1, relu)
    del g.node[:]
    g.node.extend(nodes)
    return out


def test_a_moved_cut_is_refused_with_the_reason(synth_family, tmp_path):
    folder = tmp_path / "fam"
    shutil.copytree(synth_family.root, folder)
    family = load_family(folder)
    dense = onnx.load(str(folder / "dense.onnx"))
    save_model(_moved_cut_variant(dense, "b1.out"), folder / "fused.onnx")
    add_variant(family, "fused", folder / "fused.onnx", kind="int8", precision="int8", sparsity=0.0)
    assert family.variant("fused").accuracy == family.variant("dense").accuracy  # outputs unchanged
    report = align(family)
    reasons = report.reasons_for(["b1.out"])
    assert reasons and "fused" in reasons[0] and "negative" in reasons[0]
    assert ("b1.out",) not in [c.tensors for c in report.aligned]
    with pytest.raises(AlignmentError, match=r"cut \['b1.out'\] refused: fused: 'b1.out'"):
        partition_family(family, tmp_path / "part", cuts=[["b1.out"]])


def test_non_aligned_variant_is_refused(synth_family, tmp_path):
    folder = tmp_path / "fam"
    shutil.copytree(synth_family.root, folder)
    family = load_family(folder)
    save_model(residual_cnn(seed=1, channels=6), folder / "other.onnx")  # another architecture
    add_variant(family, "other", folder / "other.onnx", kind="dense")
    with pytest.raises(AlignmentError) as err:
        partition_family(family, tmp_path / "part", k=3)
    assert "other" in str(err.value) and "has shape" in str(err.value)
    assert isinstance(err.value, LoomError) and isinstance(err.value, ValueError)


def test_variants_with_other_inputs_are_refused(synth_family, tmp_path):
    folder = tmp_path / "fam"
    shutil.copytree(synth_family.root, folder)
    save_model(_transformer_like(), folder / "alien.onnx")
    manifest = yaml.safe_load((folder / "family.yaml").read_text())
    manifest["variants"].append({"name": "alien", "file": "alien.onnx", "kind": "dense"})
    manifest["variant_count"] = len(manifest["variants"])  # an edit by hand keeps the stated count right
    (folder / "family.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(AlignmentError, match="alien: graph inputs"):
        align(load_family(folder))


def test_meaning_problem_thresholds():
    rng = np.random.default_rng(0)
    shared = np.maximum(rng.standard_normal(400), 0)  # structure every input shares
    dense = shared + np.maximum(rng.standard_normal((16, 400)), 0)
    tol = CutTolerance()
    drifted = dense + 0.5 * np.maximum(rng.standard_normal((16, 400)), 0)  # fine-tuning drift
    assert meaning_problem(cut_drift(dense, drifted), tol) is None
    assert "negative" in meaning_problem(cut_drift(dense, dense - 0.5), tol)
    assert "scale" in meaning_problem(cut_drift(dense, dense * 3), tol)
    # activations of other inputs under the same name: only the shared structure matches
    assert "not the same tensor" in meaning_problem(cut_drift(dense, np.roll(dense, 3, axis=0)), tol)
    assert "not the same tensor" in meaning_problem(cut_drift(dense, dense[:, ::-1]), tol)


def test_a_miswired_chain_is_caught_whatever_the_noise_floor(synth_partition, tmp_path):
    """The fp32 tolerance may grow to 10x the network's own rounding noise, never to a wrong block."""
    import shutil

    from loom.model.cutting import verify_chains
    from loom.model.partition import load_partition

    copy = tmp_path / "part"
    shutil.copytree(synth_partition.root, copy)
    store = synth_partition.store_root
    shutil.copytree(store, tmp_path / store.name)
    part = load_partition(copy)
    dense, pruned = part.variants["dense"], part.variants["unstructured-50-pt"]
    part.variants["dense"] = [dense[0], pruned[1], dense[2]]  # the middle block of another variant
    result = verify_chains(part, part.family())["dense"]
    assert not result["ok"] and result["max_abs_diff"] > 100 * result["noise_floor"]
