"""Measured capacity: the highest total rate at which a policy (or a peer) keeps its SLO violations low.

``search_capacity`` is the search, over any probe (a rate in, a violation rate out):
from a starting rate it grows by ``growth`` while probes pass (and, with ``down``,
shrinks by it while they fail) until a passing and a failing rate bracket the capacity,
then bisects that bracket ``bisections`` times; never more than ``max_probes`` probes.
``measured_capacity`` probes by serving the deployment's config, scaled to the rate by
``loom.app.scenario.scenario`` (loose SLO: the config's bounds, no SLO change), with a
policy of the runtime (``run_trace``) or a peer (``run_peer``). Why measured, not the
fluid bound: the runtime's own Python shares the processors' cores (docs/app.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from loom.app.config import SloConfig
from loom.app.deployment import Deployment
from loom.app.peers import is_peer, run_peer
from loom.app.run import run_trace
from loom.app.scenario import scenario
from loom.core.progress import say


def search_capacity(probe: Callable[[float], float], *, start_rps: float, max_violation: float = 0.10,
                    growth: float = 1.5, bisections: int = 3, max_probes: int = 12,
                    down: bool = True) -> tuple[float, list[dict[str, Any]]]:
    """The highest rate found whose ``probe`` (violation rate) is <= ``max_violation``; 0.0 if none.

    Returns it and the probes in order (``rate_rps``, ``slo_violation_rate``). Without
    ``down``, a failing first probe ends the search (nothing below ``start_rps`` is tried).
    """
    steps: list[dict[str, Any]] = []
    passed: float | None = None  # the highest rate that passed
    failed: float | None = None  # the lowest rate that failed

    def ok(rate: float) -> bool:
        v = probe(rate)
        steps.append({"rate_rps": rate, "slo_violation_rate": v})
        return v <= max_violation

    rate = start_rps
    while len(steps) < max_probes:  # bracket
        if ok(rate):
            passed = rate
            if failed is not None:
                break
            rate *= growth
        else:
            failed = rate
            if passed is not None or not down:
                break
            rate /= growth
    for _ in range(bisections):
        if passed is None or failed is None or len(steps) >= max_probes:
            break
        mid = (passed + failed) / 2
        if ok(mid):
            passed = mid
        else:
            failed = mid
    return passed or 0.0, steps


def measured_capacity(dep: Deployment, base: SloConfig, policy: str, *, start_rps: float, mix: Mapping[str, float],
                      seed: int, duration_s: float = 4.0, **search: Any) -> tuple[float, list[dict[str, Any]]]:
    """The highest total rate (at ``mix``) at which ``policy`` (or a peer) keeps violations low, loose SLO.

    Each probe serves ``base`` at the rate for ``duration_s`` seconds (seed ``seed``);
    ``search``: ``search_capacity``'s settings. Leaves ``dep.config`` at the last probe's.
    """
    serve = run_peer if is_peer(policy) else run_trace

    def probe(rate: float) -> float:
        dep.config = scenario(base, total_rps=rate, mix=mix, bound_scale=1.0, duration_s=duration_s, seed=seed)
        v = serve(dep, policy, progress=False).summary["overall"]["slo_violation_rate"] or 0.0
        say(f"capacity search, {policy} at {rate:.0f}/s: violations {v:.1%}")
        return v

    return search_capacity(probe, start_rps=start_rps, **search)
