"""One delivery job of the outbox as the code reads it (:class:`Job`), and the query that reads it with its
document (:data:`JOB_SELECT`, :func:`job_from_row`); :mod:`.queue` owns the tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Job:
    """One delivery job and its document: ``document_kind`` its kind (``sr``, ``series-sr``, ...),
    ``kind`` its scope (``instance``, ``series`` or ``study``, as ``/v1/exports`` names it); ``path`` and
    ``sop_instance_uid`` None until the document's file is built."""

    id: int
    destination: str
    document_id: int
    document_kind: str
    kind: str
    subject_uid: str
    version: float
    state: str
    created_at: float
    next_attempt_at: float
    attempts: int
    possibly_delivered: bool
    duplicate: str | None
    last_error: str | None
    finished_at: float | None
    path: str | None
    sop_instance_uid: str | None
    model: str = ""  # whose result the document shows
    model_sha256: str | None = None  # the version that produced it (an instance's document)

    @property
    def sop_instance_uids(self) -> list[str]:
        """The SOP Instance UIDs of the document once built: one, or one per part of a stored document
        (kept joined by ``\\``, DICOM's multi-value separator)."""
        return self.sop_instance_uid.split("\\") if self.sop_instance_uid else []

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "destination": self.destination,
            "kind": self.kind,
            "document": self.document_kind,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "subject_uid": self.subject_uid,
            "sr_sop_instance_uid": self.sop_instance_uids[0] if self.sop_instance_uids else None,
            "sop_instance_uids": self.sop_instance_uids,
            "state": self.state,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "next_attempt_at": self.next_attempt_at if self.state == "pending" else None,
            "finished_at": self.finished_at,
            "last_error": self.last_error,
            "possibly_delivered_before": self.possibly_delivered,
            "duplicate": self.duplicate,
        }


JOB_SELECT = (
    "SELECT j.id, j.destination, j.document_id, d.kind, d.scope, d.subject_uid, d.version, j.state, "
    "j.created_at, j.next_attempt_at, j.attempts, j.possibly_delivered, j.duplicate, j.last_error, "
    "j.finished_at, d.path, d.sop_instance_uid, d.model, d.model_sha256 FROM export_jobs j JOIN export_documents d ON d.id = j.document_id"
)


def job_from_row(r: tuple[Any, ...]) -> Job:
    (id_, destination, document_id, document_kind, kind, subject_uid, version, state, created_at) = r[:9]
    (next_attempt_at, attempts, possibly, duplicate, last_error, finished_at, path, uid, model, sha) = r[9:]
    return Job(
        id_, destination, document_id, document_kind, kind, subject_uid, version, state, created_at,
        next_attempt_at, attempts, bool(possibly), duplicate, last_error, finished_at, path, uid, model, sha,
    )  # fmt: skip
