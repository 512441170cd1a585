"""A bundle uploaded as a tar archive (``application/x-tar``, gzip-compressed or not), unpacked safely.

A bundle is a flat directory of regular files, so the archive may hold only regular files with plain
names (a leading ``./`` or one top-level folder is allowed and dropped): no links, devices, absolute or
``..`` paths, at most :data:`MAX_FILES` files and ``max_bytes`` unpacked. Anything else is refused with
a :class:`~retinaedge.runtime.errors.BundleRejectedError` saying what, before a byte is written.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from retinaedge.runtime.errors import BundleRejectedError

MAX_FILES = 64


def _plain_name(member: tarfile.TarInfo, top: str | None) -> str:
    parts = [p for p in PurePosixPath(member.name).parts if p not in (".", "")]
    if top is not None and len(parts) == 2 and parts[0] == top:
        parts = parts[1:]
    if len(parts) != 1 or parts[0] in ("..",) or member.name.startswith("/"):
        raise BundleRejectedError(f"the archive member {member.name!r} is not a plain file name of a bundle")
    return parts[0]


def unpack(
    archive: Path, dest: Path, max_bytes: int, room: Callable[[int], None] = lambda _size: None
) -> list[str]:
    """Unpack the bundle archive ``archive`` into the empty directory ``dest``; returns the file names.
    ``room(size)`` is called with the unpacked size once every header is read and checked, before a byte
    is written (it raises to refuse: the data volume's reserve)."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members: list[tarfile.TarInfo] = []
            while (member := tar.next()) is not None:  # headers one by one, counted as they come
                members.append(member)
                if len(members) > 2 * MAX_FILES:
                    raise BundleRejectedError(f"the archive holds more than {2 * MAX_FILES} entries")
            files = [m for m in members if not m.isdir()]
            if not files:
                raise BundleRejectedError("the archive holds no files")
            if len(files) > MAX_FILES:
                raise BundleRejectedError(f"the archive holds {len(files)} files (at most {MAX_FILES})")
            bad = [m.name for m in files if not m.isreg()]
            if bad:
                raise BundleRejectedError(f"the archive holds links or special files ({bad[0]!r})")
            total = sum(m.size for m in files)
            if total > max_bytes:
                raise BundleRejectedError(f"the archive unpacks to {total} bytes (at most {max_bytes})")
            tops = {PurePosixPath(m.name).parts[0] for m in files if len(PurePosixPath(m.name).parts) == 2}
            top = next(iter(tops)) if len(tops) == 1 else None
            names = [_plain_name(m, top) for m in files]
            if len(set(names)) != len(names):
                raise BundleRejectedError("the archive holds two files of one name")
            room(total)
            for member, name in zip(files, names, strict=True):
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                with source, open(dest / name, "xb") as out:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
            return names
    except tarfile.TarError as exc:
        raise BundleRejectedError(f"the body is not a readable tar archive ({exc})") from exc
