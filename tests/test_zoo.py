"""The embedded zoo: real weights, real labelled data, a real accuracy range, stitchable.

These tests read the committed ONNX files and data; nothing is trained or downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ZOO, zoo_tasks

from loom.core.runref import run_batched, session
from loom.model.cutting import partition_family
from loom.model.family import load_family
from loom.model.stitch import StitchedModel, evaluate_configs, merge_config
from loom.model.variants import measure_accuracy

TASKS = zoo_tasks()
pytestmark = pytest.mark.skipif(not TASKS, reason="the zoo is not built (scripts/build_zoo.py)")


def test_three_tasks_of_different_model_kinds():
    assert len(TASKS) >= 3
    ops = {}
    for task in TASKS:
        import onnx

        fam = load_family(ZOO / task)
        model = onnx.load(str(fam.variant_path("dense")))
        ops[task] = {n.op_type for n in model.graph.node}
    kinds = {("Conv" in o, "Softmax" in o) for o in ops.values()}
    assert (True, False) in kinds and (False, True) in kinds  # CNNs and a transformer


@pytest.mark.parametrize("task", TASKS)
def test_family_is_complete(task):
    fam = load_family(ZOO / task)
    kinds = [v.kind for v in fam.variants]
    assert len(fam.variants) >= 8
    assert kinds.count("unstructured") >= 3 and "structured" in kinds
    assert {"dense", "int8", "fp16"} <= set(kinds)
    x, y = fam.eval_data()
    assert len(x) >= 300 and y is not None and len(np.unique(y)) == fam.manifest.num_classes


@pytest.mark.parametrize("task", TASKS)
def test_recorded_accuracy_is_what_the_model_scores(task):
    fam = load_family(ZOO / task)
    n = len(fam.eval_data()[0])
    for v in fam.variants:
        # int8/fp16 kernels differ by instruction set (AVX2, AVX512-VNNI, ...): rounding may
        # flip a borderline sample or two, never more (see quantize_int8's reduce_range).
        tol = 1e-4 if v.precision == "fp32" else 2.5 / n
        assert measure_accuracy(fam, fam.variant_path(v.name)) == pytest.approx(v.accuracy, abs=tol), v.name


@pytest.mark.parametrize("task", TASKS)
def test_accuracy_range_of_at_least_five_points(task):
    accs = [v.accuracy for v in load_family(ZOO / task).variants]
    assert max(accs) - min(accs) >= 0.05
    assert max(accs) >= 0.9  # trained models, not noise


@pytest.fixture(scope="module")
def image_partition(tmp_path_factory):
    return partition_family(load_family(ZOO / "image-cls"), tmp_path_factory.mktemp("image-part"), k=3)


def test_image_family_partitions_and_chains_reproduce(image_partition):
    p = image_partition
    assert p.k == 3 and max(p.slot_macs_share) < 0.6
    for name, r in p.verification.items():
        assert r["ok"], (name, r)
        if r["tolerance_kind"].startswith("absolute"):
            assert r["max_abs_diff"] <= 1e-5 * max(1.0, r["max_abs_diff"] / max(r["max_rel_diff"], 1e-30))


def test_image_stitched_chained_equals_merged(image_partition):
    fam = load_family(ZOO / "image-cls")
    x, _ = fam.eval_data(64)
    config = ("int8", "dense", "unstructured-80")
    with StitchedModel(image_partition, config) as chain:
        chained = chain.run({"input": x})["logits"]
    merged = run_batched(session(merge_config(image_partition, config), name="m"), {"input": x})["logits"]
    assert np.abs(chained - merged).max() <= 5e-2 * np.abs(chained).max()
    assert (chained.argmax(-1) == merged.argmax(-1)).all()


def test_stitching_costs_accuracy_no_single_piece_predicts(tmp_path):
    """PROBE.md: stitched pieces of separately fine-tuned variants can lose accuracy that
    none of the pieces loses on its own; the accuracy of every config is measured."""
    fam = load_family(ZOO / "signal-cls")
    part = partition_family(fam, tmp_path, k=3)
    names = ["dense", "unstructured-95", "structured-50", "int8"]
    configs = [(a, b, c) for a in names for b in names for c in names]
    acc = evaluate_configs(part, configs, fam)
    own = {v.name: v.accuracy for v in fam.variants}
    for c in configs:
        if len(set(c)) == 1:
            assert acc[c] == pytest.approx(own[c[0]], abs=1e-4)
    loss = {c: min(own[v] for v in c) - a for c, a in acc.items()}
    assert max(loss.values()) >= 0.05  # some stitch is 5+ points below its worst piece
    assert len({round(a, 4) for a in acc.values()}) > 10


@pytest.mark.slow
@pytest.mark.parametrize("task", [t for t in TASKS if t != "image-cls"])
def test_every_family_partitions(task, tmp_path):
    p = partition_family(load_family(ZOO / task), tmp_path, k=3)
    assert all(r["ok"] for r in p.verification.values())
