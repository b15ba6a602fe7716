"""Profile blocks on another machine (a Jetson over SSH, a phone over adb) and bring the data back.

``loom profile --remote ssh://user@host[:port]/path`` (or ``adb://SERIAL/path``) stages
a job folder here (``loom.profiling.staging``), sends it as one tar file, unpacks it
under ``path/loomjob``, runs ``python -m loom.cli profile`` there, and brings the
dataset back, checked, into place here. The design (why the source travels, how rows
are merged and renamed): ``docs/profiling.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from loom.core.errors import ConfigError, RemoteError
from loom.core.progress import say
from loom.model.partition import Partition
from loom.processors.device import load_device_profile, resolve_profile_path
from loom.profiling.dataset import (
    BLOCKS_CSV,
    CONFIGS_CSV,
    META_JSON,
    ProfileDataset,
    load_profile_dataset,
)
from loom.profiling.staging import StagedJob, dataset_refs, pack, rewrite_dataset, stage_job, unpack
from loom.profiling.transport import Runner, Transport, parse_target

#: the job folder under the target's path; the only thing there this module creates or deletes
JOB = "loomjob"


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


def _resolve_target(target: str | Transport, remote_dir: str | None,
                    runner: Runner | None) -> tuple[Transport, str, str]:
    """(transport, folder on the target, how messages name the target)."""
    if isinstance(target, Transport):
        if not remote_dir:
            raise ConfigError("remote_profile: a Transport target needs remote_dir")
        root = remote_dir.rstrip("/")
        return target, root, f"{target.target}{root}"
    transport, root = parse_target(target, runner=runner)
    return transport, root, target


def _upload(transport: Transport, job: StagedJob, tar: Path, root: str) -> None:
    """Send the packed job and unpack it as ``root/loomjob`` (a previous one removed)."""
    q = shlex.quote
    job_dir = f"{root}/{JOB}"
    transport.check()
    transport.run(f"mkdir -p {q(root)} && rm -rf {q(job_dir)} {q(job_dir + '.tar')}")
    transport.put(tar, f"{job_dir}.tar")
    transport.run(f"cd {q(root)} && tar -xf {q(JOB + '.tar')} && rm -f {q(JOB + '.tar')}")


def _fetch(transport: Transport, job_dir: str, tmpdir: Path) -> Path | None:
    """The target's dataset folder, unpacked under ``tmpdir/back/data``; None when there is none."""
    q = shlex.quote
    listing = transport.run(f"cd {q(job_dir)} && if [ -f data/meta.json ]; then tar -cf data.tar data && echo yes; fi")
    if "yes" not in listing.split():
        return None
    transport.get(f"{job_dir}/data.tar", tmpdir / "data.tar")
    unpack(tmpdir / "data.tar", tmpdir / "back")
    return tmpdir / "back" / "data"


def _run_there(transport: Transport, argv: list[str], job_dir: str, tmpdir: Path, *, timeout: float | None,
               echo: bool) -> tuple[Path | None, RemoteError | None]:
    """Run ``argv`` in the job folder, then fetch the dataset it left, also after a failure
    (the rows it measured come back); the dataset (None: none) and the run's error."""
    failure: RemoteError | None = None
    try:
        transport.run(f"cd {shlex.quote(job_dir)} && PYTHONPATH=. {shlex.join(argv)}", timeout=timeout, echo=echo)
    except RemoteError as exc:
        failure = exc
    try:
        return _fetch(transport, job_dir, tmpdir), failure
    except RemoteError as exc:
        if failure is not None:  # the run's own error says more than "no dataset to fetch"
            raise failure from exc
        raise


def _install(src: Path, out: Path) -> None:
    """Put a checked dataset in place: each file copied beside its target, then renamed over it."""
    for name in (BLOCKS_CSV, CONFIGS_CSV, META_JSON):  # meta.json last: it vouches for the rows
        if (src / name).is_file():
            tmp = out / f".{name}.remote-tmp"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, out / name)


def _take_back(back: Path, job: StagedJob, out: Path, tmpdir: Path, *, annotate: dict[str, str],
               failed: bool) -> None:
    """Rename the returned rows' partitions to ours, check the dataset, and install it in
    ``out``; after a failure only when the target added a run (a refused dataset comes
    back as it went)."""
    checked = tmpdir / "checked"
    rewrite_dataset(back, checked, _map_back(job.refs, dataset_refs(back)), annotate=annotate,
                    runs_before=job.runs_sent)
    runs_back = len(json.loads((checked / META_JSON).read_text()).get("runs", []))
    if not failed or runs_back > job.runs_sent:
        load_profile_dataset(checked)  # ProfileDataError here: nothing here is touched
        _install(checked, out)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        say(message)


def remote_profile(
    partitions: Sequence[Partition],
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
) -> ProfileDataset:
    """``profile_device`` on a target; the dataset lands in ``out_dir`` here. Returns it loaded.

    ``target``: ``ssh://user@host[:port]/path``, ``adb://SERIAL/path``, or a ``Transport``
    with ``remote_dir``. ``python``: the target's interpreter with sparseloom's
    dependencies. ``timeout``: seconds the profiling may take there (None: no limit).
    ``keep_remote``: leave ``path/loomjob`` on the target (to look at it, or rerun by
    hand). When the run there fails, the rows it measured are still brought back (the
    next run resumes them) and a ``RemoteError`` carries its stderr tail.
    """
    transport, root, shown = _resolve_target(target, remote_dir, runner)
    if not partitions:
        raise ConfigError("remote_profile: no partitions to profile")
    device_path = resolve_profile_path(device)
    load_device_profile(device_path)  # a bad profile fails here, not after the upload
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job_dir = f"{root}/{JOB}"

    with tempfile.TemporaryDirectory(prefix="loom-remote-") as tmp:
        tmpdir = Path(tmp)
        job = stage_job(partitions, device_path, tmpdir / JOB, dataset=out if resume else None)
        pack(job.root, tmpdir / f"{JOB}.tar")
        _say(progress, f"{shown}: staged {job.files} files ({job.bytes / 1e6:.1f} MB) for "
                       f"{len(job.partitions)} partition(s)")
        _upload(transport, job, tmpdir / f"{JOB}.tar", root)
        argv = profile_command(job, python=python, warmup=warmup, repeats=repeats, config_samples=config_samples,
                               seed=seed, resume=resume, allow_mixed=allow_mixed, processors=processors)
        _say(progress, f"{shown}: {shlex.join(argv)}")
        back, failure = _run_there(transport, argv, job_dir, tmpdir, timeout=timeout, echo=progress)
        if back is not None:
            _take_back(back, job, out, tmpdir, annotate={"remote": shown, "remote_python": python},
                       failed=failure is not None)
        if not keep_remote:
            with contextlib.suppress(RemoteError):  # the data is home; a leftover folder is not worth an error
                transport.run(f"rm -rf {shlex.quote(job_dir)}")
        if failure is not None:
            raise failure
        if back is None:
            raise RemoteError(f"{shown}: the profile run finished but left no dataset in {job_dir}/data")
    return load_profile_dataset(out)
