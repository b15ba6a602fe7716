"""The serving benchmark: the seven policies and two peers on the same seeded trace, real inference.

On the host device profile (onnxruntime pinned to core 0, OpenVINO pinned to core 1),
with the tasks of ``configs/serve.yaml``, in one process, one policy after another:

- **load** is a multiple of the capacity of the best static plan: the largest total
  rate (at the config's task mix) that the best single-variant policy (SV-*, one plan
  per task, processors assigned jointly) could sustain by the fluid bound, given the
  predicted block latencies. 0.5x, 1x and 1.5x by default;
- **slo**: ``loose`` uses the config's latency bounds, ``tight`` scales them by
  ``--tight`` (0.6 by default); floors as configured; the config's mid-run SLO changes
  are left out so that every cell serves one SLO;
- every policy serves the *same* arrivals and inputs (same seed) at each cell;
- **peers** (``loom.app.peers``): what a user would run instead, on the same trace and
  judged by the same records: ``ort-plain`` (each task's ``sv-lo-np`` variant as one
  default onnxruntime session, a thread per task) and ``openvino-throughput`` (the same
  variants on OpenVINO's CPU plugin, THROUGHPUT hint, f32, async infer queues).
  ``--no-peers`` leaves them out (they add about a quarter to the run time);
- ``goodput_bound_rps``: the fluid (LP) relaxation over every stitched plan meeting
  each task's SLO, capped by the offered rate: no policy can do better;
- ``measured_bound_rps``: MEASURED, not modelled: the closed-loop saturation throughput
  of the processors for sparseloom's planned mix at the cell (``loom.app.scenario.
  measured_bound``: client threads submitting back to back, no latency bound, for
  ``--bound-seconds``), with goodput as a share of it in ``ratios``;
- **drift**: sparseloom at 0.5x load (healthy before the contention, so that what the
  contention costs is what is measured), with a competing busy process pinned to the
  first processor's core for the middle third of the run, with the online latency
  correction and without it.

Writes ``{"runs": [...], "goodput_bound_rps": {...}, "measured_bound_rps": {...}, "ratios": {...},
"drift": {...}}``, a
table, and plots (violations by policy per cell, goodput, the latency CDF of the 1x
tight cell, the drift run's timeline). ``--zoo``: the zoo the config's tasks come from (the
edge zoo by default; ``embedded`` for ``configs/serve.yaml``), recorded as ``zoo``; the
script stops with one line if the config's tasks are not in it or have no profile data.

    python scripts/bench_serving.py --out out/bench_serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_check import zoo_config  # noqa: E402

from loom.app.config import POLICIES, SloConfig  # noqa: E402
from loom.app.deployment import Deployment  # noqa: E402
from loom.app.peers import PEERS, is_peer, run_peer  # noqa: E402
from loom.app.run import RunResult, run_trace  # noqa: E402
from loom.app.scenario import measured_bound, scenario, slos_of, static_capacity  # noqa: E402
from loom.core.progress import say  # noqa: E402
from loom.serving.plots import plot_latency_cdf, plot_timeline, plot_violations_by_policy  # noqa: E402
from placement.assignment import fluid_goodput_bound  # noqa: E402


def measured_capacity(dep: Deployment, base: SloConfig, policy: str, *, start_rps: float, mix: dict[str, float],
                      seed: int, max_violation: float = 0.10, duration_s: float = 4.0) -> tuple[float, list[dict]]:
    """The highest total rate (steps of x1.25) at which ``policy`` keeps violations <= ``max_violation``.

    The fluid bound counts block time and the measured dispatch and hand-off costs, but
    not the rest of a request's way through Python at high rates; on this 2-core host
    the runtime itself runs on the processors' cores, so the sustainable rate is found
    by running the policy, loose SLO, at rising rates.
    """
    steps, rate, best = [], start_rps, 0.0
    for _ in range(12):
        dep.config = scenario(base, total_rps=rate, mix=mix, bound_scale=1.0, duration_s=duration_s, seed=seed)
        run = run_trace(dep, policy, progress=False)
        v = run.summary["overall"]["slo_violation_rate"] or 0.0
        steps.append({"rate_rps": rate, "slo_violation_rate": v})
        say(f"capacity search, {policy} at {rate:.0f}/s: violations {v:.1%}")
        if v > max_violation:
            break
        best, rate = rate, rate * 1.25
    return best, steps


def row_of(run: RunResult, load: float, slo: str, offered: float) -> dict[str, Any]:
    o = run.summary["overall"]
    return {"load": load, "slo": slo, "policy": run.policy, "offered_rps": offered,
            "slo_violation_rate": o["slo_violation_rate"], "goodput_rps": o["goodput_rps"],
            "throughput_rps": o["throughput_rps"], "p50_ms": o["p50_ms"], "p99_ms": o["p99_ms"],
            "peak_rss_mb": run.peak_rss_mb, "n": o["n"], "utilization": run.summary["utilization"],
            "errors": run.errors, "by_task": {t: {"slo_violation_rate": v["slo_violation_rate"], "p99_ms": v["p99_ms"]}
                                              for t, v in run.summary["tasks"].items()}}


def busy_loop_on(core: int) -> subprocess.Popen:
    code = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def drift(dep: Deployment, base: SloConfig, *, total_rps: float, mix: dict[str, float], duration_s: float,
          seed: int, out: Path) -> dict[str, Any]:
    first = dep.device.processors[0]
    core = (first.cores or [0])[0]
    dep.config = scenario(base, total_rps=total_rps, mix=mix, bound_scale=1.0, duration_s=duration_s, seed=seed)
    lo, hi = duration_s / 3, 2 * duration_s / 3
    result = {"processor": first.name, "core": core, "window_s": [lo, hi], "runs": []}
    for corrected in (True, False):
        proc: list[subprocess.Popen] = []
        events = [(lo, lambda proc=proc: proc.append(busy_loop_on(core))),
                  (hi, lambda proc=proc: [p.kill() for p in proc])]
        try:
            run = run_trace(dep, "sparseloom", correction=corrected, events=events)
        finally:
            for p in proc:
                p.kill()
        inside = [r for r in run.records if lo <= r.arrival_s < hi]
        after = [r for r in run.records if r.arrival_s >= hi + 1.0]
        on_slow = [r for r in inside if r.placement and first.name in r.placement]

        def rate(rs: list) -> float | None:
            return sum(r.violated for r in rs) / len(rs) if rs else None

        result["runs"].append({
            "correction": corrected, "slo_violation_rate": run.summary["overall"]["slo_violation_rate"],
            "violation_rate_during_contention": rate(inside), "violation_rate_after": rate(after),
            "share_on_slowed_processor_during": len(on_slow) / len(inside) if inside else None,
            "goodput_rps": run.summary["overall"]["goodput_rps"],
        })
        if corrected:
            plot_timeline(run.records, out.with_name(out.stem + "_drift_timeline.png"), max_requests=400)
    on, off = result["runs"]
    if on["violation_rate_during_contention"] is not None and off["violation_rate_during_contention"]:
        result["violation_reduction_during_contention"] = 1 - on["violation_rate_during_contention"] / off["violation_rate_during_contention"]
    return result


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/serve.yaml")
    ap.add_argument("--out", default="out/bench_serving.json")
    ap.add_argument("--zoo", default="edge", help="the zoo of the config's tasks: edge (default), embedded, or a folder")
    ap.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1.0, 1.5])
    ap.add_argument("--tight", type=float, default=0.6, help="the tight SLO's bounds as a share of the config's")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per policy and cell")
    ap.add_argument("--policies", nargs="*", default=[*POLICIES, *PEERS],
                    help=f"policies of the runtime ({', '.join(POLICIES)}) and peers ({', '.join(PEERS)})")
    ap.add_argument("--no-peers", action="store_true", help="leave the peers out of --policies")
    ap.add_argument("--bound-seconds", type=float, default=3.0,
                    help="seconds of the measured (closed-loop) bound per cell; 0: none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drift-duration", type=float, default=18.0)
    ap.add_argument("--no-drift", action="store_true")
    ap.add_argument("--drift-load", type=float, default=0.5, help="the drift run's load, a multiple of the capacity")
    args = ap.parse_args(argv)
    cfg, zoo = zoo_config(args.config, args.zoo)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    dep = Deployment.from_config(cfg)
    base = dep.config
    mix = {t.name: dep.rates()[t.name] for t in base.tasks}
    fluid_capacity, who = static_capacity(dep, mix)
    start = sum(mix.values()) * 0.5
    capacity, steps = measured_capacity(dep, base, who, start_rps=start, mix=mix, seed=args.seed)
    if capacity <= 0:
        capacity = start
    say(f"capacity of the best static plan ({who}): {capacity:.0f} requests/s measured "
        f"(fluid bound {fluid_capacity:.0f}/s)")
    policies = [p for p in args.policies if not (args.no_peers and is_peer(p))]
    runs, bounds, measured, cdf_runs = [], {}, {}, {}
    t_start = time.perf_counter()
    for slo, scale in (("loose", 1.0), ("tight", args.tight)):
        for load in args.loads:
            total = load * capacity
            dep.config = scenario(base, total_rps=total, mix=mix, bound_scale=scale, duration_s=args.duration,
                                  seed=args.seed)
            cands = {t: dep.candidates("sparseloom")[t] for t in mix}
            fluid = fluid_goodput_bound(dep.spaces, slos_of(dep.config), rate_mix=mix, candidates=cands)
            bounds[f"{load}/{slo}"] = min(total, fluid)
            if args.bound_seconds > 0:
                mb = measured_bound(dep, "sparseloom", seconds=args.bound_seconds)
                measured[f"{load}/{slo}"] = mb["rps"]
                say(f"{slo} {load}x: measured bound (closed loop, sparseloom's mix) {mb['rps']:.0f} requests/s")
            for name in policies:
                run = (run_peer if is_peer(name) else run_trace)(dep, name)
                runs.append(row_of(run, load, slo, total))
                say(f"{slo} {load}x ({total:.0f}/s) {name}: violations {runs[-1]['slo_violation_rate']:.1%}, "
                    f"goodput {runs[-1]['goodput_rps']:.1f}/s")
                if load == 1.0 and slo == "tight":
                    cdf_runs[run.policy] = run.records
    serving_s = time.perf_counter() - t_start

    ratios: dict[str, Any] = {}
    for slo in ("loose", "tight"):
        for load in args.loads:
            cell = {r["policy"]: r for r in runs if r["load"] == load and r["slo"] == slo}
            sl = cell.get("sparseloom")
            if not sl:
                continue
            key = f"{load}/{slo}"
            ratios[key] = {
                "violation_reduction_vs": {p: (1 - sl["slo_violation_rate"] / r["slo_violation_rate"])
                                           if r["slo_violation_rate"] else None for p, r in cell.items() if p != "sparseloom"},
                "goodput_ratio_vs": {p: ratio(sl["goodput_rps"], r["goodput_rps"]) for p, r in cell.items() if p != "sparseloom"},
                "goodput_share_of_bound": ratio(sl["goodput_rps"], bounds[key]),
                "goodput_share_of_measured_bound": {p: ratio(r["goodput_rps"], measured.get(key))
                                                    for p, r in cell.items()},
            }
    result: dict[str, Any] = {
        "zoo": zoo, "runs": runs, "goodput_bound_rps": bounds, "measured_bound_rps": measured, "ratios": ratios,
        "settings": {"config": args.config, "capacity_rps": capacity, "capacity_policy": who, "mix": mix,
                     "capacity_fluid_rps": fluid_capacity, "capacity_search": steps,
                     "loads": args.loads, "tight_scale": args.tight, "duration_s": args.duration, "seed": args.seed,
                     "cpus": os.cpu_count(), "serving_wall_s": serving_s},
        "simulated": False,
    }
    if not args.no_drift:
        result["drift"] = drift(dep, base, total_rps=args.drift_load * capacity, mix=mix, duration_s=args.drift_duration,
                                seed=args.seed, out=out)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    print(f"{'cell':<11} {'policy':<19} {'viol':>7} {'goodput':>8} {'thru':>7} {'p99 ms':>8} {'RSS MB':>7}")
    for r in runs:
        print(f"{str(r['load']) + '/' + r['slo']:<11} {r['policy']:<19} {r['slo_violation_rate']:>7.1%} "
              f"{r['goodput_rps']:>8.1f} {r['throughput_rps']:>7.1f} {(r['p99_ms'] or float('nan')):>8.2f} {r['peak_rss_mb']:>7.0f}")
    for key, rt in ratios.items():
        red = ", ".join(f"{p} {v:+.0%}" for p, v in rt["violation_reduction_vs"].items() if v is not None)
        gp = ", ".join(f"{p} {v:.2f}x" for p, v in rt["goodput_ratio_vs"].items() if v is not None)
        share = rt["goodput_share_of_bound"]
        print(f"{key}: violations down vs {red}; goodput vs {gp}; "
              f"{'-' if share is None else f'{share:.0%}'} of the fluid bound {bounds[key]:.1f}/s")
        if key in measured:
            shares = ", ".join(f"{p} {v:.0%}" for p, v in rt["goodput_share_of_measured_bound"].items() if v is not None)
            print(f"{key}: measured bound (closed loop) {measured[key]:.0f}/s; goodput as a share of it: {shares}")
    if "drift" in result:
        for r in result["drift"]["runs"]:
            print(f"drift, correction {'on ' if r['correction'] else 'off'}: violations {r['slo_violation_rate']:.1%} "
                  f"overall, {r['violation_rate_during_contention']:.1%} during contention, "
                  f"{r['share_on_slowed_processor_during']:.0%} of requests on the slowed processor")
    rows = [{**r, "group": f"{r['load']}x {r['slo']}"} for r in runs]
    plot_violations_by_policy(rows, out.with_name(out.stem + "_violations.png"))
    if cdf_runs:
        plot_latency_cdf(cdf_runs, out.with_name(out.stem + "_latency_cdf.png"), normalized=True)
    print(f"wrote {out} and plots beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
