"""``loom``: a thin command-line shell over ``loom.api``.

Every command maps to one API function; errors sparseloom raises on purpose
(``LoomError``) are printed as one clear message with exit status 2, anything else
is a bug and keeps its traceback. ``loom.api`` loads each name on first use, so
``loom --help`` imports nothing heavy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import loom.api as api

DEFAULT_SLO_CONFIG = "configs/serve.yaml"
#: what ``add_subparsers`` returns: each command's parser is added to it
Commands = argparse._SubParsersAction


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return [v / 100 if v > 1 else v for v in values]


def _cuts(text: str) -> list[list[str]]:
    """'a;b,c' -> [['a'], ['b', 'c']]: cuts separated by ';', tensors of one cut by ','."""
    return [[t.strip() for t in cut.split(",") if t.strip()] for cut in text.split(";") if cut.strip()]


# -- making models: variants, partitions, stitched configs ------------------------------------------
def cmd_variants_init(a: argparse.Namespace) -> int:
    fam = api.init_family(a.dense, a.out, task=a.task, num_classes=a.num_classes, eval_file=a.eval,
                          calib_file=a.calib, metric=a.metric, description=a.description)
    print(f"wrote {fam.path} (dense accuracy {fam.variant('dense').accuracy:.4f})")
    return 0


def cmd_variants_make(a: argparse.Namespace) -> int:
    fam = api.make_variants(a.family, unstructured=a.unstructured or [], structured=a.structured or [],
                            int8=a.int8, fp16=a.fp16, source=a.source, pruner=a.pruner, progress=api.say)
    _print_variants(fam)
    return 0


def cmd_variants_list(a: argparse.Namespace) -> int:
    _print_variants(api.load_family(a.family))
    return 0


def _print_variants(fam: api.Family) -> None:
    print(f"{fam.task} ({fam.path}), metric {fam.manifest.metric.name}")
    print(f"{'variant':<24}{'kind':<14}{'sparsity':>9}{'precision':>10}{'accuracy':>10}{'size KB':>10}")
    for v in fam.variants:
        acc = f"{100 * v.accuracy:.2f}%" if v.accuracy is not None else "-"
        size = f"{(v.size_bytes or 0) / 1024:.0f}"
        print(f"{v.name:<24}{v.kind:<14}{v.sparsity:>9.2f}{v.precision:>10}{acc:>10}{size:>10}")


def cmd_partition(a: argparse.Namespace) -> int:
    fam = api.load_family(a.family)
    if a.candidates:
        report = api.align(fam, max_tensors=a.max_tensors)
        print(f"{len(report.aligned)} aligned cut(s) of {len(report.candidates)} candidate(s) in {fam.task}:")
        for c in report.aligned:
            print(f"  {c.macs_before:6.1%} of MACs before  {list(c.tensors)}")
        for r in report.refusals:
            print(f"  refused {r.tensors} in {r.variant}: {r.reason}")
        return 0
    out = Path(a.out) if a.out else Path("out/partitions") / fam.task
    p = api.partition_family(fam, out, k=a.k, cuts=_cuts(a.cuts) if a.cuts else None,
                             max_tensors=a.max_tensors, update_manifest=a.update_manifest, progress=api.say)
    print(f"{fam.task}: K={p.k}, cuts {p.cuts}")
    print(f"slot shares of MACs: {[round(s, 3) for s in p.slot_macs_share]}; {len(p.blocks)} distinct blocks")
    for name, r in p.verification.items():
        print(f"  {name:<24} chain vs variant: max |diff| {r['max_abs_diff']:.2e} (tolerance {r['tolerance']:g})")
    print(f"wrote {out / 'partition.yaml'}")
    return 0


def cmd_stitch(a: argparse.Namespace) -> int:
    p = api.load_partition(a.partition)
    config = [v.strip() for v in a.config.split(",")]
    if len(config) == 1:
        config = config * p.k
    result = {"config": config, "accuracy": api.evaluate_config(p, config, merged=not a.chained)}
    if a.merged_out:
        api.save_model(api.merge_config(p, config), a.merged_out)
        result["merged_model"] = a.merged_out
    print(json.dumps(result, indent=1))
    return 0


def cmd_backends(a: argparse.Namespace) -> int:
    for name, (ok, why) in api.available_backends().items():
        print(f"{name:<14} {'available' if ok else 'unavailable'}  {why}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    api.run_demo(a.zoo, a.out, k=a.k, tasks=a.tasks, max_configs=a.max_configs, sample=a.sample, repeats=a.repeats,
                 seed=a.seed, eval_limit=a.eval_limit)
    return 0


# -- profiling and fitting ------------------------------------------------------------------------
def _families(a: argparse.Namespace) -> list[api.Family]:
    if getattr(a, "family", None):
        return [api.load_family(f) for f in a.family]
    zoo = api.resolve_zoo(getattr(a, "zoo", None))
    return [api.load_family(zoo / t) for t in api.zoo_tasks(zoo)]


def cmd_profile(a: argparse.Namespace) -> int:
    device = api.load_device_profile(a.device)
    if a.partition:  # partitions made before (on another machine, for --remote): no family is re-cut
        partitions = [api.load_partition(p) for p in a.partition]
    else:
        partitions = api.ensure_partitions(_families(a), a.partitions, k=a.k)
    out = Path(a.out) if a.out else Path("profiles/data") / device.name
    if a.remote:
        data = api.remote_profile(partitions, a.device, out, a.remote, python=a.remote_python, warmup=a.warmup,
                                  repeats=a.repeats, config_samples=a.config_samples, seed=a.seed,
                                  resume=not a.no_resume, allow_mixed=a.allow_mixed, processors=a.processor,
                                  keep_remote=a.keep_remote, timeout=a.remote_timeout)
    else:
        data = api.profile_device(partitions, device, out, warmup=a.warmup, repeats=a.repeats,
                                  config_samples=a.config_samples, seed=a.seed, resume=not a.no_resume,
                                  allow_mixed=a.allow_mixed, processors=a.processor)
    print(api.profile_summary(data))
    print(f"wrote {out / 'blocks.csv'}, {out / 'configs.csv'} and {out / 'meta.json'}")
    return 0


def cmd_fit(a: argparse.Namespace) -> int:
    device = api.load_device_profile(a.device)
    data = api.load_profile_dataset(a.data or Path("profiles/data") / device.name)
    partitions = api.ensure_partitions(_families(a), a.partitions, k=a.k)
    est = api.fit_estimates(partitions, data, device, samples=a.samples, strategy=a.strategy, seed=a.seed,
                            progress=api.say)
    out = Path(a.out) if a.out else Path("out/estimates") / device.name
    est.save(out)
    for task, n in est.notes["accuracy"].items():
        print(f"{task}: accuracy estimator from {n['measured_configs']} measured stitched configs of "
              f"{n['space']} ({n['strategy']}, {n['seconds']:.1f} s)")
    print(f"latency estimator from {est.notes['latency']['train_rows']} measured (block, processor) pairs")
    print(f"wrote {out}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    est = api.Estimates.load(a.estimates)
    results = []
    for config in a.config:
        placement = a.placement.split(",")
        results.append(est.predict(a.task, config.split(","), placement))
    if a.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=1))
        return 0
    for r in results:
        parts = " + ".join(f"{ms:.3f}" for ms in r["block_ms"])
        hops = sum(r["transfer_ms"])
        src = "measured" if r["accuracy_measured"] else "predicted"
        print(f"{r['task']} {','.join(r['config'])} on {','.join(r['placement'])}: "
              f"{r['latency_ms']:.3f} ms (blocks {parts}, hand-offs {hops:.3f}, dispatch {r['dispatch_ms']:.3f}); "
              f"accuracy {100 * r['accuracy']:.2f}% ({src})")
    return 0


# -- planning, serving, benchmarking --------------------------------------------------------------
def cmd_plan(a: argparse.Namespace) -> int:
    out = api.describe_plans(a.config, policy=a.policy, limit=a.limit)
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"policy {out['policy']} on {out['device']}; predicted utilization at the configured rates: "
          + ", ".join(f"{p} {u:.0%}" for p, u in out["predicted_utilization"].items()))
    for task, t in out["tasks"].items():
        print(f"{task}: bound {t['latency_ms']} ms, floor {t['accuracy_floor']:.3f}, {t['n_candidates']} candidate plans")
        for p in t["plans"]:
            print(f"  {','.join(p['config']):<48} on {','.join(p['placement']):<26} {p['latency_ms']:7.3f} ms  "
                  f"{100 * p['accuracy']:6.2f}%  {p['memory_mb']:6.2f} MB  share {p['share']:.0%}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    report = api.serve(a.config, out_dir=a.out, policy=a.policy, duration_s=a.duration)
    print(api.format_rows([report["result"]]))
    for task, t in report["summary"]["tasks"].items():
        rate = t["slo_violation_rate"]
        print(f"  {task:<12} n={t['n']:<6} violations {rate if rate is None else f'{rate:.1%}'}  "
              f"p99 {t['p99_ms'] if t['p99_ms'] is None else round(t['p99_ms'], 2)} ms")
    print(f"wrote {a.out}/report.json, {a.out}/trace-{report['policy']}.jsonl and a timeline plot")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    report = api.bench(a.config, out_dir=a.out, policies=a.policy or list(api.POLICIES), duration_s=a.duration,
                       simulate=a.simulate, device=a.device, load=a.load)
    if report["simulated"]:
        print(f"SIMULATED, not measured: {report['source']}")
    print(api.format_rows(report["runs"]))
    print(f"wrote {a.out}/report.json and plots (violations.png, latency_cdf.png, timeline-*.png)")
    return 0


# -- the parser: one helper per command, in the order ``loom --help`` lists them --------------------
def _variants_parser(sub: Commands) -> None:
    v = sub.add_parser("variants", help="make and list a family's variants").add_subparsers(dest="sub", required=True)
    p = v.add_parser("init", help="start a family from one dense ONNX and its data")
    p.add_argument("dense")
    p.add_argument("--out", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--eval", default="eval.npz", help=".npz with x and y, relative to --out")
    p.add_argument("--calib", default="calib.npz", help=".npz with x, relative to --out")
    p.add_argument("--metric", choices=["top1", "agreement"], default="top1")
    p.add_argument("--description", default="")
    p.set_defaults(fn=cmd_variants_init)
    p = v.add_parser("make", help="add post-training variants (no retraining)")
    p.add_argument("family")
    p.add_argument("--unstructured", type=_floats, help="sparsities, e.g. 0.5,0.8 (or 50,80)")
    p.add_argument("--structured", type=_floats, help="channel shares to remove inside blocks")
    p.add_argument("--int8", action="store_true")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--source", default="dense")
    p.add_argument("--pruner", choices=["wanda", "magnitude"],
                   help="how --unstructured chooses weights: wanda (|W|*||X|| on the calibration data) or "
                        "magnitude; default: wanda when the family has calibration samples, else magnitude")
    p.set_defaults(fn=cmd_variants_make)
    p = v.add_parser("list")
    p.add_argument("family")
    p.set_defaults(fn=cmd_variants_list)


def _partition_parser(sub: Commands) -> None:
    p = sub.add_parser("partition", help="find aligned cuts, cut every variant into K slots")
    p.add_argument("family")
    p.add_argument("-k", "--k", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--cuts", help="explicit cuts: 'a;b' (tensors of one cut joined by ',')")
    p.add_argument("--max-tensors", type=int, default=2)
    p.add_argument("--candidates", action="store_true", help="only list aligned and refused cuts")
    p.add_argument("--update-manifest", action="store_true", help="record the aligned cuts in family.yaml")
    p.set_defaults(fn=cmd_partition)


def _stitch_parser(sub: Commands) -> None:
    p = sub.add_parser("stitch", help="measure (and optionally merge) one stitched config")
    p.add_argument("partition")
    p.add_argument("--config", required=True, help="one variant per slot, e.g. int8,dense,unstructured-80")
    p.add_argument("--chained", action="store_true", help="run as a chain of blocks instead of merged")
    p.add_argument("--merged-out", help="write the merged ONNX model here")
    p.set_defaults(fn=cmd_stitch)


def _backends_parser(sub: Commands) -> None:
    p = sub.add_parser("backends", help="which backends can run here")
    p.set_defaults(fn=cmd_backends)


def _device_and_families(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """``--device``, then ``--zoo`` | ``--family`` (``profile`` adds ``--partition`` to the group)."""
    p.add_argument("--device", default="host", help="a profile name under profiles/ (host) or a YAML path")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--zoo", help="every family of this zoo (default: the embedded zoo)")
    src.add_argument("--family", action="append", help="a family folder or family.yaml (repeatable)")
    return src


def _profile_parser(sub: Commands) -> None:
    p = sub.add_parser("profile", help="measure every block on a device's processors, and a sample of placed configs")
    _device_and_families(p).add_argument(
        "--partition", action="append", help="an existing partition folder or partition.yaml, profiled as it is (repeatable)")
    p.add_argument("-k", "--k", type=int, default=3)
    p.add_argument("--out", help="dataset folder (default profiles/data/<device>)")
    p.add_argument("--partitions", default="out/partitions",
                   help="where partitions are found, or made, as <dir>/<task> (keep it out of git: blocks are large)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--config-samples", type=int, default=20, help="random configs x placements per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processor", action="append", help="profile only this processor of the device (repeatable)")
    p.add_argument("--allow-mixed", action="store_true", help="add rows measured on other hardware or software")
    p.add_argument("--no-resume", action="store_true", help="start the dataset over (deletes its rows)")
    p.add_argument("--remote", metavar="URL",
                   help="profile on another machine: ssh://[user@]host[:port]/path or adb://[SERIAL]/path "
                        "(blocks, data, device profile and sparseloom's source are sent to path/loomjob; "
                        "the target needs sparseloom's dependencies); the dataset comes back to --out")
    p.add_argument("--remote-python", default="python3",
                   help="the target's Python that has sparseloom's dependencies (default python3)")
    p.add_argument("--remote-timeout", type=float, help="seconds the profiling may take on the target")
    p.add_argument("--keep-remote", action="store_true", help="leave the job folder on the target")
    p.set_defaults(fn=cmd_profile)


def _fit_parser(sub: Commands) -> None:
    p = sub.add_parser("fit", help="fit the latency and accuracy estimators from a profile dataset and a few measured configs")
    _device_and_families(p)
    p.add_argument("-k", "--k", type=int, default=3)
    p.add_argument("--data", help="profile dataset folder (default profiles/data/<device>)")
    p.add_argument("--partitions", default="out/partitions")
    p.add_argument("--samples", type=int, help="stitched configs measured per task (default: 5%% of the space, at most 50)")
    p.add_argument("--strategy", choices=["active", "stratified", "random"], default="active",
                   help="how the configs to measure are chosen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="estimates folder (default out/estimates/<device>)")
    p.set_defaults(fn=cmd_fit)


def _predict_parser(sub: Commands) -> None:
    p = sub.add_parser("predict", help="predicted latency and accuracy of a config on a placement")
    p.add_argument("--estimates", default="out/estimates/host", help="a folder written by `loom fit`")
    p.add_argument("--task", required=True)
    p.add_argument("--config", required=True, action="append",
                   help="one variant per slot, e.g. int8,dense,unstructured-80 (repeatable)")
    p.add_argument("--placement", required=True,
                   help="one processor per slot, e.g. cpu0-ort,cpu1-ov,cpu1-ov (one name: every slot there)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_predict)


def _plan_parser(sub: Commands) -> None:
    p = sub.add_parser("plan", help="each task's candidate plans under an SLO config, with predicted figures")
    p.add_argument("config", nargs="?", default=DEFAULT_SLO_CONFIG)
    p.add_argument("--policy", help="override the config's policy")
    p.add_argument("--limit", type=int, default=8, help="plans shown per task")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plan)


def _serve_parser(sub: Commands) -> None:
    p = sub.add_parser("serve", help="serve an SLO config's trace for its duration, with a report")
    p.add_argument("config", nargs="?", default=DEFAULT_SLO_CONFIG)
    p.add_argument("--policy", help="override the config's policy")
    p.add_argument("--duration", type=float, help="seconds (default: the config's run.duration_s)")
    p.add_argument("--out", default="out/serve")
    p.set_defaults(fn=cmd_serve)


def _bench_parser(sub: Commands) -> None:
    p = sub.add_parser("bench", help="every policy on the same seeded trace of an SLO config")
    p.add_argument("config", nargs="?", default=DEFAULT_SLO_CONFIG)
    p.add_argument("--policy", action="append", help="only these policies (repeatable)")
    p.add_argument("--duration", type=float, help="seconds per policy (default: the config's run.duration_s)")
    p.add_argument("--out", default="out/bench")
    p.add_argument("--simulate", action="store_true",
                   help="run the discrete-event simulator (same scheduler and optimizer) instead of real inference")
    p.add_argument("--device", help="simulate on this device profile (a name under profiles/ or a YAML path); "
                                    "implies --simulate")
    p.add_argument("--load", type=float,
                   help="scale the config's rates to this multiple of the best static plan's capacity on the device")
    p.set_defaults(fn=cmd_bench)


def _demo_parser(sub: Commands) -> None:
    p = sub.add_parser("demo", help="the main job on the edge zoo (--zoo embedded: the toy zoo)")
    p.add_argument("--zoo", default="edge", help="edge (default), embedded, or a zoo folder")
    p.add_argument("--out", default="out/demo")
    p.add_argument("-k", "--k", type=int, default=3)
    p.add_argument("--tasks", nargs="*")
    p.add_argument("--max-configs", type=int, default=512, help="measure every config up to this many")
    p.add_argument("--sample", type=int, default=120, help="else a seeded sample of this many, originals included")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, help="score accuracy on the first N held-out samples of each task")
    p.set_defaults(fn=cmd_demo)


COMMANDS: tuple[Callable[[Commands], None], ...] = (
    _variants_parser, _partition_parser, _stitch_parser, _backends_parser, _profile_parser, _fit_parser,
    _predict_parser, _plan_parser, _serve_parser, _bench_parser, _demo_parser,
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loom", description="sparseloom: stitched multi-DNN serving on edge SoCs")
    sub = ap.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except api.LoomError as exc:
        print(f"loom: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
