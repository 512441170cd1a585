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

from retinaedge.runtime.dicomio import Limits
from retinaedge.runtime.errors import (
    OverloadedError,
    PayloadTooLargeError,
    RequestError,
    StorageUnavailableError,
)
from retinaedge.service.http.body import idle_timeout
from retinaedge.service.intake.ingest import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    Failed,
    Header,
    Route,
    store_spooled,
)
from retinaedge.service.intake.multipart import MultipartParser, stow_boundary
from retinaedge.service.intake.spool import Spool
from retinaedge.service.results.evidence import IdentityFiles
from retinaedge.service.results.store import Store

log = logging.getLogger(__name__)

#: While a part is written the reserve is checked again at least every this many bytes (and exactly
#: when the room left at the last check runs out).
RESERVE_CHECK_BYTES = 1024**2


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
    route: Route | None = None,
) -> StowOutcome:
    """Stream a STOW-RS body into the spool; return what was stored and what failed (and why).

    ``admit()`` raises :class:`OverloadedError` while the backlog is full; it runs (in a thread) before
    anything is read and before each part. ``idle_timeout_s``: 408 when the client stops sending.
    ``identities`` keeps each stored instance's patient identity apart from the database (:mod:`..results.evidence`).
    ``route`` gives each instance to the models that take it (:func:`.ingest.store_spooled`).
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
                    await _finish_part(
                        current, outcome, spool, store, limits, study_uid, enqueue, identities, route
                    )
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
        try:
            count, size = store.backlog()
        except sqlite3.Error as exc:  # the database cannot be read: 503 / A700, retried
            raise StorageUnavailableError(f"the database cannot be read ({exc})", retry_after) from exc
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
    route: Route | None = None,
) -> None:
    if part.problem is not None:
        spool.discard(part.path, part.fh)
        outcome.failed.append(("", "", *part.problem))
        return

    def same_study(header: Header) -> tuple[int, str] | None:
        if study_uid is not None and header.study != study_uid:
            return DATASET_MISMATCH, "instance belongs to another study"
        return None

    # One thread does commit, inspect, identity and row (ingest.store_spooled), and cleans up only its own
    # failures: a cancellation of this coroutine (the end of a graceful shutdown) cannot delete the file of
    # a row the thread went on to commit. A file without a row is removed by the next start
    # (Processor.recover).
    result = await asyncio.to_thread(
        store_spooled,
        part.path,
        part.fh,
        part.size,
        spool=spool,
        store=store,
        limits=limits,
        identities=identities,
        check=same_study,
        route=route,
    )
    if isinstance(result, Failed):
        outcome.failed.append((result.sop_class, result.sop_instance, result.reason, result.why))
        return
    if result.inserted:
        enqueue(result.sop_instance)
    outcome.referenced.append((result.sop_class, result.sop_instance))
