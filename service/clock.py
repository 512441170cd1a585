"""Service time: the clock retention, export back-off, series quiet periods and ``Retry-After`` run on.

The wall clock jumps: a device boots with a stale RTC and NTP corrects it by weeks, or someone sets it
by hand. Timestamps compared across such a jump would delete fresh results (a forward jump) or hold
deliveries back for as long as the clock was ahead (a backward one). Service time does not jump:

- While the service runs it advances with ``time.monotonic()`` (seconds elapsed, never stepped; NTP's
  frequency slew applies to both clocks alike).
- It is persisted in ``<data_dir>/clock.json`` (at most every :data:`SAVE_EVERY_S` seconds, and at every
  jump) with its offset from the wall clock, so after a restart it continues from the wall clock plus
  that offset; it never starts earlier than the last time saved, nor than the newest timestamp in the
  database (``floor``): a clock set back while the service was stopped is absorbed too.
- It starts equal to the wall clock (offset 0), so a database written before service time existed keeps
  its meaning.

A jump is a change of more than :data:`JUMP_S` seconds between the wall clock and service time from one
reading to the next. It is logged once, counted, and shown in ``/readyz`` (:meth:`ServiceClock.describe`);
it changes nothing else: nothing is deleted or delayed by it. Time spent stopped counts by the wall
clock, so a clock that moved forward while the service was stopped cannot be told from downtime (the
one case this cannot absorb; ``/readyz`` shows whether the clock is synchronised).

Timestamps shown to people (``/v1/exports``) are converted back to the wall clock (:meth:`wall_of`).
The wall and monotonic sources are this module's :func:`wall_time` and :func:`monotonic_time`, looked
up at each call, so tests fake them; nothing here ever sets the machine's clock.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from retinaedge.device.timesync import time_sync

log = logging.getLogger(__name__)

#: A change (s) of the wall clock against elapsed time, between two readings, that counts as a jump.
JUMP_S = 30.0
#: Service time is saved at most this often (s), and at every jump.
SAVE_EVERY_S = 10.0
#: How long (s) the synchronisation state read from the kernel is reused.
SYNC_EVERY_S = 60.0
CLOCK_FILE = "clock.json"


def wall_time() -> float:
    """The wall clock, epoch seconds (a function so that tests can fake it)."""
    return time.time()


def monotonic_time() -> float:
    """Elapsed seconds that never jump (a function so that tests can fake it)."""
    return time.monotonic()


class ServiceClock:
    """Service time in epoch seconds (see the module docstring); thread-safe. ``path`` None keeps
    nothing on disk (tests)."""

    def __init__(self, path: Path | None = None, *, floor: float = -math.inf) -> None:
        self.path = path
        self._lock = threading.Lock()
        wall, mono = wall_time(), monotonic_time()
        saved_at, offset = self._load()
        candidate = wall + offset
        last = max(saved_at, floor)
        self.jumps = 0
        self.last_jump: dict[str, Any] | None = None
        if candidate < last:  # the wall clock is behind the time last recorded: absorb it
            if last - candidate > JUMP_S:
                self._jumped(wall, -(last - candidate), "while the service was stopped")
            candidate = last
        self._start, self._mono0 = candidate, mono
        self._offset = candidate - wall  # service time - wall clock
        self._saved_mono = -math.inf
        self._save_failed = False
        self._sync: tuple[float, dict[str, object]] | None = None
        self._save(candidate, mono)

    # -- reading --------------------------------------------------------------------------------------
    def now(self) -> float:
        """Service time now (epoch seconds); notices, logs and counts a wall-clock jump."""
        mono, wall = monotonic_time(), wall_time()
        with self._lock:
            now = self._start + (mono - self._mono0)
            offset = now - wall
            if abs(offset - self._offset) > JUMP_S:
                self._jumped(wall, self._offset - offset, "while running")
                self._saved_mono = -math.inf  # save at once
            self._offset = offset
            if mono - self._saved_mono >= SAVE_EVERY_S:
                self._save(now, mono)
        return now

    __call__ = now

    def wall_of(self, t: float | None) -> float | None:
        """A service timestamp as the wall clock reads now (for people); None stays None."""
        if t is None:
            return None
        with self._lock:
            return t - self._offset

    def describe(self) -> dict[str, Any]:
        """For ``/readyz``: whether the system clock is synchronised, service time's offset from it (s),
        and the jumps seen since start (the last one with when, by how much and where)."""
        self.now()
        mono = monotonic_time()
        with self._lock:
            if self._sync is None or mono - self._sync[0] > SYNC_EVERY_S:
                self._sync = (mono, time_sync().to_json())
            return {
                **self._sync[1],
                "offset_s": round(self._offset, 3),
                "jumps": self.jumps,
                "last_jump": self.last_jump,
            }

    def close(self) -> None:
        """Save service time (at shutdown)."""
        now = self.now()
        with self._lock:
            self._save(now, monotonic_time())

    # -- internals ------------------------------------------------------------------------------------
    def _jumped(self, wall: float, by_s: float, when: str) -> None:
        self.jumps += 1
        self.last_jump = {"wall_time": wall, "by_s": round(by_s, 3), "when": when}
        log.warning(
            "the wall clock jumped by %+.0f s %s; retention, export back-off and series timing run on "
            "elapsed time and are not affected (nothing is deleted or delayed by the jump)",
            by_s,
            when,
        )

    def _load(self) -> tuple[float, float]:
        """``(service time saved, offset)``; ``(-inf, 0)`` when nothing usable is saved."""
        if self.path is None:
            return -math.inf, 0.0
        try:
            data = json.loads(self.path.read_text())
            return float(data["service_time"]), float(data["offset_s"])
        except FileNotFoundError:
            return -math.inf, 0.0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s cannot be read (%s); service time starts from the wall clock", self.path, exc)
            return -math.inf, 0.0

    def _save(self, now: float, mono: float) -> None:
        """Write service time and its offset (atomically); a storage error is logged once, not raised."""
        self._saved_mono = mono
        if self.path is None:
            return
        part = self.path.with_suffix(".part")
        try:
            part.write_text(json.dumps({"service_time": now, "offset_s": now - wall_time()}))
            os.replace(part, self.path)
        except OSError as exc:
            if not self._save_failed:
                log.warning("service time cannot be saved to %s (%s)", self.path, exc.strerror or exc)
            self._save_failed = True
            return
        self._save_failed = False
