"""Turn pydantic validation errors into one ``LoomError`` that names the file and every bad field.

Every YAML input (family manifests, device profiles, SLO configs) is validated as a
whole, and all of its problems are reported at once, each as ``path.to[3].field: why``.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from loom.core.errors import LoomError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base for file schemas: unknown keys are errors (they are almost always typos)."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


def field_path(loc: tuple[Any, ...]) -> str:
    """('variants', 3, 'file') -> 'variants[3].file'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(("function-", "literal[")):
            out += f".{part}" if out else part
    return out or "(top level)"


def describe_errors(exc: ValidationError, *, union_tags: Collection[str] = ()) -> list[str]:
    """One ``path: why`` line per problem.

    ``union_tags``: the tags of the schema's discriminated unions (an SLO config's arrival
    processes). Pydantic puts the tag in the location (``arrival.poisson.rate_rps``); the
    user wrote ``arrival: {process: poisson, rate_rps: ...}``, so the path leaves it out,
    and a missing or unknown tag is reported on the discriminator field with the choices.
    """
    allowed = ", ".join(repr(t) for t in union_tags)
    lines = []
    for err in exc.errors():
        raw = err["loc"]
        loc = [p for i, p in enumerate(raw) if not (i and p in union_tags and isinstance(raw[i - 1], str))]
        msg = err["msg"].removeprefix("Value error, ")
        kind, ctx = err["type"], err.get("ctx", {})
        if kind == "extra_forbidden":
            msg = "unknown field (check the spelling)"
        elif kind in ("literal_error", "enum") and "expected" in ctx:
            msg = f"must be one of {ctx['expected']}"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            loc.append(str(ctx.get("discriminator", "")).strip("'"))
            choices = ctx.get("expected_tags") or allowed
            msg = (f"unknown {loc[-1]} {ctx.get('tag')!r}; must be one of {choices}" if kind == "union_tag_invalid"
                   else f"missing; must be one of {choices}")
        lines.append(f"{field_path(tuple(loc))}: {msg}")
    return lines


def read_yaml(path: Path, error: type[LoomError]) -> dict[str, Any]:
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate(model: type[M], data: dict[str, Any], *, source: str, error: type[LoomError]) -> M:
    """Validate ``data`` against ``model``; raise ``error`` listing every problem with its field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = describe_errors(exc)
        raise error(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems)) from None
