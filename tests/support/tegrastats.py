"""Recorded tegrastats lines (tests/fixtures/device/tegrastats) and a stand-in that replays them."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

from support.paths import DEVICE_FIXTURES

TEGRASTATS = DEVICE_FIXTURES / "tegrastats"

STAND_IN = """#!{python}
# Stand-in for tegrastats: replays recorded lines every --interval ms until terminated.
import os, sys, time
open({pidfile!r}, "w").write(str(os.getpid()))
interval = float(sys.argv[sys.argv.index("--interval") + 1]) / 1000
lines = [l for l in open({fixture!r}) if l.strip() and not l.startswith("#")]
i = 0
while True:
    sys.stdout.write(lines[i % len(lines)])
    sys.stdout.flush()
    i += 1
    time.sleep(interval)
"""


def recorded(name: str) -> list[str]:
    """The recorded tegrastats lines of fixture ``name`` (comments left out)."""
    return [line for line in (TEGRASTATS / f"{name}.txt").read_text().splitlines() if line and line[0] != "#"]


def make_stand_in(tmp_path: Path, fixture: str) -> tuple[Path, Path]:
    """An executable tegrastats stand-in replaying ``fixture``; returns it and the file it writes its pid to."""
    script = tmp_path / "tegrastats"
    pidfile = tmp_path / "pid"
    script.write_text(
        STAND_IN.format(
            python=sys.executable, pidfile=str(pidfile), fixture=str(TEGRASTATS / f"{fixture}.txt")
        )
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, pidfile
