"""The reliability benchmark: a catalogue of bad inputs and faults, an overload run, a soak.

- **catalogue** (``scripts/reliability_cases.py``): malformed ONNX files, family manifests,
  SLO configs, requests, damaged artifacts (partition, block store, profile dataset,
  estimates) and backend faults. Each case runs in a forked child with a time bound: a
  child still running at its bound is a ``hang``, one killed by a signal a ``crash``.
  Outcomes: ``typed_error`` (a ``LoomError`` of the expected kind whose message names what
  it should), ``generic_error`` (anything else raised, or a typed message that does not
  name it), ``ok`` (valid input or a fault handled), ``silent_wrong`` (accepted although
  it should not have been, or a wrong result delivered).
- **overload**: ``configs/serve.yaml`` at ``--load`` (3) times the best static plan's
  capacity (``--capacity-rps``, default 290 requests/s: what ``scripts/bench_serving.py``
  measured on this 2-core host, see the config's header) for ``--overload-s`` seconds, real
  inference, sparseloom, ``on_unservable: reject`` (shedding is what bounds the queues):
  every request must resolve; queue lengths and RSS are sampled every 50 ms.
- **soak**: the config's mixed workload at its own rates for ``--soak-s`` seconds with the
  preloader under ``--budget-mb`` of memory and the SLOs toggled every ``--slo-period-s``:
  RSS, threads and open files after warm-up and at the end, requests, lost.

    python scripts/bench_reliability.py --out out/bench_reliability.json --overload-s 20 --soak-s 120
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_cases import Case, SilentWrong, catalogue  # noqa: E402

from loom.app.arrivals import make_trace  # noqa: E402
from loom.app.config import SloConfig  # noqa: E402
from loom.app.deployment import Deployment  # noqa: E402
from loom.core.errors import LoomError  # noqa: E402
from loom.core.progress import say  # noqa: E402
from loom.serving.metrics import MetricsCollector  # noqa: E402
from loom.serving.runtime import Runtime  # noqa: E402

CAPACITY_RPS = 290.0
#: how the futures a ``replay(keep=False)`` let go of ended (exception type, or "none")
ERRORS: Counter[str] = Counter()
OUTCOMES = ("typed_error", "ok", "generic_error", "hang", "crash", "silent_wrong")


# -- the catalogue ---------------------------------------------------------------------------------
def classify(c: Case, tmp: Path) -> tuple[str, str]:
    """Run one case here; its outcome and a message."""
    try:
        c.fn(tmp)
    except SilentWrong as exc:
        return "silent_wrong", str(exc)
    except LoomError as exc:
        msg = f"{type(exc).__name__}: {exc}"
        if c.expect is None:
            return "generic_error", f"valid input refused: {msg}"
        missing = [s for s in c.says if s not in str(exc)]
        if isinstance(exc, c.expect) and not missing:
            return "typed_error", msg
        return "generic_error", f"{msg} (expected {c.expect.__name__} naming {c.says})"
    except BaseException as exc:  # noqa: BLE001 - every other escape is the finding
        return "generic_error", f"{type(exc).__name__}: {exc}"
    if c.expect is not None:
        return "silent_wrong", f"accepted; expected {c.expect.__name__} naming {c.says}"
    return "ok", ""


def _child(c: Case, tmp: str, conn: Any) -> None:
    try:
        conn.send(classify(c, Path(tmp)))
    finally:
        conn.close()
        os._exit(0)  # no interpreter teardown: a thread a fault left hanging cannot hold the exit


def run_case(c: Case, *, timeout_s: float | None = None) -> dict[str, Any]:
    """One case in a forked child, bounded: its row of the catalogue."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    bound = c.timeout_s if timeout_s is None else timeout_s
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"rel-{c.name}-") as tmp:
        proc = ctx.Process(target=_child, args=(c, tmp, send), daemon=True)
        proc.start()
        send.close()
        got = recv.poll(bound)
        if got:
            try:
                outcome, message = recv.recv()
            except EOFError:
                got = False
        proc.join(2.0 if got else 0.1)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if not got:
            code = proc.exitcode
            outcome, message = (("crash", f"child ended with exit code {code} (signal {-code})" if code and code < 0
                                 else f"child ended with exit code {code} and no result")
                                if code is not None and not (code == -9 and time.perf_counter() - t0 >= bound)
                                else ("hang", f"no result within {bound:.0f} s"))
        recv.close()
    return {"name": c.name, "category": c.category, "outcome": outcome,
            "seconds": round(time.perf_counter() - t0, 3), "message": message}


def run_catalogue(cases: Sequence[Case] | None = None, *, names: Sequence[str] | None = None,
                  progress: bool = True) -> list[dict[str, Any]]:
    chosen = [c for c in (cases or catalogue()) if names is None or c.name in names]
    rows = []
    for c in chosen:
        rows.append(run_case(c))
        if progress:
            r = rows[-1]
            say(f"{r['category']:<12} {r['name']:<34} {r['outcome']:<13} {r['seconds']:6.2f} s")
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    counts = Counter((r["category"], r["outcome"]) for r in rows)
    cats = sorted({r["category"] for r in rows})
    lines = [f"{'category':<13}" + "".join(f"{o:>14}" for o in OUTCOMES) + f"{'total':>8}"]
    for cat in [*cats, "all"]:
        n = [sum(v for (c, o), v in counts.items() if o == out and cat in (c, "all")) for out in OUTCOMES]
        lines.append(f"{cat:<13}" + "".join(f"{v:>14}" for v in n) + f"{sum(n):>8}")
    return "\n".join(lines)


# -- serving under load ----------------------------------------------------------------------------
class Sampler:
    """Samples the runtime's queue lengths and this process's RSS, threads and fds every ``period_s``."""

    def __init__(self, rt: Runtime, period_s: float = 0.05) -> None:
        self.rt, self.period_s = rt, period_s
        self.proc = psutil.Process()
        self.max_queue = 0
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reliability-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.max_queue = max(self.max_queue, sum(self.rt.stats()["queues"].values()))
            self.peak_rss_mb = max(self.peak_rss_mb, self.proc.memory_info().rss / 2**20)
            self._stop.wait(self.period_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def snapshot() -> dict[str, float]:
    p = psutil.Process()
    return {"rss_mb": p.memory_info().rss / 2**20, "threads": p.num_threads(), "fds": p.num_fds()}


def replay(dep: Deployment, rt: Runtime, cfg: SloConfig, duration_s: float, *, rate_scale: float = 1.0,
           actions: Sequence[tuple[float, Callable[[], None]]] = (), keep: bool = True) -> list[Future]:
    """Submit the config's seeded trace open loop, running ``actions`` when they fall due. ``keep=False``:
    hold only the futures not yet resolved (a soak must not grow by what it keeps itself)."""
    trace = make_trace(cfg, {t: dep.sample_count(t) for t in cfg.task_names}, duration_s=duration_s,
                       rate_scale=rate_scale)
    todo = sorted(actions, key=lambda a: a[0])
    futures: list[Future] = []
    start = time.perf_counter()
    for it in trace:
        while todo and todo[0][0] <= it.t_s:
            todo.pop(0)[1]()
        delay = it.t_s - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        futures.append(rt.submit(it.task, dep.request_inputs(it.task, it.sample)))
        if not keep and len(futures) >= 1000:
            pending = []
            for f in futures:  # one look per future: one that ends meanwhile stays pending
                if f.done():
                    ERRORS[type(f.exception()).__name__ if f.exception() is not None else "none"] += 1
                else:
                    pending.append(f)
            futures[:] = pending
    for _, fn in todo:
        fn()
    return futures


def settle(futures: Sequence[Future], timeout_s: float) -> int:
    """Wait up to ``timeout_s`` in all for the futures; how many resolved."""
    end = time.monotonic() + timeout_s
    for f in futures:
        if not f.done():
            try:
                f.exception(timeout=max(0.0, end - time.monotonic()))
            except TimeoutError:
                break
    return sum(f.done() for f in futures)


def overload(dep: Deployment, *, capacity_rps: float, load: float, duration_s: float,
             policy: str = "sparseloom") -> dict[str, Any]:
    base = dep.config
    cfg = copy.deepcopy(base)
    cfg.on_unservable = "reject"
    for t in cfg.tasks:
        t.slo_changes = []
    cfg.run.warmup_s = min(cfg.run.warmup_s, duration_s / 4)
    cfg.run.duration_s = duration_s
    dep.config = cfg
    offered = sum(dep.rates().values())
    scale = load * capacity_rps / offered
    collector = MetricsCollector()
    rt = dep.runtime(policy, on_record=collector.record)
    try:
        with Sampler(rt) as sampler:
            futures = replay(dep, rt, cfg, duration_s, rate_scale=scale)
            resolved = settle(futures, 30.0)
        rt.close(timeout=10.0)
        resolved = settle(futures, 5.0)
    finally:
        dep.config = base
    served = [r for r in collector.records if r.status in ("ok", "late", "inaccurate") and r.latency_ms is not None]
    accepted = [r.latency_ms for r in served]
    by_task = {t.name: [r.latency_ms for r in served if r.task == t.name] for t in cfg.tasks}
    statuses = Counter(r.status for r in collector.records)
    errors = Counter(type(f.exception()).__name__ for f in futures if f.done() and f.exception() is not None)
    return {"offered_x_capacity": load, "capacity_rps": capacity_rps, "offered_rps": round(offered * scale, 1),
            "duration_s": duration_s, "policy": policy, "on_unservable": "reject", "submitted": len(futures),
            "resolved": resolved, "max_queue": sampler.max_queue, "peak_rss_mb": round(sampler.peak_rss_mb, 1),
            "accepted": len(accepted),
            "accepted_p99_ms": round(float(np.percentile(accepted, 99)), 2) if accepted else None,
            "accepted_p99_ms_by_task": {t: round(float(np.percentile(v, 99)), 2) if v else None
                                        for t, v in by_task.items()},
            "latency_bounds_ms": {t.name: t.latency_ms for t in cfg.tasks},
            "statuses": dict(statuses), "errors": dict(errors)}


def soak(dep: Deployment, *, duration_s: float, budget_mb: float, slo_period_s: float = 10.0,
         policy: str = "sparseloom") -> dict[str, Any]:
    base = dep.config
    cfg = copy.deepcopy(base)
    cfg.memory_budget_mb = budget_mb
    cfg.run.warmup_s = min(cfg.run.warmup_s, duration_s / 4)
    cfg.run.duration_s = duration_s
    dep.config = cfg
    warm_s = min(10.0, duration_s / 6)
    rt = dep.runtime(policy)  # no collector: the soak must not grow by what it keeps itself
    marks: dict[str, dict[str, float]] = {}
    actions: list[tuple[float, Callable[[], None]]] = [(warm_s, lambda: marks.setdefault("start", snapshot()))]
    tight = False

    def toggle() -> None:  # every task's bound at 0.6x, then back, and so on
        nonlocal tight
        tight = not tight
        for t in cfg.tasks:
            rt.set_slo(t.name, latency_ms=t.latency_ms * (0.6 if tight else 1.0),
                       accuracy_floor=t.accuracy_floor - (0.01 if tight else 0.0))

    series: list[tuple[float, float]] = []

    def toggle_and_sample(s: float) -> None:
        toggle()
        series.append((float(s), round(snapshot()["rss_mb"], 1)))

    actions += [(s, lambda s=s: toggle_and_sample(s)) for s in np.arange(slo_period_s, duration_s, slo_period_s)]
    try:
        ERRORS.clear()
        futures = replay(dep, rt, cfg, duration_s, actions=actions, keep=False)
        settle(futures, 30.0)
        marks["end"] = snapshot()
        submitted = rt.stats()["counts"]["submitted"]
        rt.close(timeout=10.0)
        resolved = settle(futures, 5.0) + sum(ERRORS.values())
    finally:
        dep.config = base
    start, end = marks.get("start", marks["end"]), marks["end"]
    return {"duration_s": duration_s, "warmup_s": warm_s, "memory_budget_mb": budget_mb, "slo_period_s": slo_period_s,
            "rss_start_mb": round(start["rss_mb"], 1), "rss_end_mb": round(end["rss_mb"], 1),
            "rss_drift": round(end["rss_mb"] / start["rss_mb"] - 1, 4),
            "threads_start": start["threads"], "threads_end": end["threads"],
            "fds_start": start["fds"], "fds_end": end["fds"], "requests": submitted,
            "lost": submitted - resolved, "rss_series_mb": series,
            "errors": dict((ERRORS - Counter(none=ERRORS["none"])) + Counter(type(f.exception()).__name__ for f in futures
                                            if f.done() and f.exception() is not None))}


# -- the command -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/serve.yaml")
    ap.add_argument("--out", default="out/bench_reliability.json")
    ap.add_argument("--cases", nargs="*", help="run only these catalogue cases")
    ap.add_argument("--capacity-rps", type=float, default=CAPACITY_RPS,
                    help="the best static plan's capacity (default: measured by bench_serving.py on this host)")
    ap.add_argument("--load", type=float, default=3.0, help="the overload, a multiple of the capacity")
    ap.add_argument("--overload-s", type=float, default=60.0)
    ap.add_argument("--soak-s", type=float, default=600.0)
    ap.add_argument("--budget-mb", type=float, default=8.0, help="the soak's memory budget for resident blocks")
    ap.add_argument("--slo-period-s", type=float, default=10.0, help="the soak toggles the SLOs this often")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    rows = run_catalogue(names=args.cases)
    print(table(rows))
    result: dict[str, Any] = {"cases": rows}
    dep = Deployment.from_config(args.config)
    if args.overload_s > 0:
        result["overload"] = overload(dep, capacity_rps=args.capacity_rps, load=args.load, duration_s=args.overload_s)
        print("overload:", json.dumps(result["overload"]))
    if args.soak_s > 0:
        result["soak"] = soak(dep, duration_s=args.soak_s, budget_mb=args.budget_mb, slo_period_s=args.slo_period_s)
        print("soak:", json.dumps(result["soak"]))
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    bad = [r for r in rows if r["outcome"] not in ("typed_error", "ok")]
    for r in bad:
        print(f"{r['outcome']}: {r['name']} ({r['category']}): {r['message'][:300]}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
