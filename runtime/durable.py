"""Durable writes: flush a file's or a directory's entry to the disk (so a rename inside it survives a
power cut). One helper for the engine cache, the captures, the built documents and the outbox."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync ``path``, a file or a directory (a directory: so that a rename or a new entry in it is
    durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
