"""SQLite (WAL) record of received instances and their results.

One row per SOP Instance UID: ``pending`` until the worker has run it, then ``done`` (result JSON) or
``failed`` (error type and message). Receiving a UID twice is idempotent: the first row stands.
``series_requests`` records when a client asked for a series to be treated as complete. The tables are
described in :mod:`.schema`; opening a :class:`Store` brings the database to the schema version this code
knows (:func:`retinaedge.service.database.prepare`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaedge.service import database, repair


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

    def result(self) -> dict[str, Any] | None:
        return json.loads(self.result_json) if self.result_json else None


def state_of(row: Row) -> str:
    """A row's state for counting: ``pending``, ``done``, ``failed`` or ``not_applicable`` (recorded as a
    failed row of error type ``not-applicable``: outside the model's intended use, never inferred)."""
    return "not_applicable" if row.state == "failed" and row.error_type == "not-applicable" else row.state


_PUT_DONE = (
    "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, size_bytes, "
    "received_at, state, completed_at, result_json, header_json) "
    "VALUES (?, ?, ?, ?, ?, ?, 'done', ?, ?, ?) "
    "ON CONFLICT(sop_instance_uid) DO UPDATE SET state = 'done', completed_at = excluded.completed_at, "
    "result_json = excluded.result_json, header_json = excluded.header_json "
    "WHERE instances.state != 'pending'"
)


_ADD_PENDING = (
    "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, spool_path, size_bytes, "
    "received_at, state, header_json) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?) "
    "ON CONFLICT(sop_instance_uid) DO UPDATE SET sop_class_uid = excluded.sop_class_uid, "
    "study_uid = excluded.study_uid, series_uid = excluded.series_uid, spool_path = excluded.spool_path, "
    "size_bytes = excluded.size_bytes, received_at = excluded.received_at, state = 'pending', "
    "completed_at = NULL, error_type = NULL, error_message = NULL, result_json = NULL, "
    "header_json = excluded.header_json WHERE instances.state = 'failed'"
)


class Store:
    """Thread-safe (one connection behind a lock); every write is a committed transaction.

    ``clock`` gives the timestamps it writes and retention compares (epoch seconds): the service passes
    its :class:`~retinaedge.service.clock.ServiceClock`, which does not jump with the wall clock.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        #: Set when the database was found damaged at start and rebuilt (:mod:`retinaedge.service.repair`).
        self.damage: repair.Damage | None
        self._db, self.damage = repair.open_state(path)
        self._lock = threading.Lock()
        self.clock = clock

    def unwritable_reason(self) -> str | None:
        """Why the database cannot be written now (for ``/readyz``), or None: a real, committed write of
        the schema version it already has (one page to the WAL), not a permission check."""
        try:
            with self._lock:
                found = database.version(self._db)
                self._db.execute(f"PRAGMA user_version = {found:d}")
        except sqlite3.Error as exc:
            return f"the state database cannot be written ({type(exc).__name__}: {exc})"
        return None

    def latest_time(self) -> float | None:
        """The newest timestamp the database holds (a floor for service time at start), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(t) FROM (SELECT MAX(received_at) AS t FROM instances "
                "UNION ALL SELECT MAX(completed_at) FROM instances "
                "UNION ALL SELECT MAX(requested_at) FROM series_requests "
                "UNION ALL SELECT MAX(created_at) FROM export_jobs "
                "UNION ALL SELECT MAX(finished_at) FROM export_jobs "
                "UNION ALL SELECT MAX(started_at) FROM export_attempts)"
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple[Any, ...]) -> Row | None:
        with self._lock:
            cur = self._db.execute(sql, args)
            r = cur.fetchone()
        return Row(*r) if r else None

    def add_pending(
        self,
        uid: str,
        sop_class: str,
        study: str,
        series: str,
        spool_path: str,
        size: int,
        header_json: str | None = None,
    ) -> bool:
        """Insert a pending instance; False (and nothing changed) when the UID is already known, pending or
        done. A ``failed`` row is replaced (a corrected copy of an instance that failed, as
        ``/v1/detect`` replaces it): pending again, with this copy's file, header and arrival time.

        ``header_json`` is the instance's SR evidence (DICOM JSON, no patient identity: service/results/evidence.py).
        """
        with self._lock:
            cur = self._db.execute(
                _ADD_PENDING, (uid, sop_class, study, series, spool_path, size, self.clock(), header_json)
            )
            return cur.rowcount == 1

    def put_done(
        self,
        uid: str,
        sop_class: str,
        study: str,
        series: str,
        size: int,
        result: dict[str, Any],
        header_json: str | None,
    ) -> None:
        """Record a synchronous (/v1/detect) result; replaces an earlier finished result of the same UID."""
        now = self.clock()
        with self._lock:
            self._db.execute(
                _PUT_DONE, (uid, sop_class, study, series, size, now, now, json.dumps(result), header_json)
            )

    def put_done_many(self, rows: list[tuple[str, str, str, str, int, dict[str, Any], str | None]]) -> None:
        """:meth:`put_done` for many ``(uid, sop_class, study, series, size, result, header_json)`` in one
        transaction (one commit, one fsync)."""
        now = self.clock()
        values = [(u, c, st, se, n, now, now, json.dumps(r), h) for u, c, st, se, n, r, h in rows]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_PUT_DONE, values)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def get(self, uid: str) -> Row | None:
        return self._one("SELECT * FROM instances WHERE sop_instance_uid = ?", (uid,))

    def series_rows(self, series_uid: str) -> list[Row]:
        """Every kept instance of one series, in order of arrival."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM instances WHERE series_uid = ? ORDER BY received_at, sop_instance_uid",
                (series_uid,),
            ).fetchall()
        return [Row(*r) for r in rows]

    def study_rows(self, study_uid: str) -> list[Row]:
        """Every kept instance of one study, in order of arrival."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM instances WHERE study_uid = ? ORDER BY received_at, sop_instance_uid",
                (study_uid,),
            ).fetchall()
        return [Row(*r) for r in rows]

    def request_series_complete(self, series_uid: str, at: float | None = None) -> float:
        """Record that the series is complete as of ``at`` (default now); returns that time."""
        at = self.clock() if at is None else at
        with self._lock:
            self._db.execute(
                "INSERT INTO series_requests (series_uid, requested_at) VALUES (?, ?) "
                "ON CONFLICT(series_uid) DO UPDATE SET requested_at = excluded.requested_at",
                (series_uid, at),
            )
        return at

    def series_requested_at(self, series_uid: str) -> float | None:
        with self._lock:
            r = self._db.execute(
                "SELECT requested_at FROM series_requests WHERE series_uid = ?", (series_uid,)
            ).fetchone()
        return float(r[0]) if r else None

    def pending(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid FROM instances WHERE state = 'pending' ORDER BY received_at"
            ).fetchall()
        return [r[0] for r in rows]

    def backlog(self) -> tuple[int, int]:
        """``(instances, bytes)`` acknowledged and not processed yet (state ``pending``)."""
        with self._lock:
            n, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM instances WHERE state = 'pending'"
            ).fetchone()
        return int(n), int(size)

    def spool_paths(self) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT spool_path FROM instances WHERE spool_path IS NOT NULL"
            ).fetchall()
        return {r[0] for r in rows}

    def done(self, uid: str, result: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE instances SET state = 'done', completed_at = ?, result_json = ?, spool_path = NULL "
                "WHERE sop_instance_uid = ?",
                (self.clock(), json.dumps(result), uid),
            )

    def failed(self, uid: str, error_type: str, message: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE instances SET state = 'failed', completed_at = ?, error_type = ?, error_message = ?, "
                "spool_path = NULL WHERE sop_instance_uid = ?",
                (self.clock(), error_type, message, uid),
            )

    def not_applicable(self, uid: str, outcome: dict[str, Any], message: str) -> None:
        """Record that no model takes the instance: a ``failed`` row of error type ``not-applicable``
        whose ``result_json`` holds ``outcome`` (the model and the rules it failed, for ``GET
        /v1/results``); like a failure it enqueues nothing to export and releases its spool file."""
        with self._lock:
            self._db.execute(
                "UPDATE instances SET state = 'failed', completed_at = ?, error_type = 'not-applicable', "
                "error_message = ?, result_json = ?, spool_path = NULL WHERE sop_instance_uid = ?",
                (self.clock(), message, json.dumps(outcome), uid),
            )

    def prune(self, max_age_s: float, max_result_bytes: int) -> list[str]:
        """Retention: drop finished rows older than ``max_age_s``, then the oldest beyond the byte budget;
        returns the SOP Instance UIDs dropped."""
        with self._lock:
            old = [
                r[0]
                for r in self._db.execute(
                    "DELETE FROM instances WHERE state != 'pending' AND completed_at < ? "
                    "RETURNING sop_instance_uid",
                    (self.clock() - max_age_s,),
                ).fetchall()
            ]
            n = len(old)
            rows = self._db.execute(
                "SELECT sop_instance_uid, LENGTH(COALESCE(result_json, '')) FROM instances "
                "WHERE state != 'pending' ORDER BY completed_at DESC"
            ).fetchall()
            total, drop = 0, []
            for uid, size in rows:
                total += size
                if total > max_result_bytes:
                    drop.append((uid,))
            if drop:
                self._db.executemany("DELETE FROM instances WHERE sop_instance_uid = ?", drop)
            if n or drop:
                self._db.execute(
                    "DELETE FROM series_requests WHERE series_uid NOT IN (SELECT series_uid FROM instances)"
                )
        return old + [uid for (uid,) in drop]

    def uids(self) -> list[str]:
        """Every SOP Instance UID the database knows."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT sop_instance_uid FROM instances").fetchall()]

    def subjects(self) -> set[str]:
        """Every SOP Instance, Series Instance and Study Instance UID the database knows (what documents
        can be kept for)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, series_uid, study_uid FROM instances"
            ).fetchall()
        return {uid for row in rows for uid in row if uid}

    def headers_with(self, keys: tuple[str, ...]) -> list[tuple[str, str]]:
        """``(uid, header_json)`` of rows whose kept header mentions any of the DICOM JSON ``keys``."""
        where = " OR ".join("header_json LIKE ?" for _ in keys)
        with self._lock:
            rows = self._db.execute(
                f"SELECT sop_instance_uid, header_json FROM instances WHERE {where}",
                tuple(f'%"{k}"%' for k in keys),
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def set_header(self, uid: str, header_json: str | None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE instances SET header_json = ? WHERE sop_instance_uid = ?", (header_json, uid)
            )

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM instances GROUP BY state").fetchall()
        return {state: n for state, n in rows}
