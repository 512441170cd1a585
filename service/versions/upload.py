"""A bundle archive uploaded for staging (``POST /v1/models/{name}/versions``), kept within the data volume.

Staging an upload takes at most the archive plus its unpacked files on the data volume, never more:

1. the archive is received into ``<data_dir>/models/.uploads/`` (at most ``max_bundle_bytes``; the room
   for its declared length is checked before a byte is written, and the reserve again every
   :data:`CHECK_EVERY` bytes as it arrives, for a body of undeclared length);
2. its headers are read and the room for its unpacked size checked *before* a file is unpacked
   (:func:`.archive.unpack`), then it is unpacked beside it and the archive removed;
3. the unpacked files are *moved* (same volume: a rename, no copy) into the model's versions
   (:meth:`.registry.ModelVersions.stage` with ``move``).

:class:`Room` refuses a step that would leave less than the reserve (``min_free_bytes``) free with a 507
``insufficient-storage`` saying what was needed, what is free and the reserve; a refused upload leaves
nothing behind.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from retinaedge.runtime.errors import InsufficientStorageError, PayloadTooLargeError
from retinaedge.service.intake.spool import storage_error
from retinaedge.service.versions.archive import unpack

log = logging.getLogger(__name__)

#: How often the reserve is checked again while an archive arrives (bytes).
CHECK_EVERY = 8 * 1024**2


class Room:
    """The free space of the volume of ``root`` beyond its ``reserve`` (bytes)."""

    def __init__(self, root: Path, reserve: int) -> None:
        self.root = root
        self.reserve = reserve

    def free(self) -> int:
        try:
            return shutil.disk_usage(self.root).free
        except OSError as exc:
            raise storage_error(exc, self.root) from exc

    def check(self, incoming: int, what: str) -> None:
        """507 when writing ``incoming`` more bytes (``what`` they are) would eat into the reserve."""
        free = self.free()
        if free - incoming < self.reserve:
            raise InsufficientStorageError(
                f"staging needs {incoming} bytes more on the data volume for {what}; {free} bytes are free "
                f"and {self.reserve} are kept in reserve (min_free_bytes): free space, or stage a smaller "
                "bundle"
            )


async def receive(chunks: AsyncIterator[bytes], archive: Path, max_bytes: int, room: Room) -> int:
    """Write the archive arriving as ``chunks`` to ``archive`` (413 beyond ``max_bytes``, 507 once it
    would eat into the reserve); returns its size."""
    total = next_check = 0
    with open(archive, "wb") as fh:
        async for chunk in chunks:
            if total >= next_check:  # the first chunk, then every CHECK_EVERY bytes
                room.check(len(chunk), "the archive as it arrives")
                next_check = total + CHECK_EVERY
            total += len(chunk)
            if total > max_bytes:
                raise PayloadTooLargeError(f"the archive exceeds max_bundle_bytes ({max_bytes})")
            try:
                fh.write(chunk)
            except OSError as exc:
                raise storage_error(exc, archive.parent) from exc
    return total


def unpack_archive(archive: Path, dest: Path, max_bytes: int, room: Room) -> list[str]:
    """Unpack ``archive`` into the empty directory ``dest`` once its unpacked size is known to fit (507
    otherwise, nothing unpacked), then remove the archive; returns the file names."""
    try:
        names = unpack(archive, dest, max_bytes, room=lambda size: room.check(size, "its unpacked files"))
    except OSError as exc:
        raise storage_error(exc, dest) from exc
    archive.unlink()
    return names
