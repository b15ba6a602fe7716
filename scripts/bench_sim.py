"""The simulator against the real runtime, and the simulator's speed.

On the host device profile with the tasks of ``configs/serve.yaml`` (mid-run SLO
change included), for every policy: one real run (``loom.app.run.run_trace``: real
inference on the pinned workers) and one simulated run (``loom.app.simulate.simulate``,
block latencies from the host's profile dataset) of the same seeded trace, at each
``--loads`` multiple of the config's rates. Then the simulator alone on a trace of at
least ``--sim-requests`` requests, for its speed.

Two simulations per real run: ``raw`` (the block tables and the plans' modelled
dispatch and hand-off costs only) and ``calibrated`` (``loom.app.sim_overhead.HostOverhead``:
the waits around the blocks and the blocks' slowdown under load, drawn from one
*calibration* run of ``--calibrate-policy`` on another seed; none of the validated runs
is used to calibrate). ``simulated_*`` in the validation rows are the calibrated ones.

Writes ``{"validation": [{"policy", "load", "measured_violation", "simulated_violation",
"measured_throughput", "simulated_throughput", ...}], "sim_requests_per_s", ...}``, a
table, and a plot (measured against simulated violation rate per policy). ``--zoo``: the zoo
the config's tasks come from (the edge zoo by default; ``embedded`` for ``configs/serve.yaml``),
recorded as ``zoo``; the script stops with one line if the config's tasks are not in it or
have no profile data.

    python scripts/bench_sim.py --out out/bench_sim.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_check import zoo_config  # noqa: E402

from loom.app.config import POLICIES  # noqa: E402
from loom.app.deployment import Deployment  # noqa: E402
from loom.app.run import run_trace  # noqa: E402
from loom.app.sim_latency import LatencyModel  # noqa: E402
from loom.app.sim_overhead import HostOverhead  # noqa: E402
from loom.app.simulate import simulate  # noqa: E402
from loom.core.progress import say  # noqa: E402
from loom.profiling.dataset import load_profile_dataset  # noqa: E402


def rel(a: float | None, b: float | None) -> float | None:
    """|a - b| relative to the larger of the two (None when both are 0 or either is missing)."""
    if a is None or b is None:
        return None
    big = max(abs(a), abs(b))
    return abs(a - b) / big if big > 0 else 0.0


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "violation", "SLO violation rate"), (axes[1], "throughput", "throughput (req/s)")):
        xs = [r[f"measured_{key}"] for r in rows]
        ys = [r[f"simulated_{key}"] for r in rows]
        ax.scatter(xs, ys)
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(f"{r['policy']} {r['load']}x", (x, y), fontsize=7)
        hi = max([*xs, *ys, 1e-9]) * 1.1
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"simulated {label}")
    fig.suptitle("simulator vs real runtime (host profile)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/serve.yaml")
    ap.add_argument("--out", default="out/bench_sim.json")
    ap.add_argument("--zoo", default="edge", help="the zoo of the config's tasks: edge (default), embedded, or a folder")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per real run")
    ap.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")], default=[1.0],
                    help="multiples of the config's arrival rates")
    ap.add_argument("--policies", nargs="*", default=list(POLICIES))
    ap.add_argument("--sim-requests", type=int, default=100_000)
    ap.add_argument("--calibrate-policy", default="sv-lo-np")
    ap.add_argument("--calibrate-seed", type=int, default=1)
    args = ap.parse_args(argv)
    cfg, zoo = zoo_config(args.config, args.zoo)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    dep = Deployment.from_config(cfg)
    latency = LatencyModel.from_dataset(load_profile_dataset(dep.dataset_dir()))
    seed = dep.config.run.seed
    dep.config.run.seed = args.calibrate_seed
    calib = run_trace(dep, args.calibrate_policy, duration_s=args.duration, progress=False)
    dep.config.run.seed = seed
    overhead = HostOverhead.from_records(calib.records, latency,
                                         source=f"{args.calibrate_policy}, seed {args.calibrate_seed}, 1.0x")
    say(f"calibration ({overhead.source}): {overhead.summary()}")
    rows: list[dict[str, Any]] = []
    for load in args.loads:
        for name in args.policies:
            real = run_trace(dep, name, duration_s=args.duration, rate_scale=load, progress=False)
            raw = simulate(dep, name, latency, duration_s=args.duration, rate_scale=load)
            sim = simulate(dep, name, latency, duration_s=args.duration, rate_scale=load, overhead=overhead)
            m, s = real.summary["overall"], sim.summary["overall"]
            row = {
                "policy": name, "load": load, "requests": m["n"],
                "measured_violation": m["slo_violation_rate"], "simulated_violation": s["slo_violation_rate"],
                "measured_throughput": m["throughput_rps"], "simulated_throughput": s["throughput_rps"],
                "measured_p99_ms": m["p99_ms"], "simulated_p99_ms": s["p99_ms"],
                "measured_utilization": real.summary["utilization"], "simulated_utilization": sim.summary["utilization"],
                "raw_simulated_violation": raw.summary["overall"]["slo_violation_rate"],
                "raw_simulated_throughput": raw.summary["overall"]["throughput_rps"],
                "raw_simulated_p99_ms": raw.summary["overall"]["p99_ms"],
            }
            row["violation_abs_diff"] = abs((row["measured_violation"] or 0) - (row["simulated_violation"] or 0))
            row["violation_rel_diff"] = rel(row["measured_violation"], row["simulated_violation"])
            row["throughput_rel_diff"] = rel(row["measured_throughput"], row["simulated_throughput"])
            rows.append(row)
            say(f"{load}x {name}: violations measured {row['measured_violation']:.1%} / simulated "
                f"{row['simulated_violation']:.1%} (raw {row['raw_simulated_violation']:.1%}); throughput {row['measured_throughput']:.1f} / "
                f"{row['simulated_throughput']:.1f} req/s")

    # speed: one long trace, the costliest policy (sparseloom decides over the most candidates)
    rate = sum(dep.rates().values())
    long_s = max(args.sim_requests / rate, 1.0) * 1.02
    speed = {}
    for name in ("sparseloom", "sv-lo-np"):
        sim = simulate(dep, name, latency, duration_s=long_s)
        speed[name] = {"requests": sim.requests, "wall_s": sim.wall_s, "requests_per_s": sim.requests_per_s}
        say(f"simulator speed, {name}: {sim.requests} requests in {sim.wall_s:.1f} s "
            f"({sim.requests_per_s:,.0f} requests/s)")

    result = {
        "zoo": zoo,
        "validation": rows,
        "calibration": overhead.summary(),
        "sim_requests_per_s": speed["sparseloom"]["requests_per_s"],
        "speed": speed,
        "settings": {"config": args.config, "duration_s": args.duration, "loads": args.loads, "cpus": os.cpu_count(),
                     "latency_source": latency.source, "date": time.strftime("%Y-%m-%d")},
        "simulated": "validation rows hold a real run and its simulation side by side",
    }
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"{'policy':<11} {'load':>4} {'viol meas':>9} {'viol sim':>9} {'viol raw':>9} {'thru meas':>9} {'thru sim':>9} "
          f"{'p99 meas':>8} {'p99 sim':>8}")
    for r in rows:
        print(f"{r['policy']:<11} {r['load']:>4} {r['measured_violation']:>9.1%} {r['simulated_violation']:>9.1%} "
              f"{r['raw_simulated_violation']:>9.1%} {r['measured_throughput']:>9.1f} {r['simulated_throughput']:>9.1f} "
              f"{(r['measured_p99_ms'] or float('nan')):>8.2f} {(r['simulated_p99_ms'] or float('nan')):>8.2f}")
    print(f"simulator: {result['sim_requests_per_s']:,.0f} requests/s (sparseloom, "
          f"{speed['sparseloom']['requests']} requests in {speed['sparseloom']['wall_s']:.1f} s)")
    plot(rows, out.with_name(out.stem + "_validation.png"))
    print(f"wrote {out} and {out.stem}_validation.png beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
