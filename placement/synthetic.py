"""Synthetic task spaces and a planning timer, for tests and benchmarks.

``python -m placement.synthetic`` prints ``time_planning()`` for the 4 tasks x 10 variants
x 3 slots x 3 processors case.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import numpy as np

from estimators.plans import Link, LinkModel
from placement.assignment import assign
from placement.lp import load_linprog
from placement.pareto import pareto_plans
from placement.plan import Config, TaskSpace


def random_space(
    task: str = "task",
    *,
    n_variants: int = 10,
    k: int = 3,
    processors: Sequence[str] = ("cpu", "gpu", "npu"),
    seed: int = 0,
    unsupported: float = 0.05,
    additive_accuracy: bool = False,
) -> TaskSpace:
    """A synthetic ``TaskSpace`` with random block latencies, hand-offs and accuracies.

    For tests and timing. Each processor has a random speed; each block a random cost;
    a fraction ``unsupported`` of (block, processor) pairs cannot run (never on the
    first processor, so every config can run somewhere). Accuracy is additive over
    slots (``additive_accuracy``) or that plus a deterministic pairwise interaction term.
    """
    rng = np.random.default_rng(seed)
    variants = ["dense"] + [f"v{i}" for i in range(1, n_variants)]
    procs = list(processors)
    speed = {p: float(rng.uniform(0.3, 3.0)) for p in procs}
    blocks, block_ms, out_bytes, memory = {}, {}, {}, {}
    for vi, v in enumerate(variants):
        for s in range(k):
            b = f"{task}/{v}/{s}"
            blocks[(v, s)] = b
            cost = float(rng.uniform(1.0, 10.0)) * (1.0 - 0.6 * vi / max(1, n_variants))
            for pi, p in enumerate(procs):
                if pi > 0 and rng.random() < unsupported:
                    continue
                block_ms[(b, p)] = cost * speed[p] * float(rng.uniform(0.7, 1.3))
            out_bytes[b] = float(rng.choice([64e3, 256e3, 1e6]))
            memory[b] = int(rng.integers(1, 50)) * 1_000_000
    drop = {(v, s): (0.0 if vi == 0 else float(rng.uniform(0.0, 0.05))) for vi, v in enumerate(variants) for s in range(k)}
    inter = rng.uniform(-0.01, 0.01, size=(n_variants, n_variants))
    vindex = {v: i for i, v in enumerate(variants)}

    def accuracy(configs: Sequence[Config]) -> list[float]:
        out = []
        for c in configs:
            a = 0.9 - sum(drop[(v, s)] for s, v in enumerate(c))
            if not additive_accuracy:  # a seam between two different variants costs a little more
                a -= sum(abs(inter[vindex[c[s]], vindex[c[s + 1]]]) for s in range(len(c) - 1) if c[s] != c[s + 1])
            out.append(a)
        return out

    links = {(a, b): Link(latency_ms=float(rng.uniform(0.05, 0.5)), bandwidth_gbps=float(rng.uniform(1.0, 20.0)))
             for a, b in itertools.combinations(procs, 2)}
    link_model = LinkModel(links=links, symmetric=True,
                           dispatch_ms={p: float(rng.uniform(0.0, 0.3)) for p in procs})
    return TaskSpace(task=task, variants=variants, k=k, processors=procs, blocks=blocks, block_ms=block_ms,
                     out_bytes=out_bytes, memory_bytes=memory, accuracy=accuracy, link_model=link_model,
                     variant_accuracy={v: accuracy([(v,) * k])[0] for v in variants})


def time_planning(n_tasks: int = 4, n_variants: int = 10, k: int = 3, n_processors: int = 3,
                  seed: int = 0) -> dict[str, float]:
    """Seconds to plan ``n_tasks`` synthetic tasks: Pareto sets, then the joint assignment.

    ``total_s`` excludes the first import of scipy.optimize (``scipy_import_s``), which a
    long-running process pays once.

    ``python -m placement.synthetic`` prints it for the 4 x 10 x 3 x 3 case.
    """
    procs = [f"p{i}" for i in range(n_processors)]
    spaces = {f"t{i}": random_space(f"t{i}", n_variants=n_variants, k=k, processors=procs, seed=seed + i)
              for i in range(n_tasks)}
    t_import = time.perf_counter()
    load_linprog()  # a one-off import (scipy.optimize: ~0.5 s cold), reported apart from planning
    t0 = time.perf_counter()
    fronts = {name: pareto_plans(sp, accuracy_floor=0.8) for name, sp in spaces.items()}
    t1 = time.perf_counter()
    slos = {name: (max(p.latency_ms for p in fronts[name]) if fronts[name] else 100.0, 0.8) for name in spaces}
    result = assign(spaces, slos, {name: 20.0 for name in spaces})
    t2 = time.perf_counter()
    return {"scipy_import_s": t0 - t_import, "pareto_s": t1 - t0, "assign_s": t2 - t1, "total_s": t2 - t0,
            "plans": float(sum(len(f) for f in fronts.values())), "max_utilization": result.max_utilization}


__all__ = [
    "random_space", "time_planning",
]


if __name__ == "__main__":  # pragma: no cover - a timing aid, not part of the API
    for key, value in time_planning().items():
        print(f"{key}: {value:.4g}")
