"""The control a run applies while it serves: SLO changes as they fall due, and re-planning.

``control_events`` turns an SLO config into timed actions on a ``ControlledRuntime``;
the trace runner (real inference) and the simulator both run these same closures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from loom.app.deployment import Deployment
from loom.serving.correction import LatencyCorrector
from loom.serving.runtime import TaskBinding
from loom.serving.scheduler import Scheduler
from placement.plan import Plan
from placement.policies import get_policy


class ControlledRuntime(Protocol):
    """What ``control_events`` drives: the real ``Runtime`` and the simulator's both have it."""

    scheduler: Scheduler
    corrector: LatencyCorrector

    @property
    def tasks(self) -> dict[str, TaskBinding]: ...

    def now(self) -> float: ...

    def set_slo(self, task: str, *, latency_ms: float | None = None, accuracy_floor: float | None = None) -> None: ...

    def set_candidates(self, task: str, plans: Sequence[Plan]) -> None: ...


def control_events(
    dep: Deployment, policy_name: str, rt: ControlledRuntime, *, duration_s: float, correction: bool | None,
    replan_s: float, clock: Callable[[], float],
) -> list[tuple[float, Callable[[], None]]]:
    """The actions a run takes at given trace seconds: SLO changes, and re-planning the mix.

    Shared by ``run_trace`` and the simulator (``loom.app.simulate``), so that both run the
    same control code; ``clock`` gives the trace's time when an action runs.
    """
    cfg = dep.config
    policy = get_policy(policy_name)
    # SLO changes fall due during the run: the runtime's bound and floor change, and the
    # candidates are recomputed for the new SLO (the policy's choice depends on it).
    changes: list[tuple[float, Callable[[], None]]] = []
    for t in cfg.tasks:
        for ch in t.slo_changes:
            def apply(task: str = t.name, at: float = ch.at_s) -> None:
                lat, floor = cfg.slo_at(task, at)
                rt.set_slo(task, latency_ms=lat, accuracy_floor=floor)
                plans = dep.candidates(policy.name, t_s=at)
                rt.set_candidates(task, plans[task])
                if policy.adaptive:
                    rt.scheduler.set_mix(task, dep.mixes(plans, t_s=at)[task])
            changes.append((ch.at_s, apply))
    if policy.adaptive and (correction if correction is not None else cfg.correction.enabled):
        # re-solve the joint assignment with the corrected latencies every replan_s, so
        # that load moves off a processor that slows down (and back when it recovers)
        current: dict[str, dict] = dep.mixes({t: rt.tasks[t].candidates for t in cfg.task_names})

        def replan() -> None:
            plans = {t: rt.tasks[t].candidates for t in cfg.task_names}
            fresh = dep.mixes(plans, t_s=clock(), corrector=rt.corrector, now_s=rt.now(), scheduler=rt.scheduler)
            for task, shares in fresh.items():
                # move half way each time: the measurements that drive a re-plan change
                # with the plan itself, and a full jump makes the load swing back and forth
                old = current.get(task, {})
                keys = set(old) | set(shares)
                blended = {k: 0.5 * old.get(k, 0.0) + 0.5 * shares.get(k, 0.0) for k in keys}
                current[task] = {k: v for k, v in blended.items() if v > 0.01}
                rt.scheduler.set_mix(task, current[task])
        changes += [(float(t), replan) for t in np.arange(replan_s, duration_s, replan_s)]
    return changes

