"""What the scheduler hands out and keeps: a ``Decision`` per request, a ``Reservation`` per
segment of the work it admitted (predicted ms on one processor, in EDF order)."""

from __future__ import annotations

from dataclasses import dataclass

from placement.plan import Plan

__all__ = ["ON_UNSERVABLE", "Decision", "Reservation", "processor_set"]

ON_UNSERVABLE = ("violate", "reject")


@dataclass(frozen=True)
class Decision:
    plan: Plan | None
    #: predicted completion (seconds, the caller's clock); inf when rejected
    predicted_finish_s: float
    #: the plan meets the accuracy floor and is predicted to finish by the deadline
    feasible: bool
    reason: str
    #: corrected busy ms of each of the plan's segments (what ``admit`` reserves)
    segment_ms: tuple[float, ...] = ()
    #: no plan: shed under overload (``OverloadError``), not merely unservable
    shed: bool = False


@dataclass(eq=False)
class Reservation:
    """One segment's predicted work on one processor, from admission to the end of its job."""

    id: int
    processor: str
    ms: float
    #: EDF order of the job on its worker: (deadline, -priority)
    key: tuple[float, float]
    started_s: float | None = None

    def remaining_ms(self, now_s: float) -> float:
        if self.started_s is None:
            return self.ms
        return max(0.0, self.ms - (now_s - self.started_s) * 1e3)


def processor_set(plan: Plan) -> tuple[str, ...]:
    """What a plan's residual is learned by: the processors it uses (few keys, each well observed)."""
    return tuple(sorted(set(plan.placement)))
