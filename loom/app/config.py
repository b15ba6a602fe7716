"""The SLO config: which tasks run, under which service-level objectives, how requests arrive.

``load_slo_config(path)`` validates a YAML file (``configs/serve.yaml`` is an annotated
example) and reports every problem at once, each as ``field.path: why``, in one
``ConfigError`` naming the file; relative paths resolve against the file's folder, then
the repository root. ``SloConfig.slo_at(task, t_s)`` gives the SLO in force at a time.
The schema and its rules: ``docs/app.md``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from loom.core.errors import ConfigError
from loom.core.schema import Strict, describe_errors, read_yaml
from loom.processors.device import NAME_PATTERN  # task names follow the processor names' rule

#: The policies a run may use: sparseloom itself and the six baselines of the SparseLoom
#: paper (single variant accuracy-/latency-optimal, any variant; NP = whole model on one
#: processor, P = slots placed on several). Compared case-insensitively.
POLICIES: tuple[str, ...] = ("sparseloom", "sv-ao-np", "sv-ao-p", "sv-lo-np", "sv-lo-p", "av-np", "av-p")

#: What the runtime does with a request no plan can serve within its SLO.
OnUnservable = Literal["violate", "reject"]

#: The arrival processes, the discriminator values of ``TaskSlo.arrival``.
ARRIVAL_PROCESSES: tuple[str, ...] = ("poisson", "bursty", "periodic", "trace")

#: Key of the pydantic validation context holding the folder relative paths resolve against.
_BASE_DIR = "base_dir"


# -- path resolution ------------------------------------------------------------------------------
def _repo_root() -> Path:
    # Imported here: loom.core.paths pulls in loom.model.family (numpy, yaml) and the schema module
    # should import fast for tools that only validate.
    from loom.core.paths import REPO_ROOT

    return REPO_ROOT


def _candidates(path: Path, info: ValidationInfo) -> list[Path]:
    """Where a relative path may live: the YAML file's folder, then the repository root."""
    path = path.expanduser()
    if path.is_absolute():
        return [path]
    bases: list[Path] = []
    ctx = info.context or {}
    if ctx.get(_BASE_DIR) is not None:
        bases.append(Path(ctx[_BASE_DIR]))
    bases.append(_repo_root())
    return [(base / path).resolve() for base in bases]


def _find(path: Path, info: ValidationInfo, *, what: str, is_dir: bool) -> Path:
    """The first existing candidate for ``path``; ValueError naming the places looked in."""
    cands = _candidates(path, info)
    for cand in cands:
        if (cand.is_dir() if is_dir else cand.is_file()):
            return cand.resolve()
    where = ", ".join(str(c) for c in cands)
    raise ValueError(f"no {what} {str(path)!r} (looked for {where})")


# -- arrival processes ----------------------------------------------------------------------------
def _finite_positive(**kw: Any) -> Any:
    return Field(gt=0, allow_inf_nan=False, **kw)


class PoissonArrival(Strict):
    """Independent arrivals at a constant mean rate (exponential gaps)."""

    process: Literal["poisson"]
    rate_rps: float = _finite_positive(description="mean arrivals per second (> 0)")


class BurstyArrival(Strict):
    """A Markov-modulated on/off Poisson process (MMPP-2).

    The process alternates between a calm period (Poisson at ``rate_rps``) and a burst
    (Poisson at ``burst_rate_rps``), starting calm at t = 0. With ``periods:
    exponential`` (default) each period's length is drawn from an exponential
    distribution with mean ``calm_s`` / ``burst_s`` (a two-state continuous-time Markov
    chain); with ``periods: fixed`` the lengths are exactly ``calm_s`` and ``burst_s``.
    The long-run mean rate is ``(rate_rps*calm_s + burst_rate_rps*burst_s) / (calm_s + burst_s)``.
    """

    process: Literal["bursty"]
    rate_rps: float = _finite_positive(description="arrivals per second while calm (> 0)")
    burst_rate_rps: float = _finite_positive(description="arrivals per second during a burst (> 0)")
    burst_s: float = _finite_positive(description="(mean) length of a burst, seconds")
    calm_s: float = _finite_positive(description="(mean) length of a calm period, seconds")
    periods: Literal["exponential", "fixed"] = Field(
        default="exponential", description="how period lengths are drawn (default exponential)"
    )

    @property
    def mean_rate_rps(self) -> float:
        return (self.rate_rps * self.calm_s + self.burst_rate_rps * self.burst_s) / (self.calm_s + self.burst_s)


class PeriodicArrival(Strict):
    """One arrival every ``period_ms``, each moved by a uniform jitter in ``[-jitter_ms, +jitter_ms]``.

    The first arrival's phase is drawn uniformly in ``[0, period_ms)`` from the seed, so
    that several periodic tasks are not all aligned at t = 0. Arrivals the jitter moves
    outside ``[0, duration)`` are dropped.
    """

    process: Literal["periodic"]
    period_ms: float = _finite_positive(description="time between arrivals, ms (> 0)")
    jitter_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="uniform jitter half-width, ms (default 0)")


class TraceArrival(Strict):
    """Arrival times replayed from a file.

    Format: a text file with one arrival time in seconds (from the run's start) per
    line; blank lines and lines starting with ``#`` are skipped, as is anything after a
    ``#`` on a line. Times need not be sorted; those outside ``[0, duration)`` are
    dropped. The file is read and checked when the config is loaded.
    """

    process: Literal["trace"]
    file: Path = Field(description="the trace file; relative: the YAML's folder, then the repository root")

    @field_validator("file")
    @classmethod
    def _resolve(cls, path: Path, info: ValidationInfo) -> Path:
        found = _find(path, info, what="trace file", is_dir=False)
        read_trace_file(found)  # a malformed trace is reported with the config's other problems
        return found


def read_trace_file(path: Path) -> list[float]:
    """The times of a trace file (see ``TraceArrival``); ValueError naming the bad line."""
    times: list[float] = []
    for lineno, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            t = float(line)
        except ValueError:
            raise ValueError(f"{path}: line {lineno}: not a time in seconds: {line!r}") from None
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"{path}: line {lineno}: times are finite and >= 0, got {line!r}")
        times.append(t)
    return times


ArrivalSpec = Annotated[
    PoissonArrival | BurstyArrival | PeriodicArrival | TraceArrival,
    Field(discriminator="process"),
]


# -- tasks ------------------------------------------------------------------------------------------
class SloChange(Strict):
    """From ``at_s`` seconds into the run on, the task's SLO changes; an absent field keeps its value."""

    at_s: float = Field(ge=0, allow_inf_nan=False, description="seconds from the run's start (>= 0)")
    latency_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="new latency bound, ms")
    accuracy_floor: float | None = Field(default=None, ge=0, le=1, description="new accuracy floor, in [0, 1]")

    @model_validator(mode="after")
    def _changes_something(self) -> SloChange:
        if self.latency_ms is None and self.accuracy_floor is None:
            raise ValueError("a change sets latency_ms, accuracy_floor or both")
        return self


class TaskSlo(Strict):
    """One task: its model family, its SLO, how its requests arrive."""

    name: str = Field(pattern=NAME_PATTERN, description="task name, unique in the config")
    family: Path = Field(
        description="family folder (holding family.yaml); relative: the YAML's folder, then the repository root"
    )
    latency_ms: float = _finite_positive(description="latency bound per request, ms (> 0)")
    accuracy_floor: float = Field(ge=0, le=1, description="lowest acceptable plan accuracy, in [0, 1]")
    priority: int = Field(default=0, ge=0, description="higher is served first on ties (default 0)")
    arrival: ArrivalSpec
    slo_changes: list[SloChange] = Field(
        default_factory=list, description="SLO changes during the run; sorted by at_s on load"
    )

    @field_validator("family")
    @classmethod
    def _resolve_family(cls, path: Path, info: ValidationInfo) -> Path:
        from loom.core.paths import MANIFEST

        if path.name == MANIFEST:  # the manifest itself named: its folder is meant
            path = path.parent
        folder = _find(path, info, what="family folder", is_dir=True)
        if not (folder / MANIFEST).is_file():
            raise ValueError(f"{folder}: no {MANIFEST} in this folder")
        return folder

    @field_validator("slo_changes")
    @classmethod
    def _sorted(cls, changes: list[SloChange]) -> list[SloChange]:
        # Stable: of two changes at the same time, the later one in the file wins.
        return sorted(changes, key=lambda c: c.at_s)

    def slo_at(self, t_s: float) -> tuple[float, float]:
        """``(latency_ms, accuracy_floor)`` in force ``t_s`` seconds into the run."""
        latency, floor = self.latency_ms, self.accuracy_floor
        for change in self.slo_changes:
            if change.at_s > t_s:
                break
            if change.latency_ms is not None:
                latency = change.latency_ms
            if change.accuracy_floor is not None:
                floor = change.accuracy_floor
        return latency, floor


# -- the whole file ------------------------------------------------------------------------------
class Correction(Strict):
    """Online latency correction: observed/predicted ratios, smoothed exponentially."""

    enabled: bool = Field(default=True, description="correct predictions from observed latencies (default on)")
    decay: float = Field(
        default=0.9, gt=0, lt=1, description="weight of the old estimate per observation, in (0, 1) (default 0.9)"
    )


class RunSpec(Strict):
    """How long a run lasts and what seeds it."""

    duration_s: float = _finite_positive(description="length of the run, seconds (default 30)", default=30.0)
    seed: int = Field(default=0, ge=0, description="seed of every random draw of the run (default 0)")
    warmup_s: float = Field(
        default=1.0,
        ge=0,
        allow_inf_nan=False,
        description="requests arriving before this are served but left out of the metrics (default 1)",
    )

    @model_validator(mode="after")
    def _warmup_inside(self) -> RunSpec:
        if self.warmup_s >= self.duration_s:
            raise ValueError(f"warmup_s ({self.warmup_s}) must be shorter than duration_s ({self.duration_s})")
        return self


class SloConfig(Strict):
    """A serving run: device, policy, tasks under their SLOs, run length. See the module docstring."""

    schema_version: Literal[1] = 1
    device: str = Field(
        default="host", description="device profile: a name under profiles/ or a YAML path (default host)"
    )
    policy: str = Field(default="sparseloom", description=f"one of {', '.join(POLICIES)} (default sparseloom)")
    memory_budget_mb: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="memory for resident blocks, MB; null: unlimited"
    )
    on_unservable: OnUnservable = Field(
        default="violate",
        description="violate: run the fastest plan and count a violation; reject: fail the request's "
        "future with an explicit error (default violate)",
    )
    estimators: Path | None = Field(
        default=None, description="folder written by `loom fit`; null: fit/measure from the profile dataset"
    )
    partitions: Path = Field(
        default=Path("out/partitions"),
        validate_default=True,  # the default is relative too: resolve it like a given path
        description="where task partitions are found or made (default out/partitions)",
    )
    k: int = Field(default=3, ge=1, description="slots per task (default 3)")
    correction: Correction = Field(default_factory=Correction)
    tasks: list[TaskSlo] = Field(min_length=1, description="at least one; names unique")
    run: RunSpec = Field(default_factory=RunSpec)

    _source: str | None = PrivateAttr(default=None)

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        key = name.strip().lower()  # the paper writes them upper case: SV-AO-NP
        if key not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; must be one of {', '.join(POLICIES)}")
        return key

    @field_validator("device")
    @classmethod
    def _resolve_device(cls, name: str, info: ValidationInfo) -> str:
        from loom.processors.device import resolve_profile_path

        looks_like_path = "/" in name or name.endswith((".yaml", ".yml"))
        if looks_like_path:
            return str(_find(Path(name), info, what="device profile", is_dir=False))
        path = resolve_profile_path(name)
        if not path.is_file():
            known = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise ValueError(f"no device profile named {name!r} under {path.parent}; known: {known}")
        return name

    @field_validator("estimators")
    @classmethod
    def _resolve_estimators(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _find(path, info, what="estimators folder", is_dir=True)

    @field_validator("partitions")
    @classmethod
    def _resolve_partitions(cls, path: Path, info: ValidationInfo) -> Path:
        cands = _candidates(path, info)
        for cand in cands:
            if cand.is_dir():
                return cand
        # Made on demand: not there yet is fine. The repository root, like the CLI's out/.
        return cands[-1]

    # -- lookups --------------------------------------------------------------------------------
    @property
    def source(self) -> str | None:
        """Where the config came from (the file, or the ``source`` given to ``parse_slo_config``)."""
        return self._source

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSlo:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(f"{self._source or 'SLO config'}: no task {name!r} (tasks: {self.task_names})")

    def slo_at(self, task: str, t_s: float) -> tuple[float, float]:
        """``(latency_ms, accuracy_floor)`` of ``task`` in force ``t_s`` seconds into the run."""
        return self.task(task).slo_at(t_s)


# -- validation --------------------------------------------------------------------------------
def _cross_problems(data: dict[str, Any]) -> list[str]:
    """Problems no single field shows, found on the raw mapping so that they are reported
    with the schema's even when the schema check failed elsewhere."""
    problems: list[str] = []
    tasks = data.get("tasks")
    seen: dict[str, int] = {}
    for i, task in enumerate(tasks if isinstance(tasks, list) else []):
        name = task.get("name") if isinstance(task, dict) else None
        if isinstance(name, str):
            if name in seen:
                problems.append(f"tasks[{i}].name: {name!r} is used by tasks[{seen[name]}]; task names are unique")
            seen.setdefault(name, i)
    return problems


def parse_slo_config(
    data: dict[str, Any], *, source: str, base_dir: str | Path | None = None
) -> SloConfig:
    """Validate an SLO config mapping; one ``ConfigError`` names ``source`` and every problem.

    ``base_dir``: the folder relative paths resolve against first (then the repository
    root); ``load_slo_config`` passes the YAML file's folder.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    problems: list[str] = []
    config: SloConfig | None = None
    try:
        config = SloConfig.model_validate(data, context={_BASE_DIR: base_dir})
    except ValidationError as exc:
        problems += describe_errors(exc, union_tags=ARRIVAL_PROCESSES)
    problems += _cross_problems(data)
    if problems or config is None:
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    config._source = source
    return config


def load_slo_config(path: str | Path) -> SloConfig:
    """Load and validate an SLO config YAML file (see the module docstring)."""
    path = Path(path).expanduser().resolve()
    data = read_yaml(path, ConfigError)
    return parse_slo_config(data, source=str(path), base_dir=path.parent)
