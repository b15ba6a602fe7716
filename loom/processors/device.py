"""Device profiles: a machine's processors, their backends and options, and the links between them.

A profile is a YAML file under ``profiles/`` (``profiles/host.yaml`` is this machine),
validated here with every problem of a file reported at once, each as ``field.path: why``.
Units: ``bandwidth_gbps`` is gigaBYTES per second (1e9 bytes/s), ``latency_us`` the fixed
cost of one hand-off in microseconds. The schema and its reasoning: ``docs/devices.md``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator

from loom.core.errors import BackendUnavailableError, ConfigError, MissingDependencyError
from loom.core.schema import Strict, describe_errors, read_yaml

if TYPE_CHECKING:  # importing backends.base at run time would pull in onnx and numpy for nothing
    from backends.base import Backend

PROFILES_DIR = "profiles"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"
#: precisions a processor's peak throughput may be quoted at
PEAK_PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "int8", "int4")
#: a datasheet figure: finite and >= 0
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Characteristics(Strict):
    """Datasheet figures of a processor, for the simulator and the latency estimator.

    All optional; every number is finite and >= 0. Say where each comes from in a YAML
    comment (datasheet, paper, or "estimate: why").
    """

    #: peak dense throughput per precision (``fp32``, ``fp16``, ``int8``, ...), in GOPS
    #: (1e9 operations per second; one multiply-accumulate is two operations)
    peak_gops: dict[str, NonNegative] = Field(default_factory=dict)
    #: the same with structured 2:4 sparsity, where the hardware exploits it (Ampere
    #: tensor cores, NVDLA): what a sparse variant could reach there at best
    sparse_peak_gops: dict[str, NonNegative] = Field(default_factory=dict)
    #: memory bandwidth the processor can draw, GB/s (1e9 bytes/s; shared with the others on a SoC)
    mem_gbps: NonNegative | None = None
    #: fixed cost of starting one block (kernel launch, graph submit, NPU job), microseconds
    launch_us: NonNegative | None = None
    #: power the processor draws at its peak, watts (for energy estimates)
    power_w: NonNegative | None = None

    @field_validator("peak_gops", "sparse_peak_gops")
    @classmethod
    def _precisions(cls, table: dict[str, float]) -> dict[str, float]:
        unknown = [p for p in table if p not in PEAK_PRECISIONS]
        if unknown:
            raise ValueError(f"{unknown} not precision(s); use {list(PEAK_PRECISIONS)}")
        return table


class Processor(Strict):
    """One execution resource: a backend with its options, on a set of cores or a device."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["cpu", "gpu", "npu"]
    #: a name of ``backends.REGISTRY``
    backend: str
    #: keyword arguments of the backend's constructor (``cores`` goes in its own field)
    options: dict[str, Any] = Field(default_factory=dict)
    #: CPU ids the processor's worker thread is pinned to (None: not pinned)
    cores: list[int] | None = None
    #: which device of its kind (GPU 0, DLA core 1); metadata for the backend's options
    device_id: int | None = Field(default=None, ge=0)
    #: memory the processor may use for resident blocks (None: the machine's)
    memory_mb: float | None = Field(default=None, gt=0)
    #: what a request whose chain starts on this processor pays beyond its blocks' own
    #: latencies: the submit, the worker's wake-up, the engine's start after idling, the
    #: hand-back of the result (microseconds; hand-offs further on are the links' cost)
    dispatch_us: float = Field(default=0.0, ge=0)
    #: where the figures come from (measured how, or which datasheet)
    source: str = ""
    #: datasheet figures for the simulator and the estimators (optional)
    characteristics: Characteristics | None = None

    def estimator_options(self, precision: str = "fp32") -> dict[str, Any]:
        """The options ``estimators.features.processor_features`` reads, with the
        characteristics' ``peak_gops`` (at ``precision``) and ``mem_gbps`` added."""
        options = dict(self.options)
        c = self.characteristics
        if c is not None:
            if precision in c.peak_gops:
                options.setdefault("peak_gops", c.peak_gops[precision])
            if c.mem_gbps is not None:
                options.setdefault("mem_gbps", c.mem_gbps)
        return options

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        from backends import REGISTRY

        if name not in REGISTRY:
            raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(sorted(REGISTRY))}")
        return name

    @field_validator("cores")
    @classmethod
    def _cores(cls, cores: list[int] | None) -> list[int] | None:
        # Not checked against this machine's CPU count: profiles of other machines
        # (Jetson, phones) drive the simulator here. The backend checks at construction.
        if cores is not None:
            if not cores:
                raise ValueError("an empty list pins to nothing; use null for 'not pinned'")
            if any(c < 0 for c in cores):
                raise ValueError(f"CPU ids are >= 0, got {cores}")
            if len(set(cores)) != len(cores):
                raise ValueError(f"repeated CPU ids in {cores}")
        return cores


class Link(Strict):
    """The cost of handing activations between two processors (both directions)."""

    between: list[str] = Field(min_length=2, max_length=2)
    #: gigabytes per second (1e9 bytes/s)
    bandwidth_gbps: float = Field(gt=0)
    #: fixed cost per hand-off, microseconds
    latency_us: float = Field(ge=0)
    source: str = ""

    @field_validator("bandwidth_gbps", "latency_us")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value


class DeviceProfile(Strict):
    """A machine: its processors (at least one) and the links between them."""

    schema_version: Literal[1] = 1
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    processors: list[Processor] = Field(min_length=1)
    links: list[Link] = Field(default_factory=list)

    # -- lookups ----------------------------------------------------------------------
    @property
    def processor_names(self) -> list[str]:
        return [p.name for p in self.processors]

    def processor(self, name: str) -> Processor:
        for p in self.processors:
            if p.name == name:
                return p
        raise ConfigError(f"device {self.name!r}: no processor {name!r} (have {self.processor_names})")

    def link(self, a: str, b: str) -> LinkCost:
        """The cost of a hand-off from ``a`` to ``b``; on the same processor it is free."""
        self.processor(a)
        self.processor(b)
        if a == b:
            return LinkCost(a, b, bandwidth_gbps=math.inf, latency_us=0.0)
        for link in self.links:
            if {a, b} == set(link.between):
                return LinkCost(a, b, bandwidth_gbps=link.bandwidth_gbps, latency_us=link.latency_us)
        raise ConfigError(f"device {self.name!r}: no link between {a!r} and {b!r}; add one under links:")

    def transfer_ms(self, a: str, b: str, nbytes: int) -> float:
        return self.link(a, b).transfer_ms(nbytes)

    def chain_overhead_ms(self, placement: Sequence[str], nbytes: Sequence[int] = ()) -> float:
        """What a chain placed so pays beyond its blocks' latencies: the first processor's
        ``dispatch_us``, and each change of processor its link.

        ``nbytes``: the bytes handed over at each change of processor, in order (missing
        ones count as 0).
        """
        if not placement:
            return 0.0
        total = self.processor(placement[0]).dispatch_us / 1e3
        hops = [(a, b) for a, b in zip(placement, placement[1:], strict=False) if a != b]
        for i, (a, b) in enumerate(hops):
            total += self.transfer_ms(a, b, nbytes[i] if i < len(nbytes) else 0)
        return total

    def make_backend(self, name: str) -> Backend:
        """The processor's backend, configured from the profile.

        Availability is asked first so that a missing engine or device is reported
        against the processor that needs it, not as an import error deep inside.
        """
        from backends import backend_class, get_backend

        proc = self.processor(name)
        try:
            ok, why = backend_class(proc.backend).is_available()
        except MissingDependencyError as exc:
            ok, why = False, str(exc)
        if not ok:
            raise BackendUnavailableError(
                f"device {self.name!r}: processor {name!r} needs backend {proc.backend!r}, "
                f"which cannot run here: {why}"
            )
        try:
            return get_backend(proc.backend, cores=proc.cores, **proc.options)
        except BackendUnavailableError as exc:
            raise BackendUnavailableError(f"device {self.name!r}: processor {name!r}: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"device {self.name!r}: processor {name!r}: {exc}") from exc


@dataclass(frozen=True)
class LinkCost:
    """A link as the optimizer uses it: ``transfer_ms(nbytes)`` = latency + bytes / bandwidth."""

    src: str
    dst: str
    bandwidth_gbps: float
    latency_us: float

    def transfer_ms(self, nbytes: int) -> float:
        if self.src == self.dst:
            return 0.0
        return self.latency_us / 1e3 + nbytes / (self.bandwidth_gbps * 1e9) * 1e3


# -- validation ---------------------------------------------------------------------------
def _cross_problems(data: dict[str, Any]) -> list[str]:
    """Problems pydantic cannot see field by field: names that must refer to each other.

    Works on the raw mapping, defensively, so that it runs (and its findings are
    reported) even when the schema check failed elsewhere in the file.
    """
    problems: list[str] = []
    procs = data.get("processors")
    procs = procs if isinstance(procs, list) else []
    names: list[str] = []
    for i, p in enumerate(procs):
        if not isinstance(p, dict):
            continue
        name = p.get("name")
        if isinstance(name, str):
            if name in names:
                problems.append(f"processors[{i}].name: {name!r} is used by an earlier processor")
            names.append(name)
        problems += _option_problems(i, p)
    links = data.get("links")
    links = links if isinstance(links, list) else []
    seen: dict[frozenset[str], int] = {}
    for i, link in enumerate(links):
        between = link.get("between") if isinstance(link, dict) else None
        if not isinstance(between, list) or not all(isinstance(x, str) for x in between):
            continue  # the schema check reports the type
        unknown = [x for x in between if x not in names]
        if unknown:
            problems.append(
                f"links[{i}].between: unknown processor(s) {unknown}; processors are {names}"
            )
        elif len(between) == 2 and between[0] == between[1]:
            problems.append(f"links[{i}].between: a link joins two different processors (same processor is free)")
        pair = frozenset(between)
        if pair in seen and not unknown:
            problems.append(f"links[{i}].between: {sorted(pair)} already linked by links[{seen[pair]}]")
        seen.setdefault(pair, i)
    return problems


def _option_problems(i: int, proc: dict[str, Any]) -> list[str]:
    """Options the backend's constructor does not take, named against the profile's field."""
    from backends import REGISTRY, backend_class

    backend, options = proc.get("backend"), proc.get("options")
    if not isinstance(options, dict) or not isinstance(backend, str) or backend not in REGISTRY:
        return []
    if "cores" in options:
        return [f"processors[{i}].options.cores: give cores in the processor's own cores field"]
    try:
        params = inspect.signature(backend_class(backend)).parameters
    except (MissingDependencyError, ConfigError):
        return []  # cannot inspect an engine that is not here; make_backend says why
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    accepted = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n != "cores"]
    problems = [
        f"processors[{i}].options.{key}: backend {backend!r} takes no option {key!r}; it accepts {accepted}"
        for key in options
        if key not in accepted
    ]
    # A backend may check the form of its options without being constructed (which
    # needs its engine and devices): onnxruntime's providers list, for one.
    check = getattr(backend_class(backend), "option_problems", None)
    if callable(check):
        problems += [f"processors[{i}].{p}" for p in check(options)]
    return problems


def parse_device_profile(data: dict[str, Any], *, source: str) -> DeviceProfile:
    """Validate a profile mapping; one ``ConfigError`` lists every problem with its field."""
    problems: list[str] = []
    profile: DeviceProfile | None = None
    try:
        profile = DeviceProfile.model_validate(data)
    except ValidationError as exc:
        problems += describe_errors(exc)
    problems += _cross_problems(data)
    if problems or profile is None:
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return profile


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """``host`` -> ``<repo>/profiles/host.yaml``; anything with a suffix or a slash is a path."""
    from loom.core.paths import REPO_ROOT

    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith((".yaml", ".yml")):
        return Path(name_or_path)
    return REPO_ROOT / PROFILES_DIR / f"{text}.yaml"


def load_device_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load and validate a device profile by bare name (``host``) or path."""
    path = resolve_profile_path(name_or_path)
    if not path.is_file() and path.parent.name == PROFILES_DIR and not Path(name_or_path).suffix:
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"{path}: no device profile named {str(name_or_path)!r}; known: {known}")
    data = read_yaml(path, ConfigError)
    return parse_device_profile(data, source=str(path))
