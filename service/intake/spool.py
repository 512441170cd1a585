"""The spool: received instances on disk, fsynced before they are acknowledged.

File names are random (never derived from tag values). A write goes to ``*.part``, is fsynced, renamed
and the directory fsynced, so a crash leaves either nothing or a complete file. A full disk (ENOSPC,
EDQUOT) while writing or syncing is :class:`InsufficientStorageError` (507), like the reserve; any other
OSError (a read-only remount, EIO) is :class:`StorageUnavailableError` (503 with ``Retry-After``, A700).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

from retinaedge.runtime.errors import InsufficientStorageError, StorageUnavailableError

log = logging.getLogger(__name__)

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def no_space(exc: OSError, where: Path) -> InsufficientStorageError | None:
    """The 507 for an OSError that means a full disk or quota, else None."""
    if exc.errno in NO_SPACE:
        return InsufficientStorageError(f"the disk of {where} is full ({exc.strerror})")
    return None


def storage_error(exc: OSError, where: Path) -> InsufficientStorageError | StorageUnavailableError:
    """What a client is answered for an OSError of the spool: 507 for a full disk or quota, else 503
    with ``Retry-After`` (a read-only remount, an I/O error, anything else: nothing was stored)."""
    return no_space(exc, where) or StorageUnavailableError(
        f"the spool {where} cannot be written ({exc.strerror or type(exc).__name__})"
    )


class Spool:
    """A directory of received instances; ``min_free_bytes`` is the disk reserve kept free."""

    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.part"):  # interrupted writes were never acknowledged
            try:
                if stale.is_file():
                    stale.unlink(missing_ok=True)
            except OSError as exc:  # a read-only volume: /readyz says the spool is not writable
                log.warning("a stale spool part cannot be removed (%s)", exc.strerror or exc)
                break

    def unwritable_reason(self) -> str | None:
        """Why nothing can be spooled now (a probe file cannot be created, written and fsynced), or None.

        A real write, not ``os.access``: permission bits say nothing for root, nor about a read-only
        remount, a full disk or a spool directory that was replaced or removed.
        """
        probe = self.root / f".probe-{uuid.uuid4().hex}"
        try:
            with open(probe, "wb") as fh:
                fh.write(b"probe")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            return f"the spool directory {self.root} is not writable ({exc.strerror or type(exc).__name__})"
        finally:
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass
        return None

    def reserve_reason(self) -> str | None:
        """Why new instances are refused for space now (the disk is inside ``min_free_bytes``), or None."""
        try:
            free = self.free_bytes()
        except OSError as exc:
            return f"the free space of {self.root} cannot be read ({exc.strerror or type(exc).__name__})"
        if free < self.min_free_bytes:
            return (
                f"the disk of {self.root} has {free} bytes free, below the {self.min_free_bytes}-byte reserve "
                "(min_free_bytes): new instances are refused with 507"
            )
        return None

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def room(self) -> int:
        """Bytes that may still be written before the reserve is reached (negative once inside it)."""
        return self.free_bytes() - self.min_free_bytes

    def check_reserve(self, incoming: int = 0) -> None:
        """Raise 507 when writing ``incoming`` more bytes would eat into the reserve (503 when the free
        space cannot be read)."""
        try:
            free = self.free_bytes()
        except OSError as exc:
            raise storage_error(exc, self.root) from exc
        if free - incoming < self.min_free_bytes:
            raise InsufficientStorageError(
                f"the spool disk has {free} bytes free; {self.min_free_bytes} are kept in reserve"
            )

    def open_part(self) -> tuple[Path, BinaryIO]:
        name = uuid.uuid4().hex
        path = self.root / f"{name}.part"
        try:
            return path, open(path, "wb")  # noqa: SIM115 (closed by commit/discard)
        except OSError as exc:
            raise storage_error(exc, self.root) from exc

    def write(self, fh: BinaryIO, data: bytes) -> None:
        """Append ``data`` to an open part (507 when the disk is full)."""
        try:
            fh.write(data)
        except OSError as exc:
            raise storage_error(exc, self.root) from exc

    def commit(self, part: Path, fh: BinaryIO) -> Path:
        """fsync and rename ``part`` to its final name; return it (507 when the disk is full, 503 for any
        other storage error: then neither the part, which the caller discards, nor the final name is
        left, since nothing was acknowledged)."""
        final = part.with_suffix(".dcm")
        try:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.replace(part, final)
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self.discard(final)
            raise storage_error(exc, self.root) from exc
        return final

    def discard(self, path: Path, fh: BinaryIO | None = None) -> None:
        """Close and remove a part or a spooled file; never raises (it runs on failure paths)."""
        if fh is not None and not fh.closed:
            try:
                fh.close()  # flushes: on a full disk this fails too, and the file goes all the same
            except OSError:
                pass
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass

    def files(self) -> list[Path]:
        """The spooled instances: regular ``*.dcm`` files (anything else so named, a directory say, is
        left alone with a warning: it was never written here)."""
        out = []
        for path in sorted(self.root.glob("*.dcm")):
            if path.is_file() and not path.is_symlink():
                out.append(path)
            else:
                log.warning("the spool holds %s, which is not a regular file: left alone", path.name)
        return out
