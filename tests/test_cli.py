"""The CLI is a thin shell: it runs the API and turns LoomErrors into one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loom.cli import main


def test_variants_list(synth_family, capsys):
    assert main(["variants", "list", str(synth_family.root)]) == 0
    out = capsys.readouterr().out
    assert "structured-25-pt" in out and "int8" in out


def test_partition_candidates(synth_family, capsys):
    assert main(["partition", str(synth_family.root), "--candidates"]) == 0
    out = capsys.readouterr().out
    assert "aligned cut(s)" in out and "b1.out" in out


def test_partition_and_stitch(synth_family, tmp_path, capsys):
    out_dir = tmp_path / "part"
    assert main(["partition", str(synth_family.root), "-k", "2", "--out", str(out_dir)]) == 0
    assert (out_dir / "partition.yaml").is_file()
    merged = tmp_path / "m.onnx"
    assert main(["stitch", str(out_dir), "--config", "int8,dense", "--merged-out", str(merged)]) == 0
    assert merged.is_file() and '"accuracy"' in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["variants", "list", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loom: error:") and "family.yaml: no such file" in err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "loom.cli", "--help"], capture_output=True, text=True, check=True)
    assert "partition" in out.stdout and "demo" in out.stdout


def test_backends_command(capsys):
    assert main(["backends"]) == 0
    assert "onnxruntime" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["partition"], ["stitch", "x"]])
def test_usage_errors(argv):
    with pytest.raises(SystemExit):
        main(argv)


def test_variants_init_and_make(tmp_path, capsys):
    import onnx
    from synth import residual_cnn, write_family_data

    model = residual_cnn()
    folder = tmp_path / "fam"
    write_family_data(folder, model)
    onnx.save(model, tmp_path / "model.onnx")
    assert main(["variants", "init", str(tmp_path / "model.onnx"), "--out", str(folder), "--task", "demo-task",
                 "--num-classes", "5"]) == 0
    assert main(["variants", "make", str(folder), "--unstructured", "30,60", "--int8"]) == 0
    out = capsys.readouterr().out
    for name in ("unstructured-30-pt", "unstructured-60-pt", "int8"):
        assert name in out and (folder / f"{name}.onnx").is_file()
