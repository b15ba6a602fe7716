"""The serving benchmark: the seven policies and two peers on the same seeded traces, real inference, repeated.

On the host device profile (onnxruntime pinned to core 0, OpenVINO pinned to core 1),
with the tasks of ``configs/serve.yaml``, in one process, one policy after another:

- **load** is a multiple of the capacity of the best static plan: the highest total
  rate (at the config's task mix) at which the best single-variant policy (SV-*, one
  plan per task, processors assigned jointly; the best by the fluid bound) keeps its
  violations <= 10%, loose SLO, measured in steps of x1.25 (``loom.app.capacity``).
  0.5x, 1x, 1.5x and 3x by default;
- **slo**: ``loose`` uses the config's latency bounds, ``tight`` scales them by
  ``--tight`` (0.6 by default); floors as configured; the config's mid-run SLO changes
  are left out so that every cell serves one SLO;
- two more cells (``--no-extra-cells`` leaves them out), both at 1x load, loose SLO:
  ``bursty`` (every task's arrivals bursty, ``BurstyArrival`` with fixed periods at the
  same mean rate: bursts of 4x the calm rate for a fifth of every 2.5 s, all tasks
  together; shorter periods in runs under 5 s) and ``slo-change`` (every task's latency
  bound tightened to 0.6x at the middle of the run, ``SloChange``);
- **repeats**: every cell is run ``--repeats`` times (3 by default); repeat r serves the
  trace of seed ``--seed + r``, and within a repeat every policy serves the *same*
  arrivals and inputs;
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
  ``--bound-seconds``), the median over the repeats, with every policy's median goodput
  as a share of it in ``ratios``;
- ``capacity_rps``: for every policy and peer, the highest total rate with <= 10%
  violations, loose SLO: from the best static plan's capacity, x1.5 steps up (or down)
  until a probe passes and one fails, then 3 bisections, ``--capacity-duration`` seconds
  per probe (``--no-capacity``: none);
- ``overhead_us``: the runtime's own CPU per request by component (decision, submit,
  hand-off, block wrapper, completion; ``scripts/bench_overhead.py``), from one metered run
  of sparseloom and sv-lo-np at 1.0x, loose (``--no-overhead``: none);
- **drift**: sparseloom at 0.5x load (healthy before the contention, so that what the
  contention costs is what is measured), with a competing busy process pinned to the
  first processor's core for the middle third of the run, with the online latency
  correction and without it.

Writes ``{"repeats": N, "runs": [one row per cell, repeat and policy], "cells": {cell: {policy:
{"slo_violation_rate": {"median", "min", "max"}, "goodput_rps": {...}, ...}}}, "goodput_bound_rps",
"measured_bound_rps", "ratios" (on the medians), "capacity_rps": {policy: rps}, "drift"}``, a
table (median [min–max] over the repeats), and plots (median violations by policy per cell, the
latency CDF of the 1x tight cell's first repeat, the drift run's timeline). ``--zoo``: the zoo
the config's tasks come from (the edge zoo by default; ``embedded`` for ``configs/serve.yaml``),
recorded as ``zoo``; the script stops with one line if the config's tasks are not in it or have
no profile data. ``--quick``: a smoke run (1 repeat, 1x load, 1 s runs, no drift, short probes).

    python scripts/bench_serving.py --out out/bench_serving.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import overhead_us  # noqa: E402
from serving_report import median, print_report, ratios_of, row_of, summarize_cells  # noqa: E402
from zoo_check import zoo_config  # noqa: E402

from loom.app.capacity import measured_capacity  # noqa: E402
from loom.app.config import POLICIES, SloConfig  # noqa: E402
from loom.app.deployment import Deployment  # noqa: E402
from loom.app.peers import PEERS, is_peer, run_peer  # noqa: E402
from loom.app.run import run_trace  # noqa: E402
from loom.app.scenario import (  # noqa: E402
    measured_bound,
    scenario,
    slos_of,
    static_capacity,
    with_bursts,
    with_slo_tightened,
)
from loom.core.progress import say  # noqa: E402
from loom.serving.plots import plot_latency_cdf, plot_timeline, plot_violations_by_policy  # noqa: E402
from placement.assignment import fluid_goodput_bound  # noqa: E402

#: the bursty cell: a burst's rate as a multiple of the calm rate, and the burst's share of a period
BURST_FACTOR, BURST_SHARE, BURST_PERIOD_S = 4.0, 0.2, 2.5
#: the slo-change cell: the latency bounds from the middle of the run on, as a share of the config's
SLO_CHANGE_SCALE = 0.6
#: --quick: a smoke run (explicit flags still win)
QUICK = {"repeats": 1, "loads": [1.0], "duration": 1.0, "bound_seconds": 0.5, "no_drift": True,
         "capacity_duration": 1.0, "capacity_probes": 3}


class Cell(NamedTuple):
    name: str
    load: float
    slo: str
    bound_scale: float
    kind: str = "plain"  # plain, bursty or slo-change


def cells_of(args: argparse.Namespace) -> list[Cell]:
    cells = [Cell(f"{load}/{slo}", load, slo, scale)
             for slo, scale in (("loose", 1.0), ("tight", args.tight)) for load in args.loads]
    if not args.no_extra_cells:
        cells += [Cell("bursty", 1.0, "loose", 1.0, "bursty"), Cell("slo-change", 1.0, "loose", 1.0, "slo-change")]
    return cells


def cell_config(base: SloConfig, cell: Cell, *, capacity: float, mix: dict[str, float], duration_s: float,
                seed: int) -> SloConfig:
    cfg = scenario(base, total_rps=cell.load * capacity, mix=mix, bound_scale=cell.bound_scale,
                   duration_s=duration_s, seed=seed)
    if cell.kind == "bursty":
        period = min(BURST_PERIOD_S, duration_s / 2)  # at least two bursts in a short run
        cfg = with_bursts(cfg, factor=BURST_FACTOR, burst_s=BURST_SHARE * period, calm_s=(1 - BURST_SHARE) * period)
    elif cell.kind == "slo-change":
        cfg = with_slo_tightened(cfg, at_s=duration_s / 2, scale=SLO_CHANGE_SCALE)
    return cfg


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


def settle(seconds: float = 0.5) -> None:
    """Between two measured runs: the last one's garbage collected, its threads wound down."""
    gc.collect()
    time.sleep(seconds)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/serve.yaml")
    ap.add_argument("--out", default="out/bench_serving.json")
    ap.add_argument("--zoo", default="edge", help="the zoo of the config's tasks: edge (default), embedded, or a folder")
    ap.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1.0, 1.5, 3.0])
    ap.add_argument("--tight", type=float, default=0.6, help="the tight SLO's bounds as a share of the config's")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per policy, cell and repeat")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; repeat r uses the trace of seed --seed + r")
    ap.add_argument("--no-extra-cells", action="store_true", help="leave out the bursty and slo-change cells")
    ap.add_argument("--policies", nargs="*", default=[*POLICIES, *PEERS],
                    help=f"policies of the runtime ({', '.join(POLICIES)}) and peers ({', '.join(PEERS)})")
    ap.add_argument("--no-peers", action="store_true", help="leave the peers out of --policies")
    ap.add_argument("--bound-seconds", type=float, default=3.0,
                    help="seconds of the measured (closed-loop) bound per cell and repeat; 0: none")
    ap.add_argument("--capacity-duration", type=float, default=4.0, help="seconds per probe of a capacity search")
    ap.add_argument("--capacity-probes", type=int, default=12, help="at most this many probes per capacity search")
    ap.add_argument("--no-capacity", action="store_true", help="no capacity search per policy (capacity_rps)")
    ap.add_argument("--no-overhead", action="store_true",
                    help="no metered run (overhead_us: the runtime's CPU per request, by component)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drift-duration", type=float, default=18.0)
    ap.add_argument("--no-drift", action="store_true")
    ap.add_argument("--drift-load", type=float, default=0.5, help="the drift run's load, a multiple of the capacity")
    ap.add_argument("--quick", action="store_true", help="a smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    argv = sys.argv[1:] if argv is None else argv
    if "--quick" in argv:
        ap.set_defaults(**QUICK)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg, zoo = zoo_config(args.config, args.zoo)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    dep = Deployment.from_config(cfg)
    base = dep.config
    mix = {t.name: dep.rates()[t.name] for t in base.tasks}
    fluid_capacity, who = static_capacity(dep, mix)
    start = sum(mix.values()) * 0.5
    # a discarded run first: the first serving in a process is slower (engines' first calls,
    # caches), and a first probe that fails on that alone would set the loads' unit too low
    dep.config = scenario(base, total_rps=start, mix=mix, bound_scale=1.0, duration_s=min(2.0, args.duration),
                          seed=args.seed)
    run_trace(dep, who, progress=False)
    # the best static plan's capacity, the loads' unit: x1.25 steps from half the config's rate
    # (down too, when even that misses: the unit is a rate the plan sustains)
    capacity, steps = measured_capacity(dep, base, who, start_rps=start, mix=mix, seed=args.seed,
                                        duration_s=args.capacity_duration, growth=1.25, bisections=0,
                                        max_probes=args.capacity_probes, down=True)
    if capacity <= 0:
        capacity = start
    say(f"capacity of the best static plan ({who}): {capacity:.0f} requests/s measured "
        f"(fluid bound {fluid_capacity:.0f}/s)")
    policies = [p for p in args.policies if not (args.no_peers and is_peer(p))]
    cells = cells_of(args)
    runs, bounds, measured_runs, cdf_runs = [], {}, {}, {}
    t_start = time.perf_counter()
    for repeat in range(args.repeats):
        seed = args.seed + repeat
        for cell in cells:
            total = cell.load * capacity
            dep.config = cell_config(base, cell, capacity=capacity, mix=mix, duration_s=args.duration, seed=seed)
            if cell.name not in bounds:  # the fluid bound depends on the rates and SLOs, not on the seed
                cands = {t: dep.candidates("sparseloom")[t] for t in mix}
                fluid = fluid_goodput_bound(dep.spaces, slos_of(dep.config), rate_mix=mix, candidates=cands)
                bounds[cell.name] = min(total, fluid)
            if args.bound_seconds > 0:
                mb = measured_bound(dep, "sparseloom", seconds=args.bound_seconds)
                measured_runs.setdefault(cell.name, []).append(mb["rps"])
                say(f"{cell.name} (repeat {repeat}): measured bound (closed loop, sparseloom's mix) "
                    f"{mb['rps']:.0f} requests/s")
            # each repeat in another order (a position effect, e.g. following the bound's
            # saturation run, falls on every policy in turn), each run after a settle
            for name in policies[repeat % len(policies):] + policies[:repeat % len(policies)]:
                settle()
                run = (run_peer if is_peer(name) else run_trace)(dep, name)
                runs.append(row_of(run, cell=cell.name, load=cell.load, slo=cell.slo, offered=total, repeat=repeat))
                v = runs[-1]["slo_violation_rate"]
                say(f"{cell.name} ({total:.0f}/s, repeat {repeat}) {name}: violations "
                    f"{'-' if v is None else f'{v:.1%}'}, goodput {runs[-1]['goodput_rps']:.1f}/s")
                if cell.name == "1.0/tight" and repeat == 0:
                    cdf_runs[run.policy] = run.records
    serving_s = time.perf_counter() - t_start

    capacities, capacity_steps = {}, {}
    if not args.no_capacity:
        for name in policies:
            capacities[name], capacity_steps[name] = measured_capacity(
                dep, base, name, start_rps=capacity, mix=mix, seed=args.seed, duration_s=args.capacity_duration,
                growth=1.5, bisections=3, max_probes=args.capacity_probes)

    overhead: dict[str, Any] = {}
    if not args.no_overhead:  # a run of its own, meter on: the other runs pay nothing for it
        dep.config = scenario(base, total_rps=capacity, mix=mix, bound_scale=1.0, duration_s=args.duration,
                              seed=args.seed)
        for name in ("sparseloom", "sv-lo-np"):
            overhead[name] = overhead_us(dep, name)
            say(f"overhead (1.0/loose, meter on) {name}: " + ", ".join(
                f"{k} {v:.0f} us" for k, v in overhead[name].items() if v is not None))

    summary = summarize_cells(runs)
    measured = {c: median(v) for c, v in measured_runs.items()}
    result: dict[str, Any] = {
        "zoo": zoo, "repeats": args.repeats, "runs": runs, "cells": summary, "goodput_bound_rps": bounds,
        "measured_bound_rps": measured, "measured_bound_by_repeat": measured_runs,
        "ratios": ratios_of(summary, bounds, measured), "capacity_rps": capacities,
        "overhead_us": overhead.get("sparseloom", {}), "overhead_us_by_policy": overhead,
        "settings": {"config": args.config, "capacity_rps": capacity, "capacity_policy": who, "mix": mix,
                     "capacity_fluid_rps": fluid_capacity, "capacity_search": steps,
                     "policy_capacity_search": capacity_steps, "capacity_probe_s": args.capacity_duration,
                     "cells": [c._asdict() for c in cells], "loads": args.loads, "tight_scale": args.tight,
                     "bursty": {"factor": BURST_FACTOR, "burst_share": BURST_SHARE,
                                "period_s": min(BURST_PERIOD_S, args.duration / 2), "periods": "fixed"},
                     "slo_change": {"at_s": args.duration / 2, "latency_scale": SLO_CHANGE_SCALE},
                     "duration_s": args.duration, "seed": args.seed, "seeds": [args.seed + r for r in range(args.repeats)],
                     "cpus": os.cpu_count(), "serving_wall_s": serving_s},
        "simulated": False,
    }
    if not args.no_drift:
        result["drift"] = drift(dep, base, total_rps=args.drift_load * capacity, mix=mix, duration_s=args.drift_duration,
                                seed=args.seed, out=out)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    print_report(result)
    for name, o in overhead.items():
        print(f"runtime CPU per unit, {name} (1.0/loose, metered run): "
              + ", ".join(f"{k} {v:.0f} us" for k, v in o.items() if v is not None))
    rows = [{"policy": pol, "slo_violation_rate": s["slo_violation_rate"]["median"], "group": key}
            for key, cell in summary.items() for pol, s in cell.items()]
    plot_violations_by_policy(rows, out.with_name(out.stem + "_violations.png"))
    if cdf_runs:
        plot_latency_cdf(cdf_runs, out.with_name(out.stem + "_latency_cdf.png"), normalized=True)
    print(f"wrote {out} and plots beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
