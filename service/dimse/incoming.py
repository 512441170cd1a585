"""One C-STORE's data set, written into a spool part fragment by fragment as it arrives.

pynetdicom would assemble each data set in memory (and the handler copied it twice more), so the SCP's
memory grew with the instances peers sent at once. :class:`IncomingInstance` is opened on the connection's
DUL thread once the C-STORE-RQ's command set is complete (:mod:`.stream`): it writes the preamble and the
File Meta Information (from the request's UIDs and the presentation context's transfer syntax), then each
data fragment as pynetdicom decodes it. Memory per association is then a few PDUs, whatever the instance's
size.

Refusals happen while it streams, without writing further: the backlog is full (``admit``), the disk
reserve (``min_free_bytes``) would be reached by the next :data:`RESERVE_STEP` bytes (checked before
each step is written, so the reserve itself is never used), the instance grows beyond
``max_body_bytes``, or the disk fails. The rest of the data set is then read and dropped, and the handler
answers with the refusal (:meth:`.receive.Receiver.receive_instance`) once the message is complete, as
DIMSE requires.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from retinaedge.service.intake.ingest import CANNOT_UNDERSTAND, OUT_OF_RESOURCES
from retinaedge.service.intake.spool import Spool

log = logging.getLogger(__name__)

#: The disk reserve is checked before each step of this many bytes is written.
RESERVE_STEP = 8 * 1024 * 1024


class IncomingInstance:
    """A data set arriving into a spool part; the file-like object pynetdicom's DIMSE message writes to.

    pynetdicom calls :meth:`write` with each data fragment, ``file.flush()`` after it, and after the
    C-STORE handler :meth:`close` and ``os.unlink(name)``: ``name`` is the part's path, which no longer
    exists once the handler has committed it (renamed to ``.dcm``), and is removed on every other path.
    """

    def __init__(self, spool: Spool, max_bytes: int) -> None:
        self.spool = spool
        self.max_bytes = max_bytes
        self.size = 0  # bytes of the file: preamble, File Meta Information, data set (also those dropped)
        self.refusal: tuple[int, str] | None = None  # (status, why) when refused while streaming
        self.error: BaseException | None = None  # a storage or backlog error to report (the Receiver maps it)
        self.path: Path | None = None
        self._fh: BinaryIO | None = None
        self._checked_to = 0  # bytes the reserve was last checked for
        self._taken = False

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else ""

    @property
    def file(self) -> IncomingInstance:
        return self

    @property
    def refused(self) -> bool:
        return self.refusal is not None or self.error is not None

    def start(
        self, sop_class: str, sop_instance: str, transfer_syntax: str, admit: Callable[[], None]
    ) -> None:
        """Admit the instance, open the part and write the preamble and File Meta Information."""
        try:
            meta = _file_meta(sop_class, sop_instance, transfer_syntax)
        except ValueError:
            self.refusal = (CANNOT_UNDERSTAND, "the request's UIDs cannot form a File Meta Information group")
            return
        try:
            admit()
            self.spool.check_reserve(0)
            self.path, self._fh = self.spool.open_part()
        except Exception as exc:
            self.error = exc
            return
        self.write(meta)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append a fragment (dropped once refused); never raises (it runs on the DUL thread)."""
        n = len(data)
        self.size += n
        if self.refused or self._fh is None:
            return n
        if self.size > self.max_bytes:
            self._refuse((OUT_OF_RESOURCES, f"instance exceeds {self.max_bytes} bytes"))
            return n
        try:
            if self.size > self._checked_to:
                self.spool.check_reserve(RESERVE_STEP)
                self._checked_to = self.size + RESERVE_STEP
            self.spool.write(self._fh, bytes(data) if not isinstance(data, bytes) else data)
        except Exception as exc:
            self._refuse(exc)
        return n

    def flush(self) -> None:
        """Nothing: the part is fsynced when it is committed."""

    def take(self) -> tuple[Path, BinaryIO]:
        """Hand the part over (to ``store_spooled``, which commits or removes it)."""
        assert self.path is not None and self._fh is not None and not self.refused
        self._taken = True
        return self.path, self._fh

    def close(self) -> None:
        """Remove the part unless it was taken; idempotent, never raises."""
        if self._taken or self.path is None:
            return
        self.spool.discard(self.path, self._fh)
        self._fh = None

    def _refuse(self, why: tuple[int, str] | BaseException) -> None:
        if isinstance(why, BaseException):
            self.error = why
        else:
            self.refusal = why
        if self.path is not None:
            self.spool.discard(self.path, self._fh)
        self._fh = None


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (ValueError if the UIDs cannot form one)."""
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID
    from pynetdicom.dsutils import create_file_meta

    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    try:
        meta = create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(transfer_syntax),
        )
        write_file_meta_info(buffer, meta)  # type: ignore[arg-type]
    except Exception as exc:
        raise ValueError(str(exc)) from exc
    return buffer.getvalue()
