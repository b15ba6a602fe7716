"""What the runtime serves: a task's binding, a request in flight, and the records they leave.

``TaskBinding`` is a task as the runtime is given it (candidates, block files, SLO);
``Request`` is one admitted request while it runs; both turn into ``RequestRecord``s
(``loom.serving.metrics``) when they end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loom.core.errors import ConfigError, InputError
from loom.serving.metrics import RequestRecord, Status
from loom.serving.scheduler import Decision, Reservation
from placement.plan import Plan

if TYPE_CHECKING:
    from backends.base import LoadedBlock
    from loom.core.errors import BackendError

__all__ = ["InputSpec", "Request", "SegmentJob", "TaskBinding", "rejected_record"]

#: an input's dtype and shape (None: rank unknown; a None or str dim: any size)
InputSpec = tuple[str, tuple[int | str | None, ...] | None]


@dataclass(frozen=True)
class TaskBinding:
    """A task as the runtime serves it: its candidate plans, where its blocks are, its SLO."""

    task: str
    #: plans to choose from; non-adaptive policies always run the first
    candidates: list[Plan]
    #: block id -> ONNX file of the block
    block_paths: Mapping[str, Path]
    latency_ms: float
    accuracy_floor: float
    #: breaks ties between equal deadlines in the workers' queues (higher first)
    priority: float = 0
    #: resolve futures to this output only (None: the dict of the last block's outputs)
    output_name: str | None = None
    #: input name -> (dtype, shape), from the family manifest; None: names and arrays only
    inputs: Mapping[str, InputSpec] | None = None
    #: output name -> (dtype, shape) of what a request resolves to; None: not checked
    outputs: Mapping[str, InputSpec] | None = None

    def check_inputs(self, inputs: object) -> dict[str, np.ndarray]:
        """``inputs`` as a dict, or ``InputError`` naming the task and the input: a mapping of
        names to numpy arrays and, with a spec, every input present, none unknown, of its dtype,
        rank and shape (a symbolic dim matches any size)."""
        where = f"task {self.task!r}"
        if not isinstance(inputs, Mapping):
            raise InputError(f"{where}: inputs must be a mapping of input name -> numpy array, "
                             f"got {type(inputs).__name__}")
        for name, value in inputs.items():
            if not isinstance(value, np.ndarray):
                raise InputError(f"{where}: input {name!r} must be a numpy array, got {type(value).__name__}")
        if self.inputs is None:
            return dict(inputs)
        missing = sorted(set(self.inputs) - set(inputs))
        unknown = sorted(map(str, set(inputs) - set(self.inputs)))
        if missing or unknown:
            raise InputError(f"{where}: inputs {sorted(map(str, inputs))} do not match the task's "
                             f"{sorted(self.inputs)} (missing {missing}, unknown {unknown})")
        for name, (dtype, shape) in self.inputs.items():
            _check_array(f"{where}: input {name!r}", inputs[name], dtype, shape)
        return dict(inputs)

    def check_outputs(self, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray]) -> str | None:
        """Why the outputs a request is about to resolve to are not what the task gives (None: they are):
        a named output missing, or of another dtype, rank or fixed size, or another batch than the inputs'."""
        if self.outputs is None:
            return None
        batch = {v.shape[0] for n, v in inputs.items() if v.ndim and n in (self.inputs or {})}
        for name, (dtype, shape) in self.outputs.items():
            if name not in outputs:
                continue  # a missing output is reported by the delivery itself
            value = np.asarray(outputs[name])
            try:
                _check_array(f"output {name!r}", value, dtype, shape)
            except InputError as exc:
                return str(exc)
            if shape and not isinstance(shape[0], int) and value.ndim and len(batch) == 1 and value.shape[0] not in batch:
                return f"output {name!r}: batch {value.shape[0]} (shape {value.shape}) for inputs of batch {batch.pop()}"
        return None

    def check(self, processors: Sequence[str], paths: Mapping[str, Path]) -> None:
        """``ConfigError`` unless its SLO is sane and every candidate is for this task, on
        known ``processors``, with a file for every block (here or in ``paths``)."""
        plans = self.candidates
        if not plans:
            raise ConfigError(f"runtime: task {self.task!r} has no candidate plans")
        if not self.latency_ms > 0 or not 0.0 <= self.accuracy_floor <= 1.0:
            raise ConfigError(
                f"runtime: task {self.task!r}: latency_ms must be > 0 and accuracy_floor in [0, 1], "
                f"got {self.latency_ms} and {self.accuracy_floor}"
            )
        known = {**paths, **self.block_paths}
        for i, plan in enumerate(plans):
            where = f"runtime: task {self.task!r}, candidate {i} {list(plan.config)} on {list(plan.placement)}"
            if plan.task != self.task:
                raise ConfigError(f"{where}: the plan is for task {plan.task!r}")
            unknown = sorted({p for p in plan.placement if p not in processors})
            if unknown:
                raise ConfigError(f"{where}: unknown processor(s) {unknown} (have {list(processors)})")
            missing = sorted({b for b in plan.block_ids if b not in known})
            if missing:
                raise ConfigError(f"{where}: no file given for block(s) {missing}")


@dataclass(eq=False)
class Request:
    """One admitted request, from ``submit`` until it ends (once, under the runtime's lock)."""

    id: int
    binding: TaskBinding
    decision: Decision
    plan: Plan
    segments: list[tuple[str, list[int]]]
    reservations: list[Reservation]
    arrival_s: float
    deadline_s: float
    bound_ms: float
    floor: float
    future: Future
    seq: int
    spans: list[tuple[str, str, float, float]] = field(default_factory=list)
    start_s: float | None = None
    #: set once, under the runtime's lock, by whoever ends the request
    ended: bool = False

    def record(
        self, policy: str, end_s: float, status: Status, below_floor: bool, error: BaseException | None
    ) -> RequestRecord:
        """Its record, ending at ``end_s`` with ``status`` (``error``: why it failed)."""
        return RequestRecord(
            id=self.id, task=self.binding.task, policy=policy, arrival_s=self.arrival_s,
            start_s=self.start_s, end_s=end_s, latency_ms=(end_s - self.arrival_s) * 1e3,
            latency_bound_ms=self.bound_ms, accuracy_floor=self.floor, plan_accuracy=self.plan.accuracy,
            config=self.plan.config, placement=self.plan.placement, status=status, below_floor=below_floor,
            error=None if error is None else f"{type(error).__name__}: {error}", spans=list(self.spans),
        )


def _check_array(where: str, value: np.ndarray, dtype: str, shape: tuple[int | str | None, ...] | None) -> None:
    if value.dtype != np.dtype(dtype):
        raise InputError(f"{where}: dtype {value.dtype} where {dtype} is expected")
    if shape is None:
        return
    if value.ndim != len(shape):
        raise InputError(f"{where}: rank {value.ndim} (shape {value.shape}) where {len(shape)} is expected "
                         f"({list(shape)})")
    for axis, (got, want) in enumerate(zip(value.shape, shape, strict=True)):
        if isinstance(want, int) and got != want:
            raise InputError(f"{where}: shape {value.shape} does not match {list(shape)} (axis {axis}: "
                             f"{got} where {want} is expected)")


def rejected_record(rid: int, binding: TaskBinding, policy: str, arrival_s: float, bound_ms: float,
                    reason: str) -> RequestRecord:
    """The record of a request no plan could serve (``on_unservable="reject"``)."""
    return RequestRecord(
        id=rid, task=binding.task, policy=policy, arrival_s=arrival_s, start_s=None, end_s=None,
        latency_ms=None, latency_bound_ms=bound_ms, accuracy_floor=binding.accuracy_floor, status="rejected",
        error=reason,
    )


class SegmentJob:
    """One segment of a request, as its processor's worker runs it: begin, execute, finish.

    ``runtime`` is the ``Runtime`` whose phases it calls (a layer above this module).
    A real worker calls it (the three phases in a row, on its thread); the simulator's
    worker runs ``execute`` on a simulated clock and ``finish`` when that time has passed.
    """

    __slots__ = ("env", "i", "outcome", "req", "runtime")

    def __init__(self, runtime: Any, req: Request, i: int, env: dict[str, np.ndarray]) -> None:
        self.runtime, self.req, self.i, self.env = runtime, req, i, env
        self.outcome: LoadedBlock | BackendError | None = None

    def begin(self) -> bool:
        return self.runtime._begin_segment(self.req, self.i)

    def execute(self) -> None:
        self.outcome = self.runtime._execute_segment(self.req, self.i, self.env)

    def finish(self) -> None:
        assert self.outcome is not None
        self.runtime._finish_segment(self.req, self.i, self.env, self.outcome)

    def __call__(self) -> None:
        if self.begin():
            self.execute()
            self.finish()
