"""Typed errors. Every error sparseloom raises on bad input is a ``LoomError``.

Each subclass also subclasses the builtin a caller would naturally catch, so
``except ValueError`` keeps working for code that does not know sparseloom.
"""

from __future__ import annotations


class LoomError(Exception):
    """Base of every error sparseloom raises on purpose."""


class ManifestError(LoomError, ValueError):
    """A family manifest (``family.yaml``) is malformed. The message names the file and field."""


class ConfigError(LoomError, ValueError):
    """A YAML config or a device profile is malformed. The message names the file and field."""


class ModelError(LoomError, ValueError):
    """An ONNX file cannot be read, fails the checker, or lacks what is needed."""


class AlignmentError(LoomError, ValueError):
    """The variants of a family cannot be cut at the same places (or a cut changed meaning)."""


class UnsupportedOpsError(LoomError, NotImplementedError):
    """A backend cannot run some ops of a block. ``ops`` lists every one of them."""

    def __init__(self, backend: str, block: str, ops: list[str]) -> None:
        self.backend = backend
        self.block = block
        self.ops = sorted(set(ops))
        super().__init__(
            f"backend {backend!r} cannot run {len(self.ops)} op type(s) of {block}: "
            + ", ".join(self.ops)
        )


class BackendUnavailableError(LoomError, RuntimeError):
    """A backend is known but cannot run here (package, hardware or provider missing)."""


class MissingDependencyError(LoomError, ImportError):
    """An optional package is not installed. The message says what to pip install."""


class BackendError(LoomError, RuntimeError):
    """A backend failed while loading or running a block. Names the block and backend."""


class NotFittedError(LoomError, AttributeError):
    """An estimator was used before ``fit``."""


class ProfileMismatchError(LoomError, ValueError):
    """A profile dataset was measured on other hardware or software than this run. Names what differs."""


class SloUnservableError(LoomError, RuntimeError):
    """No candidate plan can serve a request within its SLO and the runtime rejects such requests."""


class OverloadError(SloUnservableError):
    """A request shed under overload: predicted to end far past its deadline, or its deadline
    passed while it waited (``on_unservable: reject``). It counts as a violation."""


class InputError(LoomError, ValueError):
    """A request's inputs are not what its task takes: not a mapping, an input missing or
    unknown, not a numpy array, or of the wrong dtype, rank or shape. Names the task and the input."""


class RuntimeClosedError(LoomError, RuntimeError):
    """The runtime was closed: no new requests, and requests cancelled by ``close(cancel=True)``."""


class RemoteError(LoomError, RuntimeError):
    """Work on another machine failed: it could not be reached, or a command there failed.

    Names the target (``ssh:user@host:22``, ``adb:SERIAL``), the failing command, its exit
    status and the tail of its stderr.
    """


class BlockIntegrityError(LoomError, ValueError):
    """A stored block's bytes do not hash to what the block store recorded (or the file is
    gone). Names the block and the file."""
