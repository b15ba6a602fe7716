"""Progress for long work, on stderr, without a dependency.

On a terminal it redraws one line; in a log (CI, a pipe) it prints a line every
few percent so that the log shows the work moving without drowning in it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, label: str, *, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = max(1, total)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self.start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_pct = -100

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        pct = 100 * self.done // self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        line = f"{self.label}: {self.done}/{self.total} ({pct}%) {elapsed:.0f}s elapsed, ~{eta:.0f}s left {note}"
        if self._tty:
            self.stream.write("\r" + line[:150].ljust(150))
            if self.done >= self.total:
                self.stream.write("\n")
        elif pct - self._last_pct >= 10 or self.done >= self.total:
            self.stream.write(line + "\n")
            self._last_pct = pct
        self.stream.flush()


def say(msg: str, *, stream: TextIO | None = None) -> None:
    """One line of status on stderr (stdout is kept for tables and results)."""
    print(msg, file=stream or sys.stderr, flush=True)
