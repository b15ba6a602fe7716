"""Reaching a remote target: run a shell command there, send a file, fetch a file.

``SshTransport`` runs OpenSSH's ``ssh``/``scp`` non-interactively, ``AdbTransport`` runs
``adb push/pull/shell``; both as local subprocesses through an injectable ``Runner``
(tests need no device). Any failure is a ``RemoteError`` naming the target, the command
and its stderr tail.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Protocol
from urllib.parse import urlsplit

from loom.core.errors import ConfigError, RemoteError

#: a target path: absolute, plain characters (it goes into scp specs and shell commands)
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_.+/-]*[A-Za-z0-9_.+-]$")
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
