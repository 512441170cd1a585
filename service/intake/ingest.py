"""Store one received instance durably: the one path STOW-RS and the C-STORE SCP share.

A receiver writes the instance's bytes into a spool part (:meth:`Spool.open_part`, :meth:`Spool.write`)
and hands the part to :func:`store_spooled`, which in the calling thread fsyncs and renames it, checks
the header (nothing decoded), writes the patient identity file and commits the ``pending`` row. Only
after it returns ``Stored`` may the receiver acknowledge the instance; it then enqueues the UID on the
:class:`~retinaedge.service.pipeline.processor.Processor` when the row is new (``inserted``). Receiving the same
SOP Instance UID again is idempotent: the first copy stands, the new file is removed; unless the first copy
failed (a corrupt file, say): then the new copy is a correction and replaces it (:meth:`Store.add_pending`),
as ``/v1/detect`` replaces a result.

Failures are reported with a Failure Reason / C-STORE status code (PS3.4 B.2.3, reused by PS3.18 Table
10.5.3-2): :data:`OUT_OF_RESOURCES` (A700), :data:`DATASET_MISMATCH` (A900), :data:`CANNOT_UNDERSTAND`
(C000), :data:`PROCESSING_FAILURE` (0110), :data:`SOP_CLASS_NOT_SUPPORTED` (0122).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from retinaedge.runtime.dicomio import DicomInput, Limits, open_dicom, validate
from retinaedge.runtime.errors import (
    DicomInputError,
    InsufficientStorageError,
    NoPixelDataError,
    OverBudgetError,
    RequestError,
    StorageUnavailableError,
)
from retinaedge.service.intake.spool import Spool, storage_error
from retinaedge.service.results.evidence import IdentityFiles, split_dataset
from retinaedge.service.results.rows import Declined
from retinaedge.service.results.store import Store

OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122


@dataclass(frozen=True)
class Header:
    """What :func:`inspect` read: the four UIDs, the SR evidence and the identity (DICOM JSON text)."""

    sop_class: str
    sop_instance: str
    study: str
    series: str
    evidence: str
    identity: str


@dataclass(frozen=True)
class Stored:
    """Committed: the rows exist (``inserted`` False when no model has new work: the UID was already
    known, or no model takes it); ``models`` the models whose pending row was added."""

    sop_class: str
    sop_instance: str
    inserted: bool
    models: tuple[str, ...] = ()


#: Which models take an instance, from its header (a pydicom Dataset, nothing decoded): ``(the models
#: that take it, {model: why not})`` (:class:`retinaedge.service.lanes.Router`).
Routing = tuple[list[str], dict[str, Declined]]
Route = Callable[[Any], Routing]


@dataclass(frozen=True)
class Failed:
    """Not stored: the UIDs if they could be read, the status code and why (``type: message``)."""

    sop_class: str
    sop_instance: str
    reason: int
    why: str


#: A check of the header beyond the runtime's (a STOW-RS study path, the C-STORE request's UIDs):
#: ``(reason, why)`` to refuse the instance, or None.
Check = Callable[[Header], "tuple[int, str] | None"]


def reason_for(exc: DicomInputError | RequestError) -> int:
    """The status code for an instance the runtime refuses."""
    if isinstance(exc, OverBudgetError):
        return OUT_OF_RESOURCES
    if isinstance(exc, NoPixelDataError):
        return SOP_CLASS_NOT_SUPPORTED
    return CANNOT_UNDERSTAND


def inspect(source: Path | bytes, limits: Limits) -> tuple[str, str, str, str, str, str]:
    """Header checks -> (SOP class, SOP instance, study, series UIDs, SR evidence, patient identity; the
    last two DICOM JSON, :mod:`..results.evidence`); nothing decoded."""
    return inspect_routed(source, limits, None)[0]


def inspect_routed(
    source: Path | bytes, limits: Limits, route: Route | None
) -> tuple[tuple[str, str, str, str, str, str], Routing | None]:
    """:func:`inspect`, and ``route``'s decision on the same parsed header (None without ``route``)."""
    with open_dicom(source, limits) as src:
        validate(src, limits)
        return header_of(src), (route(src.ds) if route is not None else None)


def header_uids(src: DicomInput) -> tuple[str, str, str, str]:
    """An open, validated instance -> (SOP class, SOP instance, study, series UIDs); 400 without a SOP
    Instance UID."""
    ds = src.ds
    uids = (
        str(ds.get("SOPClassUID", "")),
        str(ds.get("SOPInstanceUID", "")),
        str(ds.get("StudyInstanceUID", "")),
        str(ds.get("SeriesInstanceUID", "")),
    )
    if not uids[1]:
        raise RequestError("the instance has no SOP Instance UID")
    return uids


def kept_header_of(src: DicomInput) -> tuple[tuple[str, str, str, str], Any] | str:
    """What a ``/v1/detect`` result keeps of its instance's header: ``(header_uids, select_header)``, or the
    name of the error that prevented it (the detections stand without it). Runs where the instance was
    read, a reader process included (:mod:`retinaedge.service.pipeline.remote`)."""
    from retinaedge.service.results.evidence import select_header

    try:
        return header_uids(src), select_header(src.ds)
    except Exception as exc:
        return type(exc).__name__


def kept_header_encoded(src: DicomInput) -> tuple[tuple[str, str, str, str], Any] | str:
    """:func:`kept_header_of` with the header encoded as DICOM JSON already (an
    :class:`~retinaedge.service.results.evidence.EncodedHeader`): what a reader process sends back, so
    that neither unpickling pydicom datasets nor encoding them costs the service's own process."""
    from retinaedge.service.results.evidence import EncodedHeader

    kept = kept_header_of(src)
    if isinstance(kept, str):
        return kept
    try:
        return kept[0], EncodedHeader(*kept[1].to_json())
    except Exception as exc:
        return type(exc).__name__


def header_of(src: DicomInput) -> tuple[str, str, str, str, str, str]:
    """An open, validated instance -> (SOP class, SOP instance, study, series UIDs, SR evidence, patient
    identity), as :func:`inspect` returns them, from what is already parsed (nothing read again)."""
    evidence, identity = split_dataset(src.ds)
    return (*header_uids(src), evidence, identity)


def store_spooled(
    part: Path,
    fh: BinaryIO,
    size: int,
    *,
    spool: Spool,
    store: Store,
    limits: Limits,
    identities: IdentityFiles | None,
    check: Check | None = None,
    route: Route | None = None,
) -> Stored | Failed:
    """fsync + rename the part, header checks, ``check``, identity file, pending rows (all in this thread).

    ``route`` says which models take the instance (a pending row each) and which do not (a
    ``not-applicable`` row each); without it, the row is the ``store``'s model's.

    Returns :class:`Stored` or :class:`Failed`; raises (507 for a full disk or database, 503 for any other
    storage error, anything unexpected) after cleaning up, so that nothing not recorded stays in the spool. Call it from one
    thread that is not cancelled halfway (``asyncio.to_thread`` or a DIMSE handler thread): a file
    whose row was committed is never deleted by it.
    """
    try:
        final = spool.commit(part, fh)
    except BaseException:
        spool.discard(part, fh)
        raise
    try:
        found, routing = inspect_routed(final, limits, route)
        header = Header(*found)
    except (DicomInputError, RequestError) as exc:
        cls, inst = uids_if_readable(final)
        spool.discard(final)
        return Failed(cls, inst, reason_for(exc), f"{exc.type}: {exc}")
    except BaseException:
        spool.discard(final)
        raise
    refused = check(header) if check is not None else None
    if refused is not None:
        spool.discard(final)
        return Failed(header.sop_class, header.sop_instance, *refused)
    uid = header.sop_instance
    accepted, declined = routing if routing is not None else ([store.model], {})
    try:
        add = (uid, header.sop_class, header.study, header.series, final.name, size, header.evidence)
        if identities is None:
            models = store.add_instance(*add, accepted=accepted, declined=declined)
        else:
            with identities.lock:  # before the row: an acknowledged instance has its identity on disk
                earlier = store.instance_rows(uid)  # failed ones are replaced by this copy, the identity too
                identities.put(
                    uid, header.identity, replace=bool(earlier) and all(r.state == "failed" for r in earlier)
                )
                models = store.add_instance(*add, accepted=accepted, declined=declined)
    except BaseException as exc:  # not recorded, so not acknowledged: the file goes too
        spool.discard(final)
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            raise InsufficientStorageError(f"the database cannot grow: {exc}") from exc
        if isinstance(exc, sqlite3.Error):  # read-only, I/O error, locked: 503 / A700, retried
            raise StorageUnavailableError(f"the database cannot be written ({exc})") from exc
        if isinstance(exc, OSError):
            raise storage_error(exc, spool.root) from exc
        raise
    if not models:  # known already (idempotent: the first copy stands), or no model takes it
        spool.discard(final)
    return Stored(header.sop_class, uid, bool(models), tuple(models))


def uids_if_readable(path: Path) -> tuple[str, str]:
    """SOP Class/Instance UIDs of a rejected file for the failure list, or empty strings."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
        return str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
    except Exception:
        return "", ""
