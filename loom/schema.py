"""Turn pydantic validation errors into one ``LoomError`` that names the file and every bad field.

Every YAML input (family manifests, device profiles, SLO configs) is validated as a
whole, and all of its problems are reported at once, each as ``path.to[3].field: why``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from loom.errors import LoomError

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


def describe_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling)"
        elif err["type"] in ("literal_error", "enum") and "expected" in err.get("ctx", {}):
            msg = f"must be one of {err['ctx']['expected']}"
        lines.append(f"{field_path(tuple(err['loc']))}: {msg}")
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
