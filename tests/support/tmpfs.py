"""A small tmpfs for tests of a full or failing disk (needs root: CI runs as root; elsewhere skipped)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def mounted_tmpfs(where: Path, size: str = "20m", why: str = "this test") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at the new directory ``where``, unmounted (lazily) afterwards; the test
    is skipped, saying ``why`` needs it, when it cannot be mounted."""
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs for {why} needs root")
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
