"""Remote profiling: staging, transports, and the whole flow against a fake ``adb`` on PATH.

The fake adb's "device" is this machine: ``push``/``pull`` copy files, ``shell`` runs
the command with ``sh -c`` in a working directory, so ``python -m loom.cli profile``
really runs "there", from the shipped source, in a folder of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loom.core.errors import ConfigError, RemoteError
from loom.model.family import load_family
from loom.model.partition import PARTITION_FILE, load_partition
from loom.profiling.dataset import load_profile_dataset, partition_ref
from loom.profiling.remote import JOB, remote_profile
from loom.profiling.staging import PLACEHOLDER, stage_job
from loom.profiling.transport import AdbTransport, CommandResult, SshTransport, parse_target

FAST = {"warmup": 1, "repeats": 3, "config_samples": 2, "progress": False}

FAKE_ADB = '''#!{python}
"""A stand-in for adb: the device is this machine. push/pull copy one file, shell runs sh -c."""
import json, os, shutil, subprocess, sys

args = sys.argv[1:]
serial = None
if args[:1] == ["-s"]:
    serial, args = args[1], args[2:]
with open(os.environ["FAKE_ADB_LOG"], "a") as log:
    log.write(json.dumps([serial, *args]) + "\\n")
if serial is not None and serial != os.environ.get("FAKE_ADB_SERIAL", "fake"):
    sys.stderr.write(f"adb: device '{{serial}}' not found\\n")
    sys.exit(1)
cmd, rest = args[0], args[1:]
if cmd in ("push", "pull"):
    try:
        shutil.copyfile(rest[0], rest[1])
    except OSError as exc:
        sys.stderr.write(f"adb: error: {{exc}}\\n")
        sys.exit(1)
    print(f"{{rest[0]}}: 1 file {{cmd}}ed")
    sys.exit(0)
if cmd == "shell":
    sys.exit(subprocess.call(["sh", "-c", " ".join(rest)], cwd=os.environ["FAKE_ADB_CWD"]))
sys.stderr.write(f"adb: unknown command {{cmd}}\\n")
sys.exit(1)
'''


@pytest.fixture
def fake_adb(tmp_path, monkeypatch) -> Path:
    """Put a fake ``adb`` first on PATH; returns the folder that plays the device's storage."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    adb = bin_dir / "adb"
    adb.write_text(FAKE_ADB.format(python=sys.executable))
    adb.chmod(adb.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    device = tmp_path / "device"
    (device / "cwd").mkdir(parents=True)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_LOG", str(tmp_path / "adb.log"))
    monkeypatch.setenv("FAKE_ADB_CWD", str(device / "cwd"))
    return device


def adb_calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "adb.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def null_device(folder: Path, name: str = "fake-phone") -> Path:
    """Two simulated processors (the null backend): the point is the bookkeeping, fast."""
    data = {
        "name": name,
        "processors": [
            {"name": "npu", "kind": "npu", "backend": "null", "options": {"latency_ms": 0.02}, "source": "test"},
            {"name": "gpu", "kind": "gpu", "backend": "null",
             "options": {"latency_ms": 0.05, "unsupported": ["Gemm"]}, "source": "test"},
        ],
        "links": [{"between": ["npu", "gpu"], "bandwidth_gbps": 5.0, "latency_us": 100.0}],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- the whole flow, over the fake adb ------------------------------------------------------------
@pytest.fixture
def remote_run(fake_adb, synth_partition, tmp_path):
    device = null_device(tmp_path / "profiles")
    out = tmp_path / "data"
    data = remote_profile([synth_partition], device, out, f"adb://fake{fake_adb}", python=sys.executable, **FAST)
    return data, out, device


def test_end_to_end_dataset_comes_back_and_loads(remote_run, synth_partition, fake_adb, tmp_path):
    data, out, _ = remote_run
    again = load_profile_dataset(out)
    assert len(again.blocks) == len(data.blocks) == 2 * len(synth_partition.blocks)
    ref = partition_ref(synth_partition.root)
    assert {r["partition"] for r in data.blocks + data.configs} == {ref}  # named as here, not as there
    assert data.meta["partitions"] == {"synthetic": ref}
    for row in data.blocks:
        assert data.block_path(row).is_file()  # rows point at this machine's blocks
        if row["processor"] == "gpu" and row["slot"] == 2:
            assert row["status"] == "unsupported" and row["unsupported_ops"] == "Gemm"
        else:
            assert row["status"] == "ok" and row["latency_ms_median"] > 0
    assert data.configs and all(r["status"] == "ok" for r in data.configs)
    run = data.meta["runs"][-1]
    assert run["status"] == "finished" and run["remote"] == f"adb://fake{fake_adb}"
    assert run["remote_python"] == sys.executable
    assert not (fake_adb / JOB).exists()  # cleaned up on the target
    calls = adb_calls(tmp_path)
    assert [c[1] for c in calls].count("push") == 1 and [c[1] for c in calls].count("pull") == 1
    assert all(c[0] == "fake" for c in calls)
    shell = [c[2] for c in calls if c[1] == "shell"]
    assert any("-m loom.cli profile" in c and "--partition staged/synthetic" in c for c in shell)


def test_a_second_run_resumes_through_the_cli(remote_run, synth_partition, fake_adb, capsys):
    from loom.cli import main

    data, out, device = remote_run
    before = len(data.blocks), len(data.configs)
    rc = main(["profile", "--device", str(device), "--partition", str(synth_partition.root), "--out", str(out),
               "--remote", f"adb://fake{fake_adb}", "--remote-python", sys.executable,
               "--warmup", "1", "--repeats", "3", "--config-samples", "2", "--keep-remote"])
    assert rc == 0, capsys.readouterr().err
    assert "block rows" in capsys.readouterr().out
    again = load_profile_dataset(out)
    assert (len(again.blocks), len(again.configs)) == before  # everything was measured already
    assert len(again.meta["runs"]) == 2
    last = again.meta["runs"][-1]
    assert last["blocks_measured"] == 0 and last["blocks_skipped"] == before[0]
    assert last["remote"] == f"adb://fake{fake_adb}"
    # --keep-remote: the job is still there, and there the rows name the staged partition
    # relative to the shipped source's root, i.e. the shipped sparseloom ran, not this one
    there = load_profile_dataset(fake_adb / JOB / "data")
    assert {r["partition"] for r in there.blocks} == {"staged/synthetic"}
    assert (fake_adb / JOB / "loom" / "cli.py").is_file()


def test_a_dataset_of_other_hardware_is_refused_and_left_alone(remote_run, synth_partition, fake_adb, tmp_path):
    _, out, _ = remote_run
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    other = null_device(tmp_path / "other", name="other-phone")  # another fingerprint
    with pytest.raises(RemoteError) as info:
        remote_profile([synth_partition], other, out, f"adb://fake{fake_adb}", python=sys.executable, **FAST)
    message = str(info.value)
    assert "adb:fake" in message and "loom.cli profile" in message and "other hardware" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


# -- staging ----------------------------------------------------------------------------------------
def test_stage_sends_only_what_profiling_reads(synth_partition, tmp_path):
    device = null_device(tmp_path / "profiles")
    job = stage_job([synth_partition], device, tmp_path / JOB)
    root = job.root
    assert job.partitions == ["staged/synthetic"]
    assert job.refs == {"staged/synthetic": partition_ref(synth_partition.root)}
    staged = root / "staged" / "synthetic"
    # relative to the staged partition, as partition.yaml names them (its blocks may sit in the store beside it)
    sent = sorted(os.path.relpath(p, staged) for p in staged.parent.rglob("*") if p.is_file())
    assert sent == sorted([PARTITION_FILE, *(b.file for b in synth_partition.blocks.values())])
    # the staged partition and its family load as they are, from the staged folder alone
    part = load_partition(staged)
    assert part.blocks.keys() == synth_partition.blocks.keys()
    family = part.family()
    assert family.root.resolve() == (root / "families" / "synthetic").resolve()
    x, _ = family.eval_data(2)
    assert x.shape[0] == 2
    for v in family.variants:  # variants are placeholders: the blocks carry the weights
        assert (family.root / v.file).read_text() == PLACEHOLDER
    # the source travels with the job, and the device profile
    assert (root / "loom" / "cli.py").is_file() and (root / "backends" / "ort.py").is_file()
    assert (root / "device.yaml").read_bytes() == device.read_bytes()
    assert not list(root.rglob("__pycache__"))


def test_stage_names_partitions_apart_from_other_rows(synth_partition, tmp_path):
    """Rows of other partitions already called ``staged/...`` must not be confused with ours."""
    dataset = tmp_path / "data"
    dataset.mkdir()
    (dataset / "blocks.csv").write_text("partition,block_id\r\nstaged/synthetic,x\r\n")
    job = stage_job([synth_partition], null_device(tmp_path / "p"), tmp_path / JOB, dataset=dataset)
    assert job.partitions == ["staged-1/synthetic"]


def test_local_family_is_still_loadable_after_staging(synth_partition, tmp_path):
    stage_job([synth_partition], null_device(tmp_path / "p"), tmp_path / JOB)
    load_family(synth_partition.family().path)  # nothing here was touched


# -- failures -----------------------------------------------------------------------------------------
def test_remote_command_failure_names_target_command_and_stderr(fake_adb, synth_partition, tmp_path):
    device = null_device(tmp_path / "profiles")
    out = tmp_path / "data"
    with pytest.raises(RemoteError) as info:
        remote_profile([synth_partition], device, out, f"adb://fake{fake_adb}", python="no-such-python-here", **FAST)
    message = str(info.value)
    assert "adb:fake" in message and "no-such-python-here -m loom.cli profile" in message
    assert "exit status 127" in message and "not found" in message  # the shell's own words, from stderr
    assert not (out / "meta.json").exists()


def test_unknown_device_is_reported_before_anything_is_sent(fake_adb, synth_partition, tmp_path):
    with pytest.raises(RemoteError, match=r"(?s)adb:wrong-serial.*exit status 1.*device 'wrong-serial' not found") as info:
        remote_profile([synth_partition], null_device(tmp_path / "p"), tmp_path / "data",
                       f"adb://wrong-serial{fake_adb}", python=sys.executable, **FAST)
    assert "`true`" in str(info.value)
    assert [c[1] for c in adb_calls(tmp_path)] == ["shell"]  # the reachability check, nothing else


def test_missing_client_program_is_named():
    with pytest.raises(RemoteError, match="cannot run 'no-such-adb-binary'"):
        AdbTransport("x", adb="no-such-adb-binary").check()


def test_timeouts_are_remote_errors(fake_adb):
    with pytest.raises(RemoteError, match="did not finish within 0.5 s"):
        AdbTransport("fake").run("sleep 5", timeout=0.5)


# -- targets and command lines --------------------------------------------------------------------------
def test_parse_targets():
    t, path = parse_target("ssh://jet@10.0.0.7:2222/home/jet/loom/")
    assert isinstance(t, SshTransport) and (t.user, t.host, t.port) == ("jet", "10.0.0.7", 2222)
    assert path == "/home/jet/loom" and t.target == "ssh:jet@10.0.0.7:2222"
    t, path = parse_target("adb://192.168.1.5:5555/data/local/tmp/loom")
    assert isinstance(t, AdbTransport) and t.serial == "192.168.1.5:5555" and path == "/data/local/tmp/loom"
    t, _ = parse_target("adb:///data/local/tmp/loom")
    assert isinstance(t, AdbTransport) and t.serial is None and t.run_argv("true") == ["adb", "shell", "true"]


@pytest.mark.parametrize(
    "url",
    ["http://host/x", "ssh://host", "ssh://host/", "ssh:///x", "ssh://host/a b", "ssh://host/a/../b",
     "ssh://host/x;rm", "ssh://host:notaport/x", "adb://s/~/x"],
)
def test_bad_targets_are_config_errors(url):
    with pytest.raises(ConfigError):
        parse_target(url)


def test_ssh_command_lines_never_prompt():
    calls: list[list[str]] = []

    def runner(argv, *, timeout=None, echo=False):
        calls.append(list(argv))
        return CommandResult(0, "", "")

    t = SshTransport("fe80::1", user="me", port=2200, options=["-i", "/k"], connect_timeout=3, runner=runner)
    t.run("echo hi")
    t.put(Path("/tmp/a.tar"), "/r/a.tar")
    with pytest.raises(RemoteError, match="wrote nothing"):  # the fake runner writes no file
        t.get("/r/b.tar", Path("/nonexistent/b.tar"))
    run, put, get = calls
    for argv in calls:
        assert "BatchMode=yes" in argv and "ConnectTimeout=3" in argv and "-i" in argv
    assert run[0] == "ssh" and run[-2:] == ["me@fe80::1", "echo hi"] and run[run.index("-p") + 1] == "2200"
    assert put[0] == "scp" and put[-2:] == ["/tmp/a.tar", "me@[fe80::1]:/r/a.tar"] and "-P" in put
    assert get[-2:] == ["me@[fe80::1]:/r/b.tar", "/nonexistent/b.tar"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client here")
def test_unreachable_ssh_host_is_a_remote_error():
    port = _closed_port()
    with pytest.raises(RemoteError) as info:
        SshTransport("127.0.0.1", port=port, connect_timeout=2).check(timeout=20)
    message = str(info.value)
    assert f"ssh:127.0.0.1:{port}" in message and "`true`" in message and "exit status 255" in message
    assert "refused" in message.lower() or "timed out" in message.lower()


def _ssh_localhost_works() -> bool:
    if shutil.which("ssh") is None:
        return False
    try:
        done = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=2", "localhost", "true"],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.skipif(not _ssh_localhost_works(),
                    reason="no sshd on localhost accepting BatchMode key logins (ssh -o BatchMode=yes localhost true)")
def test_end_to_end_over_ssh_to_localhost(synth_partition, tmp_path):
    device = null_device(tmp_path / "profiles")
    out = tmp_path / "data"
    data = remote_profile([synth_partition], device, out, f"ssh://localhost{tmp_path / 'target'}",
                          python=sys.executable, **FAST)
    assert {r["partition"] for r in data.blocks} == {partition_ref(synth_partition.root)}
    assert data.meta["runs"][-1]["remote"].startswith("ssh://localhost")
