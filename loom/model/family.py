"""Family manifests: the variants of one base model for one task, plus its data and metric.

A ``family.yaml`` sits beside its ONNX files and ``.npz`` data; paths in it are
relative to it and must stay inside its folder (symlinks resolved; ``allow_outside``
lifts that). ``load_family`` validates the whole file (schema, then files on disk)
and reports every problem in one ``ManifestError`` that names the file and the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import Field, ValidationInfo, field_validator, model_validator

from loom.core.errors import ManifestError
from loom.core.paths import MANIFEST
from loom.core.schema import Strict, read_yaml, validate

VariantKind = Literal["dense", "unstructured", "structured", "int8", "fp16"]
Precision = Literal["fp32", "fp16", "int8"]


class TensorSpec(Strict):
    name: str
    #: None (or a string) marks a free axis, normally the batch axis
    shape: list[int | str | None] = Field(default_factory=list)
    dtype: Literal["float32", "int64", "int32"] = "float32"
    #: the array in the data files that feeds this input (default: ``x`` for a model with
    #: one input, the input's own name for a model with several)
    data: str | None = None


class Metric(Strict):
    #: top1: accuracy against real labels. agreement: top-1 agreement with the dense
    #: variant on real inputs, the honest stand-in where no labels exist offline.
    #: ctc: exact-match sequence accuracy after greedy CTC decoding of a [N, T, C] output
    #: (labels: class ids padded with -1; ``blank`` is the CTC blank class).
    name: Literal["top1", "agreement", "ctc"] = "top1"
    blank: int = Field(default=0, ge=0)


class DataSpec(Strict):
    """An ``.npz`` file and the names of its arrays (``y``: labels, absent for calibration)."""

    file: str
    x: str = "x"
    y: str | None = None


class Variant(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    file: str
    kind: VariantKind
    sparsity: float = Field(default=0.0, ge=0.0, le=1.0)
    precision: Precision = "fp32"
    made_by: str = ""
    #: measured on the family's evaluation data with the family's metric
    accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    size_bytes: int | None = None
    #: what the builder trained after making the variant: nothing, the head only, or all
    #: weights (None: not stated)
    fine_tuned: Literal["no", "head", "all"] | None = None

    @model_validator(mode="after")
    def _kind_matches_precision(self) -> Variant:
        expected = {"int8": "int8", "fp16": "fp16"}.get(self.kind)
        if expected and self.precision != expected:
            raise ValueError(f"kind {self.kind!r} needs precision {expected!r}, got {self.precision!r}")
        return self


class Cut(Strict):
    """Tensors that separate every variant's graph, with the same meaning in each."""

    tensors: list[str] = Field(min_length=1)
    #: share of the dense variant's MACs computed before this cut
    macs_before: float | None = None


def _refuse_repeated(what: str, names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} names must be unique; repeated: {dupes}")


class Manifest(Strict):
    schema_version: Literal[1] = 1
    task: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = ""
    #: every graph input, in the model's order (``input:`` with one spec is read as a list of one)
    inputs: list[TensorSpec] = Field(min_length=1)
    output: TensorSpec
    num_classes: int = Field(gt=1)
    metric: Metric = Metric()
    eval_data: DataSpec
    calib_data: DataSpec
    #: how many variants and cuts follow, written by ``Family.save`` and checked by
    #: ``load_family`` (not on assignment: code edits the lists in memory): a manifest cut
    #: short inside its lists is still valid YAML, and would otherwise load with fewer
    variant_count: int | None = Field(default=None, ge=1)
    cut_count: int | None = Field(default=None, ge=0)
    variants: list[Variant] = Field(min_length=1)
    cuts: list[Cut] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _one_input_form(cls, data: object) -> object:
        """Accept the one-input form ``input: {...}`` of older manifests."""
        if isinstance(data, dict) and "input" in data:
            if "inputs" in data:
                raise ValueError("give either input (one) or inputs (a list), not both")
            data = {("inputs" if k == "input" else k): ([v] if k == "input" else v) for k, v in data.items()}
        return data

    @field_validator("inputs")
    @classmethod
    def _unique_inputs(cls, inputs: list[TensorSpec]) -> list[TensorSpec]:
        _refuse_repeated("input", [i.name for i in inputs])
        return inputs

    @field_validator("eval_data")
    @classmethod
    def _labels_for_top1(cls, spec: DataSpec, info: ValidationInfo) -> DataSpec:
        metric = info.data.get("metric")
        if metric is not None and metric.name in ("top1", "ctc") and not spec.y:
            raise ValueError(f"metric {metric.name!r} needs labels: name the label array in y (or use metric 'agreement')")
        return spec

    @property
    def input(self) -> TensorSpec:
        """The one input of a one-input model (``ManifestError`` for a model with several)."""
        if len(self.inputs) != 1:
            raise ManifestError(f"task {self.task!r} has {len(self.inputs)} inputs {self.input_names}: "
                                "read them with Family.eval_feeds / calib_feeds")
        return self.inputs[0]

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def data_array(self, spec: TensorSpec, data: DataSpec) -> str:
        """The array of ``data`` that feeds input ``spec``."""
        return spec.data or (data.x if len(self.inputs) == 1 else spec.name)

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, variants: list[Variant]) -> list[Variant]:
        _refuse_repeated("variant", [v.name for v in variants])
        return variants


class Family:
    """A loaded, validated manifest plus the folder its paths are relative to."""

    def __init__(self, manifest: Manifest, root: Path) -> None:
        self.manifest = manifest
        self.root = Path(root)

    # -- lookups -------------------------------------------------------------------
    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def path(self) -> Path:
        return self.root / MANIFEST

    @property
    def variants(self) -> list[Variant]:
        return self.manifest.variants

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.manifest.variants]

    def variant(self, name: str) -> Variant:
        for v in self.manifest.variants:
            if v.name == name:
                return v
        raise ManifestError(f"{self.path}: no variant named {name!r} (have {self.variant_names})")

    def variant_path(self, name: str) -> Path:
        return self.root / self.variant(name).file

    def reference_variant(self) -> Variant:
        """The dense variant: cuts are checked against it."""
        dense = [v for v in self.variants if v.kind == "dense"]
        if not dense:
            raise ManifestError(f"{self.path}: variants: no variant of kind 'dense' to check cuts against")
        return dense[0]

    def __iter__(self) -> Iterator[Variant]:
        return iter(self.manifest.variants)

    # -- data ----------------------------------------------------------------------
    def _load_npz(self, spec: DataSpec, field: str) -> dict[str, np.ndarray]:
        path = self.root / spec.file
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except Exception as exc:
            raise ManifestError(f"{self.path}: {field}.file: cannot read {path}: {exc}") from exc

    @property
    def input_names(self) -> list[str]:
        return self.manifest.input_names

    def _feeds(self, spec: DataSpec, data: dict[str, np.ndarray], limit: int | None) -> dict[str, np.ndarray]:
        return {i.name: data[self.manifest.data_array(i, spec)][:limit] for i in self.manifest.inputs}

    def eval_feeds(self, limit: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The evaluation inputs (input name -> array, first ``limit`` samples) and labels."""
        spec = self.manifest.eval_data
        data = self._load_npz(spec, "eval_data")
        return self._feeds(spec, data, limit), (data[spec.y][:limit] if spec.y else None)

    def calib_feeds(self, limit: int | None = None) -> dict[str, np.ndarray]:
        """The calibration inputs (input name -> array)."""
        spec = self.manifest.calib_data
        return self._feeds(spec, self._load_npz(spec, "calib_data"), limit)

    def eval_data(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The one input's evaluation array and the labels (one-input models; see ``eval_feeds``)."""
        feeds, y = self.eval_feeds(limit)
        return feeds[self.manifest.input.name], y

    def calib_data(self, limit: int | None = None) -> np.ndarray:
        """The one input's calibration array (one-input models; see ``calib_feeds``)."""
        return self.calib_feeds(limit)[self.manifest.input.name]

    # -- writing -------------------------------------------------------------------
    def save(self) -> Path:
        """Write the manifest (with its counts) atomically: a crash leaves the old file or the new one."""
        data: dict = {}
        for key, value in self.manifest.model_dump(mode="json", exclude_none=True).items():
            if key == "variants":
                data["variant_count"], data["cut_count"] = len(self.manifest.variants), len(self.manifest.cuts)
            if key not in ("variant_count", "cut_count"):
                data[key] = value
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(yaml.safe_dump(data, sort_keys=False, width=100))
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return self.path


def _check_counts(manifest: Manifest) -> list[str]:
    """A count the file states that its list does not match (the file was cut short or edited)."""
    problems = []
    for field, count, items in (("variant_count", manifest.variant_count, manifest.variants),
                                ("cut_count", manifest.cut_count, manifest.cuts)):
        if count is not None and count != len(items):
            what = field.removesuffix("_count") + "s"
            problems.append(f"{field}: {count}, but {what} lists {len(items)} (the file was cut short or "
                            f"edited by hand: fix the count or the list)")
    return problems


def _outside(root: Path, rel: str, field: str) -> str | None:
    """The problem with a manifest path that resolves (symlinks followed) outside ``root``, if it does."""
    resolved = (root / rel).resolve()
    if resolved.is_relative_to(root.resolve()):
        return None
    return (f"{field}: {rel!r} resolves to {resolved}, outside the family folder {root} "
            "(load_family(..., allow_outside=True) allows that)")


def _check_files(manifest: Manifest, root: Path, *, allow_outside: bool = False) -> list[str]:
    """Problems with files on disk, each naming its field (schema already valid)."""
    problems: list[str] = []
    for field, spec in (("eval_data", manifest.eval_data), ("calib_data", manifest.calib_data)):
        path = root / spec.file
        outside = None if allow_outside else _outside(root, spec.file, f"{field}.file")
        if outside or not path.is_file():
            problems.append(outside or f"{field}.file: no such file {spec.file!r} (looked in {root})")
            continue
        try:
            with np.load(path, allow_pickle=False) as data:
                keys = set(data.files)
        except Exception as exc:
            problems.append(f"{field}.file: {spec.file!r} is not a readable .npz ({exc})")
            continue
        if spec.y and spec.y not in keys:
            problems.append(f"{field}.y: {spec.file!r} has no array {spec.y!r} (has {sorted(keys)})")
        for i, tensor in enumerate(manifest.inputs):
            key = manifest.data_array(tensor, spec)
            if key == spec.y:
                problems.append(f"inputs[{i}]: input {tensor.name!r} would read {spec.file!r}'s label array {key!r}; "
                                "name its array in inputs[].data")
            elif key not in keys:
                where = f"inputs[{i}].data" if tensor.data else (f"{field}.x" if len(manifest.inputs) == 1 else f"inputs[{i}].name")
                problems.append(f"{where}: {spec.file!r} has no array {key!r} for input {tensor.name!r} (has {sorted(keys)})")
    for i, variant in enumerate(manifest.variants):
        outside = None if allow_outside else _outside(root, variant.file, f"variants[{i}].file")
        if outside:
            problems.append(outside)
        elif not (root / variant.file).is_file():
            problems.append(f"variants[{i}].file: no such file {variant.file!r} (looked in {root})")
    if not any(v.kind == "dense" for v in manifest.variants):
        problems.append("variants: no variant of kind 'dense' (cuts are checked against it)")
    return problems


def load_family(path: str | Path, *, allow_outside: bool = False) -> Family:
    """Load ``family.yaml`` (or the folder holding it) and validate all of it.

    ``allow_outside``: accept variant and data files outside the family's folder.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    data = read_yaml(path, ManifestError)
    manifest = validate(Manifest, data, source=str(path), error=ManifestError)
    problems = _check_counts(manifest) + _check_files(manifest, path.parent, allow_outside=allow_outside)
    if problems:
        raise ManifestError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return Family(manifest, path.parent)
