"""Reading input files strictly, and turning pydantic errors into one ``LoomError`` naming every bad field.

Every YAML file (family manifests, device profiles, SLO configs, partitions) is read by
``load_yaml``: refused unread above ``MAX_YAML_BYTES``, safe tags only (none runs code), a
repeated key an error naming its line. It is then validated as a whole, and all of its
problems are reported at once, each as ``path.to[3].field: why``. ``read_json`` reads the
JSON files sparseloom writes, turning any corruption into the caller's typed error.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
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


# -- strict YAML -------------------------------------------------------------------------------
#: the largest YAML file (manifest, profile, config, partition) read; larger ones are refused
#: before parsing. ``load_yaml(..., max_bytes=)`` overrides it for one file.
MAX_YAML_BYTES = 1 << 20
_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of a YAML document repeats a key (``load_yaml`` turns it into the caller's error)."""

    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"line {line}: duplicate key {key!r} (first at line {first})")
        self.key, self.line, self.first = key, line, first


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tag runs code) whose mappings refuse a repeated key."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:  # ``<<: *base`` then overriding one of its keys is fine
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, line, seen[key])
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class reports it
                    continue
        return super().construct_mapping(node, deep=deep)


class _Refused(Exception):
    """A YAML document too large once its aliases are expanded, or one containing itself."""


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes of a document with every alias expanded; ``_Refused`` past ``limit`` or on a cycle."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise _Refused("an alias refers to a node that contains it")
        open_.add(key)
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        total = 1 + sum(size(child) for child in children)
        if total > limit:
            raise _Refused(f"its aliases expand it to more than {limit} nodes")
        open_.discard(key)
        sizes[key] = total
        return total

    return size(root)


def read_bounded(path: Path, error: type[LoomError], max_bytes: int) -> bytes:
    """A file's bytes; ``error`` if it is missing or larger than ``max_bytes`` (refused unread)."""
    if not path.is_file():
        raise error(f"{path}: no such file")
    size = path.stat().st_size
    if size <= max_bytes:
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)  # a file growing meanwhile is still read no further
        size = max(size, len(raw))
    if size > max_bytes:
        raise error(f"{path}: {size} bytes, over the limit of {max_bytes} bytes for this file; refused unread")
    return raw


def load_yaml(path: Path, error: type[LoomError], *, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """Parse one YAML file strictly (see the module docstring); every problem is ``error`` naming the file."""
    raw = read_bounded(path, error, max_bytes)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}): a binary or corrupted file?") from None
    loader = None
    try:
        loader = StrictLoader(text)  # this already refuses a control character
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, max(max_bytes, 1000))
        return loader.construct_document(node)
    except DuplicateKeyError as exc:
        raise error(f"{path}: {exc}") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:  # also a bad date's ValueError
        raise error(f"{path}: not valid YAML: {exc}") from exc
    except _Refused as exc:
        raise error(f"{path}: refused: {exc}") from None
    except RecursionError:
        raise error(f"{path}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: Path, error: type[LoomError], *, max_bytes: int = MAX_YAML_BYTES) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, read by ``load_yaml``."""
    data = load_yaml(path, error, max_bytes=max_bytes)
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


# -- JSON sparseloom wrote ---------------------------------------------------------------------
_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
               type(None): "null"}
Kind = type | tuple[type, ...]


def json_type(kind: Kind) -> str:
    """``dict`` -> 'object', ``(int, float)`` -> 'integer or number': how a message names a JSON type."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)


def check_fields(data: Mapping[str, Any], fields: Mapping[str, Kind], *, source: str,
                 error: type[LoomError], required: Collection[str] = ()) -> None:
    """``error`` naming ``source`` and the field when a ``required`` field is missing or a field
    of ``fields`` has another JSON type (a bool is not a number)."""
    for key, kind in fields.items():
        if key not in data:
            if key in required:
                raise error(f"{source}: {key}: missing")
            continue
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
            raise error(f"{source}: {key}: expected a JSON {json_type(kind)}, got {type(value).__name__}")


def read_json(path: Path, error: type[LoomError], *, kind: type = dict) -> Any:
    """A JSON file whose top level is a ``kind``; ``error`` naming the file when it is missing,
    not UTF-8 JSON (binary, truncated) or of another shape."""
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise error(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, kind):
        raise error(f"{path}: expected a JSON {json_type(kind)} at the top level, got {type(data).__name__}")
    return data
