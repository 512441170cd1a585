"""DICOMweb STOW-RS (PS3.18 10.5): stream parts to the spool, fsync, record, acknowledge; process later.

An instance is acknowledged (listed in ReferencedSOPSequence) only after its bytes are fsynced in the spool
and its row is committed in SQLite. Instances the runtime would reject anyway (header checks only, nothing
decoded) are listed in FailedSOPSequence with a Failure Reason.

Whatever ends a request early (the disk reserve reached while a part is written, a full disk, a broken
multipart body, the client gone, the idle timeout, the backlog limit) discards the part being written;
what was acknowledged before stays acknowledged and is processed, and sending it again is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from retinaedge.runtime.dicomio import DicomInput, Limits, open_dicom, validate
from retinaedge.runtime.errors import (
    DicomInputError,
    InsufficientStorageError,
    NoPixelDataError,
    OverBudgetError,
    OverloadedError,
    PayloadTooLargeError,
    RequestError,
)

from .body import idle_timeout
from .evidence import IdentityFiles, split_dataset
from .multipart import MultipartParser, stow_boundary
from .spool import Spool, no_space
from .store import Store

log = logging.getLogger(__name__)

#: While a part is written the reserve is checked again at least every this many bytes (and exactly
#: when the room left at the last check runs out).
RESERVE_CHECK_BYTES = 1024**2

# Failure Reason (0008,1197) values (PS3.18 Table 10.5.3-2, after the C-STORE statuses of PS3.4 B.2.3).
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122


@dataclass
class StowOutcome:
    """(SOP Class UID, SOP Instance UID) stored, and (class, instance, reason, why) failed."""

    referenced: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)

    @property
    def status(self) -> int:
        """200 all stored, 202 some stored and some failed, 409 none stored."""
        if not self.failed:
            return 200
        return 202 if self.referenced else 409

    def to_dicom_json(self, retrieve_base: str) -> dict[str, Any]:
        """The Store Instances Response as ``application/dicom+json``."""
        body: dict[str, Any] = {}
        if self.referenced:
            body["00081199"] = {
                "vr": "SQ",
                "Value": [
                    {
                        "00081150": {"vr": "UI", "Value": [c]},
                        "00081155": {"vr": "UI", "Value": [u]},
                        "00081190": {"vr": "UR", "Value": [f"{retrieve_base}/{u}"]},
                    }
                    for c, u in self.referenced
                ],
            }
        if self.failed:
            body["00081198"] = {
                "vr": "SQ",
                "Value": [
                    {
                        "00081150": {"vr": "UI", "Value": [c]} if c else {"vr": "UI"},
                        "00081155": {"vr": "UI", "Value": [u]} if u else {"vr": "UI"},
                        "00081197": {"vr": "US", "Value": [reason]},
                    }
                    for c, u, reason, _ in self.failed
                ],
            }
        return body


def _reason(exc: DicomInputError) -> int:
    if isinstance(exc, OverBudgetError):
        return OUT_OF_RESOURCES
    if isinstance(exc, NoPixelDataError):
        return SOP_CLASS_NOT_SUPPORTED
    return CANNOT_UNDERSTAND


def inspect(source: Path | bytes, limits: Limits) -> tuple[str, str, str, str, str, str]:
    """Header checks -> (SOP class, SOP instance, study, series UIDs, SR evidence, patient identity; the
    last two DICOM JSON, :mod:`.evidence`); nothing decoded."""
    with open_dicom(source, limits) as src:
        validate(src, limits)
        return header_of(src)


def header_of(src: DicomInput) -> tuple[str, str, str, str, str, str]:
    """An open, validated instance -> (SOP class, SOP instance, study, series UIDs, SR evidence, patient
    identity), as :func:`inspect` returns them, from what is already parsed (nothing read again)."""
    ds = src.ds
    uids = (
        str(ds.get("SOPClassUID", "")),
        str(ds.get("SOPInstanceUID", "")),
        str(ds.get("StudyInstanceUID", "")),
        str(ds.get("SeriesInstanceUID", "")),
    )
    if not uids[1]:
        raise RequestError("the instance has no SOP Instance UID")
    evidence, identity = split_dataset(ds)
    return (*uids, evidence, identity)


PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass
class _Part:
    path: Path
    fh: BinaryIO
    spool: Spool
    size: int = 0
    problem: tuple[int, str] | None = None
    head: bytes = b""
    started: bool = False
    allowed: int = 0  # bytes that may be written before the reserve is checked again

    def write(self, data: bytes, final: bool = False) -> None:
        """Write part bytes; a dataset sent without the PS3.10 preamble (as some clients, e.g.
        dicomweb-client, send in-memory datasets) but starting with its File Meta group gets one."""
        if self.started:
            self._put(data)
            return
        self.head += data
        if len(self.head) < len(PREAMBLE) and not final:
            return
        if self.head[128:132] != b"DICM" and self.head[:2] == b"\x02\x00":
            self._put(PREAMBLE)
        self._put(self.head)
        self.head, self.started = b"", True

    def _put(self, data: bytes) -> None:
        """Write to the spool, checking the reserve before it would be crossed (507, never after)."""
        if len(data) > self.allowed:
            room = self.spool.room()
            if room < len(data):
                self.spool.check_reserve(len(data))  # raises 507 with the free and reserved bytes
            self.allowed = min(room, RESERVE_CHECK_BYTES + len(data))
        self.allowed -= len(data)
        self.spool.write(self.fh, data)


async def receive(
    stream: AsyncIterator[bytes],
    content_type: str,
    *,
    spool: Spool,
    store: Store,
    limits: Limits,
    max_instance_bytes: int,
    max_request_bytes: int,
    study_uid: str | None,
    enqueue: Callable[[str], None],
    admit: Callable[[], None] = lambda: None,
    idle_timeout_s: float | None = None,
    identities: IdentityFiles | None = None,
) -> StowOutcome:
    """Stream a STOW-RS body into the spool; return what was stored and what failed (and why).

    ``admit()`` raises :class:`OverloadedError` while the backlog is full; it runs (in a thread) before
    anything is read and before each part. ``idle_timeout_s``: 408 when the client stops sending.
    ``identities`` keeps each stored instance's patient identity apart from the database (:mod:`.evidence`).
    """
    parser = MultipartParser(stow_boundary(content_type))
    spool.check_reserve()  # 507 before anything is written
    await asyncio.to_thread(admit)
    outcome = StowOutcome()
    part: _Part | None = None
    total = 0
    try:
        async for chunk in idle_timeout(stream, idle_timeout_s):
            total += len(chunk)
            if total > max_request_bytes:
                raise PayloadTooLargeError(f"request body exceeds the {max_request_bytes}-byte limit")
            for event, value in parser.feed(chunk):
                if event == "headers":
                    if outcome.referenced or outcome.failed:
                        await asyncio.to_thread(admit)
                    spool.check_reserve()
                    path, fh = spool.open_part()
                    part = _Part(path, fh, spool)
                    media = value.get("content-type", "application/dicom").split(";")[0].strip().lower()
                    if media != "application/dicom":
                        part.problem = (
                            CANNOT_UNDERSTAND,
                            f"part media type {media!r} is not application/dicom",
                        )
                elif event == "data" and part is not None:
                    part.size += len(value)
                    if part.problem is None and part.size > max_instance_bytes:
                        part.problem = (OUT_OF_RESOURCES, f"instance exceeds {max_instance_bytes} bytes")
                    if part.problem is None:
                        part.write(value)
                elif event == "end" and part is not None:
                    if part.problem is None:
                        part.write(b"", final=True)
                    current, part = part, None
                    await _finish_part(current, outcome, spool, store, limits, study_uid, enqueue, identities)
        parser.finish()
    except BaseException:  # 507, 408, 503, a broken body, the client gone, cancellation: no part is left
        if part is not None:
            spool.discard(part.path, part.fh)
        raise
    if not outcome.referenced and not outcome.failed:
        raise RequestError("the multipart body holds no parts")
    return outcome


def backlog_admission(
    store: Store, max_instances: int, max_bytes: int, retry_after: int
) -> Callable[[], None]:
    """``admit()`` for :func:`receive`: 503 with Retry-After while ``max_instances`` acknowledged instances
    or ``max_bytes`` of them wait to be processed."""

    def admit() -> None:
        count, size = store.backlog()
        if count >= max_instances or size >= max_bytes:
            raise OverloadedError(
                f"{count} instances ({size} bytes) wait to be processed; the backlog limit is "
                f"{max_instances} instances or {max_bytes} bytes",
                retry_after,
            )

    return admit


async def _finish_part(
    part: _Part,
    outcome: StowOutcome,
    spool: Spool,
    store: Store,
    limits: Limits,
    study_uid: str | None,
    enqueue: Callable[[str], None],
    identities: IdentityFiles | None,
) -> None:
    if part.problem is not None:
        spool.discard(part.path, part.fh)
        outcome.failed.append(("", "", *part.problem))
        return
    # One thread does commit, inspect, identity and row, and cleans up only its own failures: a
    # cancellation of this coroutine (the end of a graceful shutdown) cannot delete the file of a row the
    # thread went on to commit. A file without a row is removed by the next start (Processor.recover).
    failed, stored = await asyncio.to_thread(_store_part, part, spool, store, limits, study_uid, identities)
    if failed is not None:
        outcome.failed.append(failed)
        return
    assert stored is not None
    sop_class, uid, inserted = stored
    if inserted:
        enqueue(uid)
    outcome.referenced.append((sop_class, uid))


def _store_part(
    part: _Part,
    spool: Spool,
    store: Store,
    limits: Limits,
    study_uid: str | None,
    identities: IdentityFiles | None,
) -> tuple[tuple[str, str, int, str] | None, tuple[str, str, bool] | None]:
    """fsync + rename, header checks, identity file, pending row (in this thread) ->
    ``(failure entry, None)`` or ``(None, (SOP class, SOP instance, inserted))``; raises after cleaning up."""
    try:
        final = spool.commit(part.path, part.fh)
    except BaseException:
        spool.discard(part.path, part.fh)
        raise
    try:
        sop_class, uid, study, series, header, identity = inspect(final, limits)
    except (DicomInputError, RequestError) as exc:
        cls, inst = _uids_if_readable(final)
        spool.discard(final)
        reason = _reason(exc) if isinstance(exc, DicomInputError) else CANNOT_UNDERSTAND
        return (cls, inst, reason, f"{exc.type}: {exc}"), None
    except BaseException:
        spool.discard(final)
        raise
    if study_uid is not None and study != study_uid:
        spool.discard(final)
        return (sop_class, uid, DATASET_MISMATCH, "instance belongs to another study"), None
    try:
        if identities is None:
            inserted = store.add_pending(uid, sop_class, study, series, final.name, part.size, header)
        else:
            with identities.lock:  # before the row: an acknowledged instance has its identity on disk
                identities.put(uid, identity, replace=False)
                inserted = store.add_pending(uid, sop_class, study, series, final.name, part.size, header)
    except BaseException as exc:  # not recorded, so not acknowledged: the file goes too
        spool.discard(final)
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            raise InsufficientStorageError(f"the database cannot grow: {exc}") from exc
        if isinstance(exc, OSError) and (full := no_space(exc, spool.root)) is not None:
            raise full from exc
        raise
    if not inserted:  # the same SOP Instance UID again: idempotent, the first copy stands
        spool.discard(final)
    return None, (sop_class, uid, inserted)


def _uids_if_readable(path: Path) -> tuple[str, str]:
    """SOP Class/Instance UIDs of a rejected file for the failure list, or empty strings."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
        return str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
    except Exception:
        return "", ""
