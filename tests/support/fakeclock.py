"""A faked wall clock and monotonic clock for service time (:mod:`retinaedge.service.clock`).

Both follow the real clocks, shifted: :meth:`FakeTime.jump` moves the wall clock only (what NTP or a
person setting the clock does), :meth:`FakeTime.elapse` moves both (time passing). The machine's clock
is never touched: in this process, ``time.time`` is replaced (every reader of the wall clock sees the
jumps, as on a device whose clock NTP steps) and so is the monotonic source of service time (so that
time can pass quickly for retention and back-off, without speeding up every timeout in the process).
"""

from __future__ import annotations

import time
from typing import Any

_REAL_TIME = time.time


class FakeTime:
    """``wall_shift`` and ``mono_shift`` in seconds, added to the real clocks."""

    def __init__(self, wall_shift: float = 0.0) -> None:
        self.wall_shift = wall_shift
        self.mono_shift = 0.0

    def wall(self) -> float:
        return _REAL_TIME() + self.wall_shift

    def mono(self) -> float:
        return time.monotonic() + self.mono_shift

    def jump(self, seconds: float) -> None:
        """The wall clock is set by ``seconds`` (positive: forward); no time passes."""
        self.wall_shift += seconds

    def elapse(self, seconds: float) -> None:
        """``seconds`` pass (both clocks advance)."""
        self.wall_shift += seconds
        self.mono_shift += seconds

    def install(self, monkeypatch: Any) -> FakeTime:
        """Make the process read this wall clock and service time this monotonic clock (for the test's
        duration)."""
        monkeypatch.setattr(time, "time", self.wall)
        try:
            from retinaedge.service import clock
        except ImportError:  # code before service time: the wall clock alone
            return self
        monkeypatch.setattr(clock, "monotonic_time", self.mono)
        return self
