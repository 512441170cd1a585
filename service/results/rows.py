"""A row of the results' ``instances`` table (:mod:`.schema`) as the code reads it, the key its files are
kept under, and the statements that insert rows (:class:`.store.Store` runs them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    spool_path: str | None
    size_bytes: int
    received_at: float
    state: str
    completed_at: float | None
    error_type: str | None
    error_message: str | None
    result_json: str | None
    header_json: str | None
    model: str = ""

    @property
    def key(self) -> str:
        """What this result's files are kept under (:func:`subject_key`)."""
        return subject_key(self.model, self.sop_instance_uid)

    def result(self) -> dict[str, Any] | None:
        return json.loads(self.result_json) if self.result_json else None


def subject_key(model: str, uid: str) -> str:
    """The key of one model's documents of a subject (an instance, series or study UID): the files kept
    for it (built documents, captures) live under a digest of it. The UID alone for rows without a model
    (written before several models), so their files keep their place until they are adopted."""
    return f"{model}/{uid}" if model else uid


def state_of(row: Row) -> str:
    """A row's state for counting: ``pending``, ``done``, ``failed`` or ``not_applicable`` (recorded as a
    failed row of error type ``not-applicable``: outside the model's intended use, never inferred)."""
    return "not_applicable" if row.state == "failed" and row.error_type == "not-applicable" else row.state


PUT_DONE = (
    "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, size_bytes, "
    "received_at, state, completed_at, result_json, header_json, model) "
    "VALUES (?, ?, ?, ?, ?, ?, 'done', ?, ?, ?, ?) "
    "ON CONFLICT(sop_instance_uid, model) DO UPDATE SET state = 'done', completed_at = excluded.completed_at, "
    "result_json = excluded.result_json, header_json = excluded.header_json "
    "WHERE instances.state != 'pending'"
)


ADD_PENDING = (
    "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, spool_path, size_bytes, "
    "received_at, state, header_json, model) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?) "
    "ON CONFLICT(sop_instance_uid, model) DO UPDATE SET sop_class_uid = excluded.sop_class_uid, "
    "study_uid = excluded.study_uid, series_uid = excluded.series_uid, spool_path = excluded.spool_path, "
    "size_bytes = excluded.size_bytes, received_at = excluded.received_at, state = 'pending', "
    "completed_at = NULL, error_type = NULL, error_message = NULL, result_json = NULL, "
    "header_json = excluded.header_json WHERE instances.state = 'failed'"
)

ADD_NOT_APPLICABLE = (
    "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, size_bytes, "
    "received_at, state, completed_at, error_type, error_message, result_json, header_json, model) "
    "VALUES (?, ?, ?, ?, ?, ?, 'failed', ?, 'not-applicable', ?, ?, ?, ?) "
    "ON CONFLICT(sop_instance_uid, model) DO UPDATE SET sop_class_uid = excluded.sop_class_uid, "
    "study_uid = excluded.study_uid, series_uid = excluded.series_uid, spool_path = NULL, "
    "size_bytes = excluded.size_bytes, received_at = excluded.received_at, "
    "completed_at = excluded.completed_at, error_type = 'not-applicable', "
    "error_message = excluded.error_message, result_json = excluded.result_json, "
    "header_json = excluded.header_json WHERE instances.state = 'failed'"
)


@dataclass(frozen=True)
class Declined:
    """A model that does not take an instance: the message and the outcome (the model and its failed
    rules, kept as the row's ``result_json`` for ``GET /v1/results``)."""

    message: str
    outcome: dict[str, Any]


def version_of_rows(rows: list[Row]) -> str | None:
    """The model sha256 of the newest done result among ``rows`` (what a series' or study's documents
    name as their algorithm version), or None when none is done."""
    done = [r for r in rows if r.state == "done"]
    for row in sorted(done, key=lambda r: r.received_at, reverse=True):
        sha = (row.result() or {}).get("model", {}).get("sha256")
        if sha:
            return str(sha)
    return None
