"""Post-training unstructured pruning without fine-tuning: Wanda against magnitude.

For each task of a zoo, copies the dense variant and its data into a temporary folder (the
zoo is only read), calibrates Wanda once on the family's calibration data
(``loom/model/wanda.py``), then at each sparsity prunes the same weights
(``prunable_weights``) by magnitude (``prune_unstructured``) and by Wanda
(``prune_wanda``), and scores both with the family's metric on the first ``--eval``
evaluation samples, beside the dense model on the same samples. The aim (issue 12): at
50% sparsity, at most 2 points below dense on a pretrained model.

    python scripts/bench_pruning.py --tasks fashion-cls --eval 300 --out out/bench_pruning.json

Prints a table: task, sparsity, magnitude / Wanda / dense accuracy, the sparsity each
reached, and the seconds each took (pruning plus scoring; calibration once per task,
printed apart). ``--zoo``: the edge zoo by default, ``embedded`` or a zoo folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_check import zoo_folder_and_tasks  # noqa: E402

from loom.core.onnxutil import load_model, save_model  # noqa: E402
from loom.core.paths import zoo_name  # noqa: E402
from loom.core.runref import evaluation_threads, run_batched, session  # noqa: E402
from loom.model.family import Family, Manifest, load_family  # noqa: E402
from loom.model.variants import (  # noqa: E402
    measure_accuracy,
    prunable_weights,
    prune_unstructured,
    weight_sparsity,
)
from loom.model.wanda import calibrate, prune_wanda  # noqa: E402


def _floats(text: str) -> list[float]:
    return [v / 100 if v > 1 else v for v in (float(x) for x in text.split(",") if x.strip())]


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dense_copy(family: Family, folder: Path) -> Family:
    """A family in ``folder`` with the dense variant and the data files of ``family`` only."""
    m = family.manifest
    dense = family.reference_variant()
    for name in {dense.file, m.eval_data.file, m.calib_data.file}:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(family.root / name, folder / name)
    manifest = Manifest.model_validate({**m.model_dump(), "variants": [dense.model_dump()], "cuts": []})
    Family(manifest, folder).save()
    return load_family(folder)


def bench_task(family: Family, folder: Path, sparsities: list[float], n_eval: int, n_calib: int | None,
               say=print) -> dict:  # noqa: ANN001
    fam = dense_copy(family, folder)
    dense_path = fam.variant_path(fam.reference_variant().name)
    dense = load_model(dense_path)
    reference = None
    if fam.manifest.metric.name == "agreement":
        reference = run_batched(session(dense, name="dense"), fam.eval_feeds(n_eval)[0])[fam.manifest.output.name]
    t = time.perf_counter()
    dense_acc = measure_accuracy(fam, dense_path, reference=reference, limit=n_eval)
    dense_s = time.perf_counter() - t
    say(f"{family.task}: dense {dense_acc:.4f} ({dense_s:.1f} s)")
    weights = prunable_weights(dense)
    t = time.perf_counter()
    feeds = fam.calib_feeds(n_calib)
    cal = calibrate(dense, feeds, weights)
    calib_s = time.perf_counter() - t
    say(f"{family.task}: Wanda calibration on {cal.samples} samples, {len(cal.norms)} of {len(weights)} weights "
        f"scored from activations ({calib_s:.1f} s)")
    rows = []
    for s in sparsities:
        row: dict = {"task": family.task, "sparsity": s, "dense": dense_acc}
        for method in ("magnitude", "wanda"):
            t = time.perf_counter()
            pruned = prune_unstructured(dense, s) if method == "magnitude" else prune_wanda(dense, s, cal)
            path = save_model(pruned, folder / f"{method}-{round(s * 100)}.onnx")
            row[method] = measure_accuracy(fam, path, reference=reference, limit=n_eval, label=path.stem)
            row[f"{method}_sparsity"] = round(weight_sparsity(pruned), 4)
            row[f"{method}_seconds"] = round(time.perf_counter() - t, 2)
            path.unlink()
        say(f"{family.task} {s:.0%}: magnitude {row['magnitude']:.4f}, wanda {row['wanda']:.4f}")
        rows.append(row)
    return {"rows": rows, "calibration": {"samples": cal.samples, "seconds": round(calib_s, 2),
                                          "by_magnitude": dict(cal.magnitude), "weights": len(weights)},
            "metric": fam.manifest.metric.name, "eval_samples": len(next(iter(fam.eval_feeds(n_eval)[0].values()))),
            "dense_seconds": round(dense_s, 2)}


def table(result: dict) -> str:
    head = (f"{'task':<18}{'sparsity':>9}{'magnitude':>11}{'wanda':>9}{'dense':>9}{'reached m/w':>15}"
            f"{'seconds m/w':>15}")
    lines = [head, "-" * len(head)]
    for task, r in result["tasks"].items():
        for row in r["rows"]:
            lines.append(f"{task:<18}{row['sparsity']:>9.0%}{row['magnitude']:>11.2%}{row['wanda']:>9.2%}"
                         f"{row['dense']:>9.2%}{row['magnitude_sparsity']:>8.3f}/{row['wanda_sparsity']:.3f}"
                         f"{row['magnitude_seconds']:>9.1f}/{row['wanda_seconds']:.1f}")
        c = r["calibration"]
        lines.append(f"{'':<18}(metric {r['metric']}, {r['eval_samples']} eval samples; Wanda calibration "
                     f"{c['samples']} samples, {c['seconds']:.1f} s; {len(c['by_magnitude'])} of {c['weights']} "
                     "weights by magnitude)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default="edge", help="edge (default), embedded, or a zoo folder")
    ap.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], help="comma-separated (default: all)")
    ap.add_argument("--sparsities", type=_floats, default=[0.3, 0.5, 0.7], help="e.g. 30,50,70")
    ap.add_argument("--eval", type=int, default=300, help="evaluation samples per model")
    ap.add_argument("--calib", type=int, default=None, help="calibration samples (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads for scoring and calibration")
    ap.add_argument("--out", help="write the result as JSON here")
    a = ap.parse_args(argv)
    zoo, tasks = zoo_folder_and_tasks(a.zoo, a.tasks)
    result: dict = {"zoo": zoo_name(zoo), "machine": {"cpu": _cpu(), "python": platform.python_version()},
                    "sparsities": a.sparsities, "threads": a.threads, "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="bench_pruning-") as tmp, evaluation_threads(a.threads):
        for task in tasks:
            folder = Path(tmp) / task
            folder.mkdir()
            result["tasks"][task] = bench_task(load_family(zoo / task), folder, a.sparsities, a.eval, a.calib)
            shutil.rmtree(folder)
    print(table(result))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
