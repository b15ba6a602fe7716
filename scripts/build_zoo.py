"""Build the embedded zoo: three tasks, eight or more variants each, real weights and data.

Reproducible: ``python scripts/build_zoo.py --out zoo`` (needs the ``zoo`` extra:
torch 2.13 CPU, mnist1d, scikit-learn; about 8 minutes on 2 cores). Two stages:

1. ``zoo_torch.build_raw`` trains each task's dense model on real labelled data and
   makes the pruned variants a production pipeline would (magnitude or channel masks,
   then fine-tuning with the masks fixed), exported to ONNX with the zeros in place.
2. sparseloom itself does the rest, without retraining: it removes the zeroed channels
   of the structured variant physically (``prune_structured``), quantizes to int8 and
   converts to fp16 with the cut tensors kept float (``make_variants``; the structured
   variant is also quantized, as compression stacks in production), and measures
   every variant on the evaluation data into ``family.yaml``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loom.core.onnxutil import load_model, save_model  # noqa: E402
from loom.model.family import load_family  # noqa: E402
from loom.model.variants import add_variant, init_family, make_variants, prune_structured  # noqa: E402

DESCRIPTIONS = {
    "image-cls": "ResNet-style CNN on scikit-learn's digits (8x8 scans of handwritten digits, upsampled to 32x32)",
    "signal-cls": "1-D ResNet-style CNN on MNIST-1D (generated offline by the mnist1d package)",
    "seq-cls": "transformer encoder on MNIST-1D sequences (each of the 40 steps is a token)",
}


def build_task(task: str, out: Path, *, quick: bool, seed: int, raw_dir: Path | None = None) -> dict:
    import zoo_torch

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        if raw_dir is not None and (raw_dir / "build.json").is_file():
            # Reuse a finished torch stage (written by an earlier run with --keep-raw).
            shutil.copytree(raw_dir, raw, dirs_exist_ok=True)
            info = json.loads((raw_dir / "build.json").read_text())
        else:
            info = zoo_torch.build_raw(task, raw, seed=seed, quick=quick)
            if raw_dir is not None:
                shutil.copytree(raw, raw_dir, dirs_exist_ok=True)
                (raw_dir / "build.json").write_text(json.dumps(info, indent=1))
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for data in ("eval.npz", "calib.npz"):
            shutil.copy(raw / data, out / data)
        made = info["variants"]
        family = init_family(raw / "dense.onnx", out, task=task, num_classes=info["num_classes"],
                             description=DESCRIPTIONS.get(task, info.get("dataset", "")),
                             made_by=made["dense"]["made_by"])
        for name, v in made.items():
            if name == "dense":
                continue
            model = load_model(raw / f"{name}.onnx")
            sparsity = v.get("sparsity")
            made_by = v["made_by"]
            if v["kind"] == "structured":
                # The builder zeroed whole channels; removing them is sparseloom's job.
                model, groups = prune_structured(model, sparsity)
                made_by += f"; then loom removed the zeroed channels physically ({groups} groups)"
            save_model(model, out / f"{name}.onnx")
            add_variant(family, name, out / f"{name}.onnx", kind=v["kind"], sparsity=sparsity, made_by=made_by)
        make_variants(family, int8=True, fp16=True)
        # Compression stacks in production: the structured variant, quantized.
        make_variants(family, int8=True, source="structured-50")
    family = load_family(out)
    return {
        "task": task,
        "seconds": round(time.perf_counter() - t0, 1),
        "train_seconds": info.get("train_seconds"),
        "variants": {v.name: v.accuracy for v in family.variants},
    }


def main(argv: list[str] | None = None) -> int:
    import zoo_torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="zoo")
    ap.add_argument("--tasks", nargs="*", default=list(zoo_torch.TASKS))
    ap.add_argument("--quick", action="store_true", help="smoke mode: tiny training, for tests of the builder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-raw", help="folder to keep (and reuse) the torch stage's output per task")
    args = ap.parse_args(argv)
    summary = []
    for task in args.tasks:
        print(f"building {task} ...", flush=True)
        raw = Path(args.keep_raw) / task if args.keep_raw else None
        summary.append(build_task(task, Path(args.out) / task, quick=args.quick, seed=args.seed, raw_dir=raw))
        print(json.dumps(summary[-1], indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
