"""The runtime's own CPU cost per request, component by component, for a few policies.

Each policy serves the SLO config's seeded trace (``loom.app.run.run_trace``, as
scripts/bench_serving.py does, the config's mid-run SLO changes left out) at a moderate
load, ``--rate-scale`` times the config's rates (0.5 by default), with an
``OverheadMeter`` (``loom.serving.overhead``) on, reset when the warm-up ends. It reports,
in µs of thread CPU time (``time.thread_time_ns``: what the runtime's Python costs, not
what it waits for), net of the clock readings' own cost:

- ``decision`` per request (the scheduler's admission: candidates priced, a plan chosen,
  its segments reserved), with the candidates offered and the pricings done per decision;
- ``submit`` per request (the rest of ``Runtime.submit``: inputs checked, request
  registered, the first segment queued);
- ``begin`` per segment, ``block`` per block run outside the backend's own ``run``,
  ``hand_off`` per hand-off between processors, ``completion`` per request (record,
  ``on_record``, future resolved); ``backend_run`` per block run for comparison (the
  model's own work on the worker's thread: not overhead);
- ``per_request_us``: the overhead components' CPU over the completed requests.

Means (``overhead_us``) and, per unit, medians and p99 (``p50_us``, ``p99_us``): a garbage
collection or a cold cache lands in whichever component it hits.

Twice per policy: on the device's processors (real inference) and on ``NullBackend``s
that sleep each block's predicted ms and return zeros (``--no-null`` leaves them out):
the same plans, queues and decisions, no model work, so that the runtime's own cost is
seen without an engine's (cache misses, allocator) interference.

``overhead_of(dep, policy)`` (and ``overhead_us``) is the measurement of one policy for
other scripts: serve ``dep.config``'s trace, return the meter's report.

    python scripts/bench_overhead.py --zoo embedded --config configs/serve.yaml
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

from backends.null import NullBackend  # noqa: E402
from loom.app.deployment import Deployment  # noqa: E402
from loom.app.run import run_trace  # noqa: E402
from loom.app.scenario import scenario  # noqa: E402
from loom.core.progress import say  # noqa: E402
from loom.serving.overhead import COMPONENTS, OverheadMeter  # noqa: E402

POLICIES = ["sparseloom", "sv-lo-np", "av-p"]


def null_backends(dep: Deployment) -> dict[str, NullBackend]:
    """One ``NullBackend`` per device processor, sleeping each block's predicted ms there (the
    estimates' ``block_ms``), so that queues and decisions stay close to those of real inference."""
    ms: dict[str, dict[str, float]] = {p.name: {} for p in dep.device.processors}
    for space in dep.spaces.values():
        for (b, p), v in space.block_ms.items():
            ms.setdefault(p, {})[b] = float(v)
    return {p: NullBackend(latency_ms=m) for p, m in ms.items()}


def overhead_of(dep: Deployment, policy: str, *, null: bool = False, progress: bool = False) -> dict[str, Any]:
    """Serve ``dep.config``'s trace with ``policy``, the meter on from the end of the warm-up.

    Returns ``OverheadMeter.report()`` (``overhead_us``: component -> µs of CPU per unit,
    ``per_request_us``, ``priced_per_decision``, counts, ...) with the run's policy,
    backend, requests and violation rate. ``null``: on ``NullBackend``s (no model work).
    """
    meter = OverheadMeter()
    warmup = dep.config.run.warmup_s
    backends = null_backends(dep) if null else None
    run = run_trace(dep, policy, progress=progress, backends=backends, meter=meter, events=[(warmup, meter.reset)])
    return {"policy": run.policy, "backend": "null" if null else "device", **meter.report(),
            "requests": len(run.records), "slo_violation_rate": run.summary["overall"]["slo_violation_rate"],
            "errors": run.errors}


def overhead_us(dep: Deployment, policy: str, *, null: bool = False) -> dict[str, float | None]:
    """component -> µs of the runtime's CPU per unit, for ``policy`` on ``dep.config``'s trace."""
    return overhead_of(dep, policy, null=null)["overhead_us"]


def _fmt(v: float | None, width: int = 8, digits: int = 1) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def table(rows: list[dict[str, Any]], key: str = "overhead_us") -> str:
    """One line per run: µs per unit of each component (``key``: the mean, or ``p50_us``)."""
    head = f"{'backend':<7} {'policy':<11} " + " ".join(f"{c:>11}" for c in COMPONENTS)
    head += f" {'per req':>8} {'offered':>8} {'priced':>7} {'n':>5}"
    lines = [head]
    for r in rows:
        us = r[key]
        lines.append(f"{r['backend']:<7} {r['policy']:<11} " + " ".join(_fmt(us[c], 11) for c in COMPONENTS)
                     + f" {_fmt(r['per_request_us'])} {_fmt(r['candidates_per_decision'], 8, 0)}"
                     + f" {_fmt(r['priced_per_decision'], 7, 1)} {r['counts']['completion']:>5}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/serve.yaml")
    ap.add_argument("--out", default="out/bench_overhead.json")
    ap.add_argument("--zoo", default="edge", help="the zoo of the config's tasks: edge (default), embedded, or a folder")
    ap.add_argument("--policies", nargs="*", default=POLICIES)
    ap.add_argument("--rate-scale", type=float, default=0.5, help="the load: a multiple of the config's rates")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per policy and backend")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-null", action="store_true", help="only the device's processors, no NullBackend runs")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 s per policy and backend")
    args = ap.parse_args(argv)
    cfg, zoo = zoo_config(args.config, args.zoo)
    duration = 2.0 if args.quick else args.duration
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    dep = Deployment.from_config(cfg)
    mix = dep.rates()
    total = sum(mix.values()) * args.rate_scale
    dep.config = scenario(dep.config, total_rps=total, mix=mix, bound_scale=1.0, duration_s=duration, seed=args.seed)
    rows = []
    t0 = time.perf_counter()
    for null in ([False] if args.no_null else [False, True]):
        for policy in args.policies:
            row = overhead_of(dep, policy, null=null)
            rows.append(row)
            say(f"{row['backend']} {policy}: {_fmt(row['per_request_us'], 0)} µs of runtime CPU per request, "
                f"{row['counts']['completion']} requests measured")
    result = {
        "zoo": zoo, "runs": rows,
        "settings": {"config": args.config, "rate_scale": args.rate_scale, "total_rps": total, "mix": mix,
                     "duration_s": duration, "warmup_s": dep.config.run.warmup_s, "seed": args.seed,
                     "cpus": os.cpu_count(), "wall_s": time.perf_counter() - t0,
                     "clock": "time.thread_time_ns, net of the readings' own cost (timer_us each)"},
    }
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print("µs of CPU: decision, submit, completion per request; begin per segment; block and backend_run "
          "per block run; hand_off per hand-off; per req: all overhead (means) over completed requests")
    print("means:")
    print(table(rows))
    print("medians (p99 in the JSON):")
    print(table(rows, "p50_us"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
