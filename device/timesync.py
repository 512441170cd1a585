"""Whether the system clock is synchronised (NTP or PTP), read-only: the kernel's ``adjtimex`` state.

``adjtimex(2)`` with ``modes = 0`` only reads (no capability is needed and nothing changes); it returns
the clock state, ``TIME_ERROR`` (5) while ``STA_UNSYNC`` is set, that is while no time daemon has told
the kernel the clock is synchronised. This module never sets the clock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: adjtimex's return value while the clock is not synchronised (``STA_UNSYNC``).
TIME_ERROR = 5
#: ``struct timex`` is 208 bytes on 64-bit Linux; a larger zeroed buffer is safe (modes = 0: read only).
_TIMEX_BYTES = 512


@dataclass(frozen=True)
class TimeSync:
    """``synchronised`` True/False, or None when it cannot be read here; ``source`` says how it was read."""

    synchronised: bool | None
    source: str

    def to_json(self) -> dict[str, object]:
        return {"synchronised": self.synchronised, "source": self.source}


def time_sync() -> TimeSync:
    """The kernel's view of the system clock (never raises)."""
    if not sys.platform.startswith("linux"):
        return TimeSync(None, "unknown on this platform")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        buf = ctypes.create_string_buffer(_TIMEX_BYTES)  # zeroed: modes = 0, read only
        state = int(libc.adjtimex(buf))
    except (OSError, AttributeError) as exc:
        log.debug("adjtimex unavailable: %s", exc)
        return TimeSync(None, "adjtimex unavailable")
    if state < 0:
        return TimeSync(None, f"adjtimex failed (errno {ctypes.get_errno()})")
    return TimeSync(state != TIME_ERROR, "adjtimex")
