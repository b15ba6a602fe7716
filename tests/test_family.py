"""Manifest loading: valid files load; every problem is named with its file and field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from loom.core.errors import LoomError, ManifestError
from loom.model.family import load_family


def _copy(family, tmp_path: Path) -> Path:
    dst = tmp_path / "fam"
    shutil.copytree(family.root, dst)
    return dst


def _edit(folder: Path, fn) -> None:
    path = folder / "family.yaml"
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data))


def test_synthetic_family_loads(synth_family):
    fam = load_family(synth_family.root)
    assert fam.variant_names == ["dense", "unstructured-50-pt", "structured-25-pt", "int8", "fp16"]
    assert fam.variant("dense").accuracy == 1.0  # labels are the dense model's predictions
    x, y = fam.eval_data()
    assert x.shape == (96, 1, 8, 8) and y.shape == (96,)


def test_missing_variant_file_names_field_and_file(synth_family, tmp_path):
    folder = _copy(synth_family, tmp_path)
    (folder / "int8.onnx").unlink()
    with pytest.raises(ManifestError) as err:
        load_family(folder)
    msg = str(err.value)
    assert "family.yaml" in msg and "variants[3].file: no such file 'int8.onnx'" in msg


def test_fine_tuned_is_recorded_and_checked(synth_family, tmp_path):
    folder = _copy(synth_family, tmp_path)
    manifest = yaml.safe_load((folder / "family.yaml").read_text())
    manifest["variants"][0]["fine_tuned"] = "head"
    (folder / "family.yaml").write_text(yaml.safe_dump(manifest))
    assert load_family(folder).variants[0].fine_tuned == "head"
    manifest["variants"][0]["fine_tuned"] = "a bit"
    (folder / "family.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(ManifestError, match="fine_tuned"):
        load_family(folder)


def test_every_problem_reported_at_once(synth_family, tmp_path):
    folder = _copy(synth_family, tmp_path)

    def break_it(d):
        d["variants"][0]["sparsity"] = "high"
        d["variants"][1]["kind"] = "pruned"
        d["variants"][2]["colour"] = "blue"
        d["num_classes"] = "five"

    _edit(folder, break_it)
    with pytest.raises(ManifestError) as err:
        load_family(folder)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert "variants[0].sparsity" in msg
    assert "variants[1].kind: must be one of" in msg and "'structured'" in msg
    assert "variants[2].colour: unknown field" in msg
    assert "num_classes" in msg


def test_errors_are_typed():
    assert issubclass(ManifestError, LoomError) and issubclass(ManifestError, ValueError)


@pytest.mark.parametrize(
    "text, expected",
    [("task: [unclosed", "not valid YAML"), ("- a list\n- not a mapping\n", "expected a mapping")],
)
def test_malformed_yaml(tmp_path, text, expected):
    (tmp_path / "family.yaml").write_text(text)
    with pytest.raises(ManifestError, match=expected):
        load_family(tmp_path)


def test_no_such_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        load_family(tmp_path / "nowhere")


def test_duplicate_names_and_missing_labels(synth_family, tmp_path):
    folder = _copy(synth_family, tmp_path)

    def break_it(d):
        d["variants"][1]["name"] = "dense"
        d["eval_data"].pop("y")

    _edit(folder, break_it)
    with pytest.raises(ManifestError) as err:
        load_family(folder)
    assert "repeated: ['dense']" in str(err.value)
    assert "metric 'top1' needs labels" in str(err.value)


def test_npz_without_named_array(synth_family, tmp_path):
    folder = _copy(synth_family, tmp_path)
    _edit(folder, lambda d: d["eval_data"].update(y="labels"))
    with pytest.raises(ManifestError, match=r"eval_data\.y: 'eval\.npz' has no array 'labels'"):
        load_family(folder)
