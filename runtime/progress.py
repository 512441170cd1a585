"""A progress line on stderr for long command-line jobs (no dependency).

On a terminal it redraws one line in place (``label [#####.....] 12/40 3.1/s``); otherwise (a log file,
CI) it writes a plain line at most every ``every_s`` seconds and at the end, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO


class Progress:
    """Count ``total`` steps of a job called ``label``; ``update(n)`` after each step, ``close()`` at the end."""

    def __init__(
        self, label: str, total: int, *, stream: TextIO | None = None, width: int = 30, every_s: float = 5.0
    ) -> None:
        self.label = label
        self.total = max(0, int(total))
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.every_s = every_s
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._started = time.monotonic()
        self._last_plain = self._started
        self._closed = False

    def render(self) -> str:
        """The current line: label, bar, count and rate (steps per second)."""
        filled = self.width if self.total == 0 else int(self.width * min(self.done, self.total) / self.total)
        elapsed = max(time.monotonic() - self._started, 1e-9)
        bar = "#" * filled + "." * (self.width - filled)
        return f"{self.label} [{bar}] {self.done}/{self.total} {self.done / elapsed:.1f}/s"

    def update(self, steps: int = 1) -> None:
        """Record ``steps`` more finished steps and redraw (or write a plain line when due)."""
        self.done += steps
        now = time.monotonic()
        if self._tty:
            self.stream.write("\r" + self.render())
            self.stream.flush()
        elif now - self._last_plain >= self.every_s:
            self._last_plain = now
            self.stream.write(self.render() + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Write the final state and end the line (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.stream.write(("\r" if self._tty else "") + self.render() + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
