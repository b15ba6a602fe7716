"""What a policy is (``Policy``), and the two shapes the baselines come in.

A policy gives the plans of a task the runtime may use under an SLO, best-first
(``candidates``); an ``adaptive`` one lets the scheduler pick per request. The
single-variant (SV-*) and any-variant (AV-*, sparseloom) shapes, and the conventions
they share (fronts, fallbacks when no plan meets the SLO): ``docs/placement.md``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from loom.core.errors import ConfigError
from placement.pareto import fastest_plans, pareto_plans
from placement.plan import Config, Plan, TaskSpace


class Policy(ABC):
    """Which plans of a task may serve its requests under an SLO."""

    name: ClassVar[str] = ""
    #: True: the scheduler picks a plan per request among ``candidates``; False: always the first
    adaptive: ClassVar[bool] = False
    #: configs may mix variants across slots
    stitched: ClassVar[bool] = False
    #: a plan's slots may run on different processors
    partitioned: ClassVar[bool] = False
    #: the hot-block preloader is on (only sparseloom, as in the paper's comparison)
    preload: ClassVar[bool] = False

    def __init__(self, *, max_plans: int | None = None, spread: bool = True) -> None:
        #: cap on an adaptive policy's candidates (the front is thinned evenly by latency)
        self.max_plans = max_plans
        #: adaptive policies: also offer front configs whole on other processors (``spread_plans``)
        self.spread = spread

    @abstractmethod
    def candidates(self, space: TaskSpace, *, latency_ms: float = math.inf,
                   accuracy_floor: float = 0.0) -> list[Plan]:
        """The plans this policy may use for ``space``'s task, best-first; never empty."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def uniform_configs(space: TaskSpace) -> list[Config]:
    """The original variants as configs: the same variant in every slot."""
    return [(v,) * space.k for v in space.variants]


class SingleVariantPolicy(Policy):
    """SV-*: one original variant per task, chosen once; the runtime always runs the first plan.

    The variant is chosen among those that can run in this policy's placement mode (on
    one processor for NP, on any placement for P), by each one's fastest plan in that
    mode: SV-AO the most accurate (ties: faster); SV-LO the fastest that meets the floor
    (ties: more accurate), else the most accurate. Candidates: NP lists the variant on
    every processor that can run it whole, fastest first, so a caller may choose the
    processor statically (e.g. by ``assign``) while the runtime takes the first; P gives
    the one fastest placement from the DP, which may span processors.
    """

    #: True: latency-optimal (SV-LO); False: accuracy-optimal (SV-AO)
    latency_optimal: ClassVar[bool] = False

    def choose(self, space: TaskSpace, accuracy_floor: float) -> Plan:
        """The fastest plan, in this policy's placement mode, of the variant it picks."""
        plans = [p for p in fastest_plans(space, uniform_configs(space), one_processor=not self.partitioned)
                 if p is not None]
        if not plans:
            mode = "partitioned" if self.partitioned else "on one processor"
            raise ConfigError(f"{self.name}: no original variant of task {space.task!r} can run {mode}")
        order = {v: i for i, v in enumerate(space.variants)}
        most_accurate = min(plans, key=lambda p: (-p.accuracy, p.latency_ms, order[p.config[0]]))
        if not self.latency_optimal:
            return most_accurate
        meets = [p for p in plans if p.accuracy >= accuracy_floor - 1e-9]
        if not meets:
            return most_accurate
        return min(meets, key=lambda p: (p.latency_ms, -p.accuracy, order[p.config[0]]))

    def candidates(self, space: TaskSpace, *, latency_ms: float = math.inf,
                   accuracy_floor: float = 0.0) -> list[Plan]:
        best = self.choose(space, accuracy_floor)
        if self.partitioned:
            return [best]
        config = best.config
        plans = []
        for proc in space.processors:
            if all(space.can_run(space.block(v, s), proc) for s, v in enumerate(config)):
                plans.append(space.make_plan(config, (proc,) * space.k, accuracy=best.accuracy))
        return sorted(plans, key=lambda p: (p.latency_ms, space.processors.index(p.placement[0])))


def front_or_fallback(space: TaskSpace, *, latency_ms: float, accuracy_floor: float,
                      configs: Sequence[Config] | None, one_processor: bool,
                      max_plans: int | None) -> list[Plan]:
    """The feasible front of the allowed plans, fastest first; else one fallback plan (``docs/placement.md``)."""
    kw = {"configs": configs, "one_processor": one_processor}
    front = pareto_plans(space, accuracy_floor=accuracy_floor, latency_bound_ms=latency_ms, max_plans=max_plans, **kw)
    if front:
        return front
    floor_only = pareto_plans(space, accuracy_floor=accuracy_floor, **kw)
    if floor_only:
        return floor_only[:1]  # sorted by latency: the fastest that meets the floor
    everything = pareto_plans(space, **kw)
    if not everything:
        raise ConfigError(f"task {space.task!r}: no plan of the allowed kind can run")
    return [min(everything, key=lambda p: (-p.accuracy, p.latency_ms, p.memory_bytes))]


class AnyVariantPolicy(Policy):
    """AV-* and sparseloom: the scheduler picks per request among the allowed plans' front."""

    adaptive = True
    #: whole model on one processor per plan
    one_processor: ClassVar[bool] = False

    def allowed_configs(self, space: TaskSpace) -> list[Config] | None:
        """The configs this policy may use; None for every stitched config."""
        return None if self.stitched else uniform_configs(space)

    def candidates(self, space: TaskSpace, *, latency_ms: float = math.inf,
                   accuracy_floor: float = 0.0) -> list[Plan]:
        front = front_or_fallback(space, latency_ms=latency_ms, accuracy_floor=accuracy_floor,
                                  configs=self.allowed_configs(space), one_processor=self.one_processor,
                                  max_plans=self.max_plans)
        # Also each front config whole on every other processor that can run it, so that
        # the scheduler can move load between processors per request (the front keeps only
        # a config's fastest placement: on an idle machine the others are dominated).
        # Not for a fallback plan: it already misses the SLO.
        feasible = front[0].latency_ms <= latency_ms and front[0].accuracy >= accuracy_floor - 1e-9
        if not self.spread or not feasible:
            return front
        return front + spread_plans(space, front, latency_ms=latency_ms)


def spread_plans(space: TaskSpace, front: Sequence[Plan], *, latency_ms: float = math.inf) -> list[Plan]:
    """Each front config whole on each processor it is not already on, within the bound.

    Under load the fastest placement is not always the best: its processor may be busy
    while another idles. These are the alternatives the scheduler moves requests to;
    they come after the front, fastest first, and never repeat a plan.
    """
    seen = {(p.config, p.placement) for p in front}
    extra = []
    for plan in front:
        for proc in space.processors:
            placement = (proc,) * space.k
            if (plan.config, placement) in seen:
                continue
            if not all(space.can_run(space.block(v, s), proc) for s, v in enumerate(plan.config)):
                continue
            alt = space.make_plan(plan.config, placement, accuracy=plan.accuracy)
            if alt.latency_ms <= latency_ms:
                seen.add((plan.config, placement))
                extra.append(alt)
    return sorted(extra, key=lambda p: p.latency_ms)
