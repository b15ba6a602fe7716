"""Build the edge zoo: published pretrained networks on real labelled data (issue 13).

``python scripts/build_edge_zoo.py --out out/zoo/edge`` (``make zoo-edge``; torch 2.13
CPU). Every network and dataset comes from a pinned registry package (README of
``zoo/edge``); three builders make the raw variants, sparseloom does the rest:

- ``fashion`` (``edge_train``): two image tasks on one pretrained backbone, torchvision's
  ImageNet MobileNetV2, on Fashion-MNIST: ``fashion-cls`` (ten classes) and
  ``fashion-group`` (four coarse groups: tops, full-length, footwear, bags), each its own
  head on the very same backbone bytes. Each backbone variant (dense, magnitude-pruned at
  four sparsities, channel-thinned at two) gets its BatchNorm statistics re-estimated on
  unlabelled training images; each head is fitted once on the dense backbone and kept
  by every variant.
- ``minilm`` (``edge_minilm``): ``review-sentiment``, all-MiniLM-L6-v2 with a linear head on
  Rotten Tomatoes snippets; token ids and an attention mask in.
- ``ocr`` (``edge_ocr``): ``word-ocr``, PP-OCRv4 recognition on word images rendered with
  real fonts (synthetic images, real model), scored by CTC exact match.

Stage two (sparseloom, the same for every task): the family is made from the raw dense
model, every raw variant is recorded and scored on held-out labelled data, and int8,
fp16 and one compression stack (a pruned variant in fp16) are added. A finished family
is kept: rebuild with ``--force``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loom.model.family import load_family  # noqa: E402
from loom.model.variants import add_variant, init_family, make_variants  # noqa: E402

SIDE = 192  # input side the 28x28 images are resized to: dense >= 5 ms at batch 1 on one core
EVAL = 600  # held-out test images each variant (and each stitched config) is scored on
CALIB = 128
BN_IMAGES = 512
# Milder than the embedded zoo's: nothing here is fine-tuned and every variant keeps the
# dense model's head. Measured with that head: unstructured-50 49.8%, -70 14.5%,
# structured-20 37.7% against dense 83.7% (fashion-cls); and past structured-30 or
# unstructured-70 the deep activations stop resembling the dense one's, so the cut-meaning
# check refuses every deep cut (docs/edge-zoo.md).
UNSTRUCTURED = (0.1, 0.2, 0.3, 0.4)
STRUCTURED = (0.1, 0.2)
GROUPS = {"tops": [0, 2, 4, 6], "full-length": [1, 3], "footwear": [5, 7, 9], "bags": [8]}
FASHION = {
    "fashion-cls": ("MobileNetV2 (torchvision ImageNet weights) on Fashion-MNIST, 10 classes; "
                    f"28x28 grey images resized to {SIDE}x{SIDE} inside the model", None),
    "fashion-group": ("MobileNetV2 (the same ImageNet backbone as fashion-cls) on Fashion-MNIST in 4 coarse "
                      "groups (tops, full-length, footwear, bags): its own head, shared backbone blocks", GROUPS),
}


@dataclass(frozen=True)
class EdgeTask:
    """One task of the zoo: the builder that makes its raw variants, and how it is scored."""

    group: str
    description: str
    metric: str = "top1"
    #: the pruned variant that also gets an fp16 twin (the compression stack)
    stack: str = "unstructured-30"


TASKS = {
    **{t: EdgeTask("fashion", d) for t, (d, _) in FASHION.items()},
    "review-sentiment": EdgeTask(
        "minilm", "all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) with a linear head on Rotten Tomatoes "
        "snippets (fresh/rotten); inputs: token ids and attention mask, 64 tokens"),
    "word-ocr": EdgeTask(
        "ocr", "PP-OCRv4 text recognition (RapidOCR's ONNX export, Apache-2.0) on word images rendered with real "
        "fonts: synthetic images, real model; exact-match word accuracy after CTC decoding", metric="ctc"),
}
BN_NOTE = f"BatchNorm statistics re-estimated on {BN_IMAGES} unlabelled training images"
BACKBONE_NOTE = f"torchvision's ImageNet MobileNetV2 weights (mobilenet_v2-b0353104.pth), not fine-tuned; {BN_NOTE}"


def labels(y: np.ndarray, groups: dict[str, list[int]] | None) -> np.ndarray:
    if groups is None:
        return y.astype(np.int64)
    table = np.zeros(10, dtype=np.int64)
    for g, members in enumerate(groups.values()):
        table[members] = g
    return table[y]


def backbones(base, train_x):  # noqa: ANN001, ANN201
    """(name, model, kind, sparsity, note) for every backbone variant, BN re-estimated."""
    import copy

    import edge_mobilenet as em
    import edge_train as et

    bn_x = train_x[:BN_IMAGES]
    yield "dense", base, "dense", 0.0, BACKBONE_NOTE
    for s in UNSTRUCTURED:
        m = copy.deepcopy(base)
        got = et.magnitude_prune(m, s)
        et.recalibrate_bn(m, bn_x)
        yield (f"unstructured-{round(s * 100)}", m, "unstructured", round(got, 4),
               f"per-layer magnitude pruning of every 1x1 conv to {s:.0%} zeros ({got:.2%} achieved; stem and "
               f"depthwise convs dense) of the ImageNet backbone, no fine-tuning; {BN_NOTE}")
    for s in STRUCTURED:
        m = em.thin(base, s)
        et.recalibrate_bn(m, bn_x)
        yield (f"structured-{round(s * 100)}", m, "structured", s,
               f"channel pruning: {s:.0%} of each inverted-residual block's expansion channels removed (ranked by "
               f"L1 norm x BatchNorm scale), a thinner network, no fine-tuning; {BN_NOTE}")


def torch_stage(raw: Path, data: dict, weights: Path, log) -> dict:  # noqa: ANN001
    """Export every (task, backbone variant) to ``raw/<task>/<variant>.onnx``; return what was made.

    Each task's head is fitted once, on the dense backbone's features, and every variant
    keeps it: a variant is a compression of the task's model, not a model of its own, so
    any variant's blocks can follow any other's (a head refitted per variant would only
    fit its own backbone's features).
    """
    import copy

    import edge_mobilenet as em
    import edge_train as et
    import torch

    torch.manual_seed(0)
    train_x = et.images(data["train_x"])
    base = em.load_imagenet(str(weights), 10, SIDE)
    et.recalibrate_bn(base, train_x[:BN_IMAGES])
    feats = et.embed(base, train_x, raw / "dense-features.onnx")
    heads = {}
    for task, (_, groups) in FASHION.items():
        y = labels(data["train_y"], groups)
        heads[task] = et.fit_head(feats, y, int(y.max()) + 1)
    made: dict[str, dict] = {t: {} for t in FASHION}
    for name, model, kind, sparsity, note in backbones(base, train_x):
        t0 = time.perf_counter()
        for task in FASHION:
            model.classifier[1] = copy.deepcopy(heads[task])
            (raw / task).mkdir(parents=True, exist_ok=True)
            et.export_onnx(model, raw / task / f"{name}.onnx")
            head_note = (f"linear head fitted on {len(train_x)} labelled training images of the dense backbone's "
                         "features (L-BFGS logistic regression): the only part trained") if name == "dense" else \
                "the dense model's head, unchanged"
            made[task][name] = {"kind": kind, "sparsity": sparsity, "made_by": f"{note}; {head_note}",
                                "fine_tuned": "head" if name == "dense" else "no"}
        log(f"  {name}: {time.perf_counter() - t0:.0f} s")
    for task, (_, groups) in FASHION.items():
        x_eval = (data["test_x"][:EVAL].astype(np.float32) / 255.0)[:, None]
        np.savez_compressed(raw / task / "eval.npz", x=x_eval, y=labels(data["test_y"][:EVAL], groups))
        x_cal = (data["train_x"][-CALIB:].astype(np.float32) / 255.0)[:, None]
        np.savez_compressed(raw / task / "calib.npz", x=x_cal)
    return made


def fashion_stage(raw: Path, cache: Path, log, *, full_data: bool = False) -> dict:  # noqa: ANN001
    """Both image tasks' raw folders (``raw/<task>``), from the weights and data packages."""
    import edge_sources

    weights = edge_sources.weights_file("mobilenet_v2", cache)
    data = edge_sources.fashion(cache, full=full_data)
    log(f"torch stage: backbone variants at {SIDE}x{SIDE}, heads for {', '.join(FASHION)}")
    return torch_stage(raw, data, weights, log)


def group_stage(group: str, raw: Path, cache: Path, log, *, full_data: bool = False) -> dict[str, dict]:  # noqa: ANN001
    """Run one builder; ``{task: {variant: how it was made}}`` with each task's raw folder in ``raw/<task>``."""
    if group == "fashion":
        return fashion_stage(raw, cache, log, full_data=full_data)
    tasks = [t for t, spec in TASKS.items() if spec.group == group]
    module = importlib.import_module(f"edge_{group}")
    made = module.build(raw / tasks[0], cache, log)
    return {tasks[0]: {k: v for k, v in made.items() if isinstance(v, dict) and "kind" in v}}


def loom_stage(task: str, raw: Path, out: Path, made: dict) -> dict:
    """Make the family folder with sparseloom: variants recorded and scored, int8/fp16 and a stack added."""
    spec = TASKS[task]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        stage = Path(tmp) / task
        stage.mkdir()
        for data in ("eval.npz", "calib.npz"):
            shutil.copy(raw / data, stage / data)
        family = init_family(raw / "dense.onnx", stage, task=task, num_classes=classes(raw / "dense.onnx"),
                             description=spec.description, metric=spec.metric,
                             made_by=made["dense"]["made_by"], fine_tuned=made["dense"]["fine_tuned"])
        for name, v in made.items():
            if name == "dense":
                continue
            shutil.copy(raw / f"{name}.onnx", stage / f"{name}.onnx")
            add_variant(family, name, stage / f"{name}.onnx", kind=v["kind"], sparsity=v["sparsity"],
                        made_by=v["made_by"], fine_tuned=v["fine_tuned"])
        make_variants(family, int8=True, fp16=True)
        # the compression stack: a pruned network in half precision (its int8 twin loses
        # too much on the image tasks, see docs/edge-zoo.md)
        make_variants(family, fp16=True, source=spec.stack)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    return {v.name: v.accuracy for v in load_family(out).variants}


def classes(model: Path) -> int:
    """The size of the model output's last axis: its classes (for CTC, with the blank)."""
    import onnx

    dims = onnx.load(str(model), load_external_data=False).graph.output[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/zoo/edge")
    ap.add_argument("--cache", default="out/cache/edge", help="downloaded packages and unpacked files")
    ap.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS), help="build only these")
    ap.add_argument("--full-data", action="store_true", help="all of Fashion-MNIST (apt), not the committed slice")
    ap.add_argument("--force", action="store_true", help="rebuild families that exist already")
    args = ap.parse_args(argv)
    out, cache = Path(args.out), Path(args.cache)
    todo = [t for t in args.tasks if args.force or not (out / t / "family.yaml").is_file()]
    if not todo:
        print(f"edge zoo already built in {out} (--force rebuilds)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = json.loads((out / "build.json").read_text()) if (out / "build.json").is_file() else {}
    from loom.core.runref import evaluation_threads

    say = lambda m: print(m, flush=True)  # noqa: E731
    with evaluation_threads(os.cpu_count() or 1):
        for group in dict.fromkeys(TASKS[t].group for t in todo):
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                made = group_stage(group, Path(tmp), cache, say, full_data=args.full_data)
                for task in [t for t in todo if TASKS[t].group == group]:
                    say(f"sparseloom stage: {task}")
                    summary[task] = loom_stage(task, Path(tmp) / task, out / task, made[task])
            if not isinstance(summary.get("seconds"), dict):
                summary["seconds"] = {}
            summary["seconds"][group] = round(time.perf_counter() - t0, 1)
    (out / "build.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
