"""Profile blocks on another machine (a Jetson over SSH, a phone over adb) and bring the data back.

``loom profile --remote ssh://user@host[:port]/path`` (or ``adb://SERIAL/path``) does what
``loom profile`` does, on the target:

1. stages a job folder here: the blocks each partition lists (and nothing else of the
   partition folder), its ``partition.yaml`` pointing at a staged family, the family's
   ``family.yaml`` with its evaluation and calibration data (``slot_inputs`` feeds the
   blocks real activations from them), the device profile, the dataset measured so far,
   and **the sparseloom source** (``loom``, ``backends``, ``estimators``, ``placement``:
   about 0.7 MB of Python);
2. sends it as one tar file (one push, not one per block: adb and scp pay per file) and
   unpacks it under ``path/loomjob``;
3. runs ``python -m loom.cli profile`` there, in the job folder;
4. brings the dataset folder back, checks it, and puts it in place here.

Why ship the source instead of assuming sparseloom is installed there: the dataset is
written by one side and read by the other, so both must agree on its columns, format
version and fingerprint; an older or newer sparseloom on the target would write rows
this one refuses, or resume under another fingerprint. The source is small and pure
Python. Its dependencies (numpy, onnx, onnxruntime with the target's execution
providers, pydantic, PyYAML, psutil; openvino where a processor uses it) must be
installed on the target: they are platform wheels (aarch64, JetPack's onnxruntime-gpu)
that only the target's own package manager gets right. ``python`` names the
interpreter that has them (a venv's ``bin/python``).

Merging follows ``profile_device``'s own rules, applied on the target: the dataset so
far travels with the job, the target resumes it (rows already measured under its
fingerprint are skipped) or refuses it when it was measured elsewhere (unless
``allow_mixed``). Rows name partitions by path; the staged partitions sit inside the
job folder, which is the target's repository root, so their rows name them
``staged/<task>`` there: the rows of this run's partitions are renamed on the way out
and back, everything else is left alone.

Variant ONNX files are not sent (the blocks hold the same weights): the staged family
has a small placeholder text file in place of each, so that its manifest validates;
reading one as ONNX fails loudly. Nothing in ``loom profile`` reads them.

Transports run ``ssh``/``scp`` (``BatchMode=yes``: a password prompt would hang) or
``adb push/pull/shell`` as subprocesses through an injectable runner; any failure is a
``RemoteError`` naming the target, the command and its stderr tail. ``adb shell`` must
return the remote exit status (adb and Android 7 or later).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

import yaml

from loom.core.errors import ConfigError, RemoteError
from loom.core.paths import REPO_ROOT

#: the job folder under the target's path; the only thing there this module creates or deletes
JOB = "loomjob"
#: packages of the source shipped with every job
SOURCE_PACKAGES = ("loom", "backends", "estimators", "placement")
#: a target path: absolute, plain characters (it goes into scp specs and shell commands)
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_.+/-]*[A-Za-z0-9_.+-]$")
PLACEHOLDER = (
    "sparseloom remote profiling placeholder: this variant's ONNX file was not copied to the\n"
    "target (its blocks under staged/ hold the same weights). Not an ONNX model.\n"
)
#: how much of a failing command's stderr an error quotes
STDERR_TAIL = 2000


# -- running commands ------------------------------------------------------------------------------
@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """Runs one local command (``ssh ...``, ``adb ...``); injectable so tests need no device."""

    def __call__(self, argv: Sequence[str], *, timeout: float | None = None, echo: bool = False) -> CommandResult: ...


def run_command(argv: Sequence[str], *, timeout: float | None = None, echo: bool = False) -> CommandResult:
    """Run ``argv``, capturing stdout and stderr; with ``echo`` the stderr is also copied to
    ours as it arrives (a remote ``loom profile`` reports its progress there).

    ``FileNotFoundError`` when the program is missing, ``subprocess.TimeoutExpired`` after
    ``timeout`` seconds (the process is killed): the transport turns both into
    ``RemoteError``.
    """
    # A session of its own, so that a timeout ends the client *and* what it started (a
    # local shell's children would otherwise hold the pipes open after the client died).
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}

    def pump(stream: IO[bytes], key: str, mirror: IO[bytes] | None) -> None:
        # Raw reads, not lines: a progress bar redraws one line with '\r' and no newline.
        for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
            chunks[key].append(chunk)
            if mirror is not None:
                mirror.write(chunk)
                mirror.flush()

    mirror = getattr(sys.stderr, "buffer", None) if echo else None
    threads = [
        threading.Thread(target=pump, args=(proc.stdout, "out", None), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, "err", mirror), daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call created, nothing else
        proc.wait()
        raise
    finally:
        for t in threads:
            t.join(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    return CommandResult(
        proc.returncode,
        b"".join(chunks["out"]).decode(errors="replace"),
        b"".join(chunks["err"]).decode(errors="replace"),
    )


def _tail(text: str, limit: int = STDERR_TAIL) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


# -- transports -------------------------------------------------------------------------------------
class Transport(ABC):
    """A way to reach a target: run a shell command there, send a file, fetch a file."""

    #: how errors name the target, e.g. ``ssh:jetson@10.0.0.7:22``
    target: str = ""

    def __init__(self, runner: Runner | None = None) -> None:
        self.runner: Runner = runner or run_command

    @abstractmethod
    def run_argv(self, command: str) -> list[str]:
        """The local command line that runs the shell ``command`` on the target."""

    @abstractmethod
    def put_argv(self, local: Path, remote: str) -> list[str]:
        """The local command line that copies the file ``local`` to ``remote`` on the target."""

    @abstractmethod
    def get_argv(self, remote: str, local: Path) -> list[str]:
        """The local command line that copies the target's file ``remote`` to ``local``."""

    def run(self, command: str, *, timeout: float | None = None, echo: bool = False) -> str:
        """Run a shell command on the target; its stdout. ``RemoteError`` when it fails."""
        return self._call(self.run_argv(command), shown=command, timeout=timeout, echo=echo).stdout

    def put(self, local: Path, remote: str, *, timeout: float | None = None) -> None:
        self._call(self.put_argv(local, remote), shown=f"copy {local} to {remote}", timeout=timeout)

    def get(self, remote: str, local: Path, *, timeout: float | None = None) -> None:
        self._call(self.get_argv(remote, local), shown=f"copy {remote} to {local}", timeout=timeout)
        if not local.is_file():  # some clients report success and write nothing
            raise RemoteError(f"{self.target}: copying {remote} to {local} wrote nothing")

    def check(self, *, timeout: float = 60) -> None:
        """Reach the target with a no-op: names the problem before anything is sent."""
        self.run("true", timeout=timeout)

    def _call(self, argv: list[str], *, shown: str, timeout: float | None, echo: bool = False) -> CommandResult:
        try:
            result = self.runner(argv, timeout=timeout, echo=echo)
        except FileNotFoundError as exc:
            raise RemoteError(f"{self.target}: cannot run {argv[0]!r} here ({exc}); is it installed and on PATH?") from exc
        except subprocess.TimeoutExpired as exc:
            raise RemoteError(f"{self.target}: `{shown}` did not finish within {timeout:g} s") from exc
        if result.returncode != 0:
            raise RemoteError(
                f"{self.target}: `{shown}` failed with exit status {result.returncode}\n"
                f"  local command: {shlex.join(argv)}\n"
                f"  stderr (tail): {_tail(result.stderr) or '(empty)'}"
            )
        return result


class SshTransport(Transport):
    """OpenSSH's ``ssh`` and ``scp``, non-interactive: keys or an agent must log in.

    ``BatchMode=yes`` makes a missing key an error instead of a password prompt that
    hangs; ``ConnectTimeout`` makes an unreachable host an error in seconds.
    ``options``: more ``ssh -o``-style arguments for both, e.g. ``["-i", "~/.ssh/jetson"]``.
    """

    def __init__(
        self,
        host: str,
        *,
        user: str | None = None,
        port: int | None = None,
        options: Sequence[str] = (),
        connect_timeout: int = 10,
        runner: Runner | None = None,
        ssh: str = "ssh",
        scp: str = "scp",
    ) -> None:
        super().__init__(runner)
        if not host:
            raise ConfigError("ssh target: no host")
        self.host, self.user, self.port = host, user, port
        self.options = list(options)
        self.connect_timeout = int(connect_timeout)
        self.ssh, self.scp = ssh, scp
        self.target = f"ssh:{self.destination}" + (f":{port}" if port else "")

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def _common(self) -> list[str]:
        return ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}", *self.options]

    def run_argv(self, command: str) -> list[str]:
        port = ["-p", str(self.port)] if self.port else []
        # ssh joins the words after the destination into one command for the remote
        # shell: pass it as a single, already quoted word.
        return [self.ssh, *self._common(), *port, self.destination, command]

    def _scp_host(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        return f"{self.user}@{host}" if self.user else host

    def put_argv(self, local: Path, remote: str) -> list[str]:
        port = ["-P", str(self.port)] if self.port else []
        return [self.scp, "-q", *self._common(), *port, str(local), f"{self._scp_host()}:{remote}"]

    def get_argv(self, remote: str, local: Path) -> list[str]:
        port = ["-P", str(self.port)] if self.port else []
        return [self.scp, "-q", *self._common(), *port, f"{self._scp_host()}:{remote}", str(local)]


class AdbTransport(Transport):
    """Android Debug Bridge: ``adb [-s SERIAL] push|pull|shell``.

    ``serial``: the device as ``adb devices`` lists it (``192.168.1.5:5555`` over TCP);
    None: the only device attached.
    """

    def __init__(self, serial: str | None = None, *, runner: Runner | None = None, adb: str = "adb") -> None:
        super().__init__(runner)
        self.serial = serial or None
        self.adb = adb
        self.target = f"adb:{self.serial or '(default device)'}"

    def _base(self) -> list[str]:
        return [self.adb, *(["-s", self.serial] if self.serial else [])]

    def run_argv(self, command: str) -> list[str]:
        return [*self._base(), "shell", command]

    def put_argv(self, local: Path, remote: str) -> list[str]:
        return [*self._base(), "push", str(local), remote]

    def get_argv(self, remote: str, local: Path) -> list[str]:
        return [*self._base(), "pull", remote, str(local)]


def parse_target(url: str, *, runner: Runner | None = None) -> tuple[Transport, str]:
    """``ssh://user@host:port/path`` or ``adb://SERIAL/path`` -> (transport, path on the target).

    The path is absolute and made of plain characters (it goes into scp specs and
    shell commands); the job lives in ``path/loomjob``.
    """
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if parts.scheme not in ("ssh", "adb"):
        raise ConfigError(f"remote target {url!r}: use ssh://[user@]host[:port]/path or adb://[SERIAL]/path")
    if not path:
        raise ConfigError(f"remote target {url!r}: give a folder on the target after the host, e.g. /home/me/loom")
    if not _SAFE_PATH.match(path) or ".." in PurePosixPath(path).parts:
        raise ConfigError(
            f"remote target {url!r}: path {path!r} must be absolute and use only letters, digits and _ . + - /"
        )
    if parts.scheme == "ssh":
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"remote target {url!r}: bad port ({exc})") from None
        if not parts.hostname:
            raise ConfigError(f"remote target {url!r}: no host")
        return SshTransport(parts.hostname, user=parts.username, port=port, runner=runner), path
    return AdbTransport(parts.netloc or None, runner=runner), path


# -- staging ----------------------------------------------------------------------------------------
@dataclass
class StagedJob:
    """A job folder built here, and how its partitions are named on either side."""

    root: Path
    #: partition ref on the target (``staged/<task>``) -> ref here (``partition_ref``)
    refs: dict[str, str] = field(default_factory=dict)
    #: staged partition folders, relative to the job root
    partitions: list[str] = field(default_factory=list)
    #: runs the dataset had when it was sent (the target's run is appended after them)
    runs_sent: int = 0
    files: int = 0
    bytes: int = 0


def _copy(src: Path, dst: Path, job: StagedJob) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    job.files += 1
    job.bytes += dst.stat().st_size


def _inside(rel: str, what: str) -> str:
    """A manifest's relative path that must stay inside its folder once staged."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        raise ConfigError(f"{what}: {rel!r} points outside its folder; remote profiling stages only the folder's files")
    return p.as_posix()


def _external_data(path: Path) -> list[str]:
    """Files holding a block's external weights (relative to the block), which partition.yaml does not list."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found: set[str] = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    found.add(entry.value)
    return sorted(found)


def _stage_family(family: Any, dest: Path, job: StagedJob) -> None:
    """family.yaml as it is, its eval and calib data, and a placeholder per variant file."""
    m = family.manifest
    _copy(family.path, dest / "family.yaml", job)
    data_files = {_inside(m.eval_data.file, f"{family.path}: eval_data.file"),
                  _inside(m.calib_data.file, f"{family.path}: calib_data.file")}
    for rel in sorted(data_files):
        _copy(family.root / rel, dest / rel, job)
    for v in m.variants:
        rel = _inside(v.file, f"{family.path}: variants[{v.name}].file")
        if rel in data_files:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(PLACEHOLDER)


def _stage_partition(part: Any, dest: Path, family_rel: str, job: StagedJob) -> None:
    """The blocks partition.yaml lists (and their external weights), and partition.yaml
    itself with its family pointing at the staged one."""
    from loom.model.partition import PARTITION_FILE

    for bid, info in part.blocks.items():
        rel = _inside(info.file, f"{part.root / PARTITION_FILE}: blocks[{bid}].file")
        src = part.root / rel
        _copy(src, dest / rel, job)
        for extra in _external_data(src):
            extra_rel = (PurePosixPath(rel).parent / _inside(extra, f"{src}: external data")).as_posix()
            _copy(part.root / extra_rel, dest / extra_rel, job)
    data = yaml.safe_load((part.root / PARTITION_FILE).read_text())
    data["family"] = family_rel
    (dest / PARTITION_FILE).write_text(yaml.safe_dump(data, sort_keys=False, width=120))


def _stage_source(dest: Path, job: StagedJob) -> None:
    for package in SOURCE_PACKAGES:
        for src in sorted((REPO_ROOT / package).rglob("*.py")):
            if "__pycache__" not in src.parts:
                _copy(src, dest / src.relative_to(REPO_ROOT), job)


def _dataset_refs(folder: Path) -> set[str]:
    from loom.profiling.profile import BLOCKS_CSV, CONFIGS_CSV

    refs: set[str] = set()
    for name in (BLOCKS_CSV, CONFIGS_CSV):
        path = folder / name
        if path.is_file():
            with path.open(newline="") as f:
                refs.update(row.get("partition", "") for row in csv.DictReader(f))
    return refs


def _rewrite_dataset(src: Path, dst: Path, rename: Mapping[str, str], *, annotate: dict[str, Any] | None = None,
                     runs_before: int = 0) -> None:
    """Copy a dataset folder, renaming partition refs in both CSVs and in meta.json.

    Only the ``partition`` cells change; every other cell is copied as text, so nothing
    is re-formatted. ``annotate``: added to each run after the first ``runs_before``.
    """
    from loom.profiling.profile import BLOCKS_CSV, CONFIGS_CSV, META_JSON, ProfileDataError

    dst.mkdir(parents=True, exist_ok=True)
    for name in (BLOCKS_CSV, CONFIGS_CSV):
        path = src / name
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            text = f.read()
        if text and not text.endswith("\n"):  # a row torn by a kill: dropped, as the profiler does
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = list(reader.fieldnames or [])
        rows = list(reader)
        with (dst / name).open("w", newline="") as f:
            # the profiler's own writer is a default csv.DictWriter: same dialect here
            writer = csv.DictWriter(f, fieldnames=header, extrasaction="raise")
            writer.writeheader()
            for n, row in enumerate(rows, start=1):
                if None in row:
                    raise ProfileDataError(f"{path}: row {n} has more fields than the header")
                if row.get("partition") is not None:
                    row["partition"] = rename.get(row["partition"], row["partition"])
                writer.writerow(row)
    meta_path = src / META_JSON
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        parts = meta.get("partitions")
        if isinstance(parts, dict):
            meta["partitions"] = {task: rename.get(ref, ref) for task, ref in parts.items()}
        if annotate:
            for run in meta.get("runs", [])[runs_before:]:
                run.update(annotate)
        (dst / META_JSON).write_text(json.dumps(meta, indent=1, sort_keys=False))


def stage_job(
    partitions: Sequence[Any],
    device_path: Path,
    dest: Path,
    *,
    dataset: Path | None = None,
) -> StagedJob:
    """Build the job folder ``dest`` (see the module docstring). ``dataset``: the dataset
    measured so far, sent so that the target resumes it (None: start afresh)."""
    from loom.profiling.profile import BLOCKS_CSV, CONFIGS_CSV, META_JSON, partition_ref

    job = StagedJob(root=dest)
    dest.mkdir(parents=True)
    _stage_source(dest, job)
    _copy(device_path, dest / "device.yaml", job)
    existing = _dataset_refs(dataset) if dataset is not None else set()
    ours = {partition_ref(p.root) for p in partitions}
    # the staged folder's name must not be one that other rows of the dataset already use
    staged = "staged"
    n = 0
    while any(r == staged or r.startswith(staged + "/") for r in existing - ours):
        n += 1
        staged = f"staged-{n}"
    families: dict[Path, str] = {}
    names: set[str] = set()
    for part in partitions:
        family = part.family()
        key = family.path.resolve()
        if key not in families:
            fam_name = family.task if family.task not in families.values() else f"{family.task}-{len(families)}"
            families[key] = fam_name
            _stage_family(family, dest / "families" / fam_name, job)
        name, i = part.task, 1
        while name in names:
            i += 1
            name = f"{part.task}-{i}"
        names.add(name)
        rel = f"{staged}/{name}"
        _stage_partition(part, dest / rel, f"../../families/{families[key]}/family.yaml", job)
        job.partitions.append(rel)
        job.refs[rel] = partition_ref(part.root)
    if dataset is not None and any((dataset / n).is_file() for n in (META_JSON, BLOCKS_CSV, CONFIGS_CSV)):
        # sent as it is (rows without a meta.json too): the target applies the profiler's
        # own rules to it, refusals included
        to_remote = {local: remote for remote, local in job.refs.items()}
        _rewrite_dataset(dataset, dest / "data", to_remote)
        if (dataset / META_JSON).is_file():
            job.runs_sent = len(json.loads((dataset / META_JSON).read_text()).get("runs", []))
    return job


def _pack(folder: Path, tar_path: Path) -> None:
    # GNU format: the one every tar reads (GNU tar, busybox, Android's toybox)
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(folder, arcname=folder.name)


def _unpack(tar_path: Path, dest: Path) -> None:
    with tarfile.open(tar_path) as tar:
        if hasattr(tarfile, "data_filter"):  # refuse links and paths out of dest (Python >= 3.11.4)
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - older Pythons
            tar.extractall(dest)  # noqa: S202


# -- the remote run -------------------------------------------------------------------------------------
def profile_command(
    job: StagedJob,
    *,
    python: str = "python3",
    warmup: int = 5,
    repeats: int = 30,
    config_samples: int = 20,
    seed: int = 0,
    resume: bool = True,
    allow_mixed: bool = False,
    processors: Sequence[str] | None = None,
) -> list[str]:
    """``python -m loom.cli profile ...`` as the target runs it, in the job folder."""
    argv = [python, "-m", "loom.cli", "profile", "--device", "device.yaml", "--out", "data",
            "--warmup", str(warmup), "--repeats", str(repeats), "--config-samples", str(config_samples),
            "--seed", str(seed)]
    for rel in job.partitions:
        argv += ["--partition", rel]
    for proc in processors or []:
        argv += ["--processor", proc]
    if allow_mixed:
        argv.append("--allow-mixed")
    if not resume:
        argv.append("--no-resume")
    return argv


def _map_back(refs: Mapping[str, str], seen: set[str]) -> dict[str, str]:
    """Target refs -> refs here: the staged names, also when the target wrote them as
    absolute paths (a sparseloom installed there shadowing the shipped source)."""
    rename = dict(refs)
    for ref in seen:
        for remote, local in refs.items():
            if ref.endswith(f"/{JOB}/{remote}"):
                rename[ref] = local
    return rename


def remote_profile(
    partitions: Sequence[Any],
    device: str | Path,
    out_dir: str | Path,
    target: str | Transport,
    *,
    remote_dir: str | None = None,
    python: str = "python3",
    warmup: int = 5,
    repeats: int = 30,
    config_samples: int = 20,
    seed: int = 0,
    resume: bool = True,
    allow_mixed: bool = False,
    processors: Sequence[str] | None = None,
    keep_remote: bool = False,
    timeout: float | None = None,
    progress: bool = True,
    runner: Runner | None = None,
) -> Any:
    """``profile_device`` on a target; the dataset lands in ``out_dir`` here. Returns it loaded.

    ``target``: ``ssh://user@host[:port]/path``, ``adb://SERIAL/path``, or a ``Transport``
    with ``remote_dir``. ``python``: the target's interpreter with sparseloom's
    dependencies. ``timeout``: seconds the profiling may take there (None: no limit).
    ``keep_remote``: leave ``path/loomjob`` on the target (to look at it, or rerun by
    hand). When the run there fails, the rows it measured are still brought back (the
    next run resumes them) and a ``RemoteError`` carries its stderr tail.
    """
    from loom.processors.device import load_device_profile, resolve_profile_path
    from loom.profiling.profile import META_JSON, load_profile_dataset

    if isinstance(target, Transport):
        if not remote_dir:
            raise ConfigError("remote_profile: a Transport target needs remote_dir")
        transport, root = target, remote_dir.rstrip("/")
        shown = f"{transport.target}{root}"
    else:
        transport, root = parse_target(target, runner=runner)
        shown = target
    if not partitions:
        raise ConfigError("remote_profile: no partitions to profile")
    device_path = resolve_profile_path(device)
    load_device_profile(device_path)  # a bad profile fails here, not after the upload
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job_dir = f"{root}/{JOB}"
    q = shlex.quote

    with tempfile.TemporaryDirectory(prefix="loom-remote-") as tmp:
        tmpdir = Path(tmp)
        job = stage_job(partitions, device_path, tmpdir / JOB, dataset=out if resume else None)
        _pack(job.root, tmpdir / f"{JOB}.tar")
        _say(progress, f"{shown}: staged {job.files} files ({job.bytes / 1e6:.1f} MB) for "
                       f"{len(job.partitions)} partition(s)")
        transport.check()
        transport.run(f"mkdir -p {q(root)} && rm -rf {q(job_dir)} {q(job_dir + '.tar')}")
        transport.put(tmpdir / f"{JOB}.tar", f"{job_dir}.tar")
        transport.run(f"cd {q(root)} && tar -xf {q(JOB + '.tar')} && rm -f {q(JOB + '.tar')}")
        argv = profile_command(job, python=python, warmup=warmup, repeats=repeats, config_samples=config_samples,
                               seed=seed, resume=resume, allow_mixed=allow_mixed, processors=processors)
        command = f"cd {q(job_dir)} && PYTHONPATH=. {shlex.join(argv)}"
        _say(progress, f"{shown}: {shlex.join(argv)}")
        failure: RemoteError | None = None
        try:
            transport.run(command, timeout=timeout, echo=progress)
        except RemoteError as exc:
            failure = exc
        try:
            back = _fetch(transport, job_dir, tmpdir)
        except RemoteError as exc:
            if failure is not None:  # the run's own error says more than "no dataset to fetch"
                raise failure from exc
            raise
        if back is not None:
            rename = _map_back(job.refs, _dataset_refs(back))
            checked = tmpdir / "checked"
            _rewrite_dataset(back, checked, rename, annotate={"remote": shown, "remote_python": python},
                             runs_before=job.runs_sent)
            runs_back = len(json.loads((checked / META_JSON).read_text()).get("runs", []))
            # after a failure, install only what the target added (a refused dataset comes back as it went)
            if failure is None or runs_back > job.runs_sent:
                load_profile_dataset(checked)  # ProfileDataError here: nothing here is touched
                _install(checked, out)
        if not keep_remote:
            with contextlib.suppress(RemoteError):  # the data is home; a leftover folder is not worth an error
                transport.run(f"rm -rf {q(job_dir)}")
        if failure is not None:
            raise failure
        if back is None:
            raise RemoteError(f"{shown}: the profile run finished but left no dataset in {job_dir}/data")
    return load_profile_dataset(out)


def _fetch(transport: Transport, job_dir: str, tmpdir: Path) -> Path | None:
    """The target's dataset folder, unpacked under ``tmpdir/back/data``; None when there is none."""
    q = shlex.quote
    listing = transport.run(f"cd {q(job_dir)} && if [ -f data/meta.json ]; then tar -cf data.tar data && echo yes; fi")
    if "yes" not in listing.split():
        return None
    transport.get(f"{job_dir}/data.tar", tmpdir / "data.tar")
    _unpack(tmpdir / "data.tar", tmpdir / "back")
    return tmpdir / "back" / "data"


def _install(src: Path, out: Path) -> None:
    """Put a checked dataset in place: each file copied beside its target, then renamed over it."""
    from loom.profiling.profile import BLOCKS_CSV, CONFIGS_CSV, META_JSON

    for name in (BLOCKS_CSV, CONFIGS_CSV, META_JSON):  # meta.json last: it vouches for the rows
        if (src / name).is_file():
            tmp = out / f".{name}.remote-tmp"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, out / name)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        from loom.core.progress import say

        say(message)
