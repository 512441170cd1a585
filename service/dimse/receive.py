"""One C-STORE request -> one durable instance and its status (PS3.4 B.2.3), like a STOW-RS part.

Runs on the association's thread (pynetdicom calls the handler there). The success status is returned
only after :func:`~retinaedge.service.intake.ingest.store_spooled` has fsynced the file and committed its row;
the UID is then handed to the Processor on the event loop (``loop.call_soon_threadsafe``). A crash
before the status leaves nothing acknowledged: the file without a row is removed at the next start.

Statuses (with an Error Comment saying why, at most 64 characters, no patient data):

=========  =====================  ===========================================================
status     meaning                when
=========  =====================  ===========================================================
``0000``   Success                stored and recorded (also a duplicate: the first copy stands)
``A700``   Out of resources       the disk reserve (``min_free_bytes``), the backlog limit
                                  (``max_pending_*``), an instance above ``max_body_bytes`` or
                                  the decode budget, a full disk or database, any other storage
                                  error (a read-only remount, EIO, a locked database)
``A900``   Data set mismatch      the data set's SOP Class/Instance UID is not the request's
``C000``   Cannot understand      malformed or truncated data, an unsupported pixel layout
``0122``   SOP class not          an instance of an accepted class that holds no image
           supported
``0110``   Processing failure     anything unexpected (a bug: logged with a redacted traceback)
=========  =====================  ===========================================================
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from retinaedge.runtime.dicomio import Limits
from retinaedge.runtime.errors import InsufficientStorageError, OverloadedError, StorageUnavailableError
from retinaedge.runtime.logsafety import redacted_traceback
from retinaedge.service.dimse.incoming import IncomingInstance
from retinaedge.service.intake.ingest import (
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    Failed,
    Header,
    Route,
    store_spooled,
)
from retinaedge.service.intake.spool import Spool
from retinaedge.service.results.evidence import IdentityFiles
from retinaedge.service.results.store import Store

log = logging.getLogger(__name__)

SUCCESS = 0x0000
#: Error Comment (0000,0902) is LO: 64 characters at most.
MAX_COMMENT = 64

STATUS_NAMES = {
    SUCCESS: "success",
    OUT_OF_RESOURCES: "out-of-resources",
    DATASET_MISMATCH: "dataset-mismatch",
    0xC000: "cannot-understand",
    0x0122: "sop-class-not-supported",
    PROCESSING_FAILURE: "processing-failure",
}


@dataclass(frozen=True)
class Outcome:
    """A C-STORE's status, its Error Comment (empty on success) and the SOP Instance UID stored."""

    status: int
    comment: str = ""
    uid: str | None = None

    @property
    def name(self) -> str:
        return STATUS_NAMES.get(self.status, f"{self.status:04X}")


@dataclass
class Receiver:
    """Everything one C-STORE needs; ``enqueue`` runs on ``loop`` (the Processor's queue)."""

    spool: Spool
    store: Store
    limits: Limits
    identities: IdentityFiles | None
    admit: Callable[[], None]
    max_instance_bytes: int
    enqueue: Callable[[str], None]
    loop: asyncio.AbstractEventLoop | None = None
    #: The routing of instances sent to a called AE title (None: every model; :mod:`..lanes`).
    route_for: Callable[[str | None], Route | None] = lambda _called: None
    #: The AE titles bound to models (beside the SCP's own), which the SCP answers too.
    titles: frozenset[str] = frozenset()

    def receive(
        self, sop_class: str, sop_instance: str, data: bytes, called_ae: str | None = None
    ) -> Outcome:
        """Store ``data`` (PS3.10 bytes: preamble, File Meta from the request and its context, the
        data set as received), sent to ``called_ae``, -> its outcome. Never raises."""
        return self._answer(lambda: self._store(sop_class, sop_instance, data, called_ae))

    def open_instance(self, sop_class: str, sop_instance: str, transfer_syntax: str) -> IncomingInstance:
        """A spool part for a C-STORE's data set, opened when its command set arrives (on the
        connection's DUL thread): the backlog and the disk reserve are checked now, and the data set is
        written into it as it arrives (:mod:`.incoming`). Never raises."""
        incoming = IncomingInstance(self.spool, self.max_instance_bytes)
        incoming.start(sop_class, sop_instance, transfer_syntax, self.admit)
        return incoming

    def receive_instance(
        self, sop_class: str, sop_instance: str, incoming: IncomingInstance, called_ae: str | None = None
    ) -> Outcome:
        """Commit a data set that :meth:`open_instance` streamed to the spool, sent to ``called_ae``, ->
        its outcome (a refusal while it streamed is reported now). Never raises; the part is committed or
        removed."""
        try:
            return self._answer(lambda: self._store_incoming(sop_class, sop_instance, incoming, called_ae))
        finally:
            incoming.close()

    def _answer(self, store: Callable[[], Outcome]) -> Outcome:
        try:
            outcome = store()
        except OverloadedError as exc:
            outcome = Outcome(OUT_OF_RESOURCES, f"backlog full: {exc}")
        except InsufficientStorageError as exc:
            text = str(exc)
            why = "disk reserve reached (min_free_bytes)" if "reserve" in text else f"storage full: {text}"
            outcome = Outcome(OUT_OF_RESOURCES, why)
        except StorageUnavailableError as exc:  # read-only, I/O error: a status scanners retry
            outcome = Outcome(OUT_OF_RESOURCES, f"storage unavailable: {exc}")
        except (OSError, sqlite3.Error) as exc:  # any other storage error: the same, never 0110
            log.warning("C-STORE: storage failed: %s", type(exc).__name__)
            outcome = Outcome(OUT_OF_RESOURCES, f"storage unavailable: {type(exc).__name__}")
        except Exception:
            log.error("C-STORE failed:\n%s", redacted_traceback(sys.exc_info()))
            outcome = Outcome(PROCESSING_FAILURE, "internal error")
        if outcome.status == SUCCESS and outcome.uid is not None:
            return outcome
        return Outcome(outcome.status, _comment(outcome.comment), outcome.uid)

    def _store_incoming(
        self, sop_class: str, sop_instance: str, incoming: IncomingInstance, called_ae: str | None
    ) -> Outcome:
        if incoming.error is not None:
            raise incoming.error
        if incoming.refusal is not None:
            return Outcome(*incoming.refusal)
        path, fh = incoming.take()
        return self._commit(path, fh, incoming.size, sop_class, sop_instance, called_ae)

    def _store(self, sop_class: str, sop_instance: str, data: bytes, called_ae: str | None) -> Outcome:
        self.admit()  # 503 for STOW-RS: A700 here
        if len(data) > self.max_instance_bytes:
            return Outcome(OUT_OF_RESOURCES, f"instance exceeds {self.max_instance_bytes} bytes")
        self.spool.check_reserve(len(data))
        path, fh = self.spool.open_part()
        try:
            self.spool.write(fh, data)
        except BaseException:
            self.spool.discard(path, fh)
            raise

        return self._commit(path, fh, len(data), sop_class, sop_instance, called_ae)

    def _commit(
        self, path: Path, fh: BinaryIO, size: int, sop_class: str, sop_instance: str, called_ae: str | None
    ) -> Outcome:
        """``store_spooled`` the part (the data set must be the request's) and enqueue a new row."""

        def as_requested(header: Header) -> tuple[int, str] | None:
            if header.sop_class != sop_class or header.sop_instance != sop_instance:
                return DATASET_MISMATCH, "the data set's SOP Class/Instance UID is not the request's"
            return None

        result = store_spooled(
            path,
            fh,
            size,
            spool=self.spool,
            store=self.store,
            limits=self.limits,
            identities=self.identities,
            check=as_requested,
            route=self.route_for(called_ae),
        )
        if isinstance(result, Failed):
            return Outcome(result.reason, result.why)
        if result.inserted:
            self._enqueue(result.sop_instance)
        return Outcome(SUCCESS, "", result.sop_instance)

    def _enqueue(self, uid: str) -> None:
        """Hand a committed UID to the Processor; a loop already closed leaves the row pending, which
        the next start queues again."""
        if self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.enqueue, uid)
        except RuntimeError:
            log.info("an instance was stored while the service stops; it is processed at the next start")


def _comment(text: str) -> str:
    """An Error Comment: printable ASCII, at most :data:`MAX_COMMENT` characters."""
    clean = "".join(c if 32 <= ord(c) < 127 and c != "\\" else " " for c in text).strip()
    return clean if len(clean) <= MAX_COMMENT else clean[: MAX_COMMENT - 3] + "..."


def status_dataset(outcome: Outcome) -> Any:
    """The pynetdicom handler's return value: a Dataset with Status and, on failure, Error Comment."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = outcome.status
    if outcome.comment:
        ds.ErrorComment = outcome.comment
    return ds
