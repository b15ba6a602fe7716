"""onnxruntime's TensorRT provider creates only the last level of its engine-cache folder:
a Jetson profile naming /var/cache/sparseloom/trt failed unless /var/cache/sparseloom
existed. ``_ort_providers.prepare_cache_folders`` makes the folder (parents too) for the
providers that will run, or says clearly why it cannot, when the backend is made."""

from __future__ import annotations

import os

import pytest

from backends import _ort_providers as prov
from loom.core.errors import BackendUnavailableError

TRT = "TensorrtExecutionProvider"
HERE = [TRT, "CUDAExecutionProvider", "CPUExecutionProvider"]


def trt_entry(**options):
    return (TRT, {"trt_engine_cache_enable": True, **options})


def test_the_folder_and_its_parents_are_made(tmp_path):
    engines, timing = tmp_path / "var" / "cache" / "sparseloom" / "trt", tmp_path / "t" / "timing"
    used, dropped = prov.check_available(
        [trt_entry(trt_engine_cache_path=str(engines), trt_timing_cache_path=str(timing)), "CPUExecutionProvider"],
        HERE,
        fallback=False,
    )
    assert engines.is_dir() and timing.is_dir() and dropped == []
    assert used[0] == (TRT, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engines),
                             "trt_timing_cache_path": str(timing)})  # fmt: skip
    assert used[1] == "CPUExecutionProvider"
    # already there: nothing to do, same result
    assert prov.check_available([trt_entry(trt_engine_cache_path=str(engines))], HERE, fallback=False)[0][0][1][
        "trt_engine_cache_path"
    ] == str(engines)


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    used, _ = prov.check_available([trt_entry(trt_engine_cache_path="~/.cache/sparseloom/trt")], HERE, fallback=False)
    assert used[0][1]["trt_engine_cache_path"] == str(tmp_path / ".cache" / "sparseloom" / "trt")
    assert (tmp_path / ".cache" / "sparseloom" / "trt").is_dir()


def test_a_folder_that_cannot_be_made_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "var"
    blocker.write_text("a file where a folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(BackendUnavailableError) as info:
        prov.check_available([trt_entry(trt_engine_cache_path=str(blocker / "cache" / "trt"))], HERE, fallback=False)
    text = str(info.value)
    assert "trt_engine_cache_path" in text and "cannot be made" in text
    assert f"sudo install -d -o $USER {blocker / 'cache' / 'trt'}" in text
    assert str(tmp_path / "xdg" / "sparseloom" / "trt") in text  # where to point it instead


def test_a_folder_this_user_cannot_write_is_a_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    real = os.access
    monkeypatch.setattr(prov.os, "access", lambda p, mode: False if str(p) == str(folder) else real(p, mode))
    with pytest.raises(BackendUnavailableError, match="exists but this user cannot write to it"):
        prov.check_available([trt_entry(trt_engine_cache_path=str(folder))], HERE, fallback=False)


def test_a_provider_that_is_not_here_creates_nothing(tmp_path):
    """A Jetson profile checked or run on a CPU machine (fallback: true) leaves no folders."""
    engines = tmp_path / "var" / "trt"
    used, dropped = prov.check_available(
        [trt_entry(trt_engine_cache_path=str(engines)), "CPUExecutionProvider"],
        ["CPUExecutionProvider"],
        fallback=True,
    )
    assert dropped == [TRT] and used == ["CPUExecutionProvider"] and not engines.exists()
    assert prov.provider_problems([trt_entry(trt_engine_cache_path=str(engines))]) == []
    assert not engines.exists()  # checking a profile's form makes nothing either

