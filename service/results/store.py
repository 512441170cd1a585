"""SQLite (WAL) record of received instances and their results.

One row per SOP Instance UID and model: ``pending`` until that model's worker has run it, then ``done``
(result JSON) or ``failed`` (error type and message; ``not-applicable`` when the instance is outside the
model's intended use). Receiving a UID twice is idempotent: the first rows stand.

A :class:`Store` is *bound* to one model (``model``; :meth:`Store.bound` gives another model's view of
the same connection): the methods that read or write results (``get``, ``add_pending``, ``done``,
``series_rows``...) see that model's rows only; those about instances and the database as a whole
(``backlog``, ``spool_paths``, ``prune``, ``uids``, ``subjects``...) see every model's.
``series_requests`` records when a client asked for a series to be treated as complete. The tables are
described in :mod:`.schema`; opening a :class:`Store` brings the database to the schema version this code
knows (:func:`retinaedge.service.database.prepare`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from retinaedge.service import database, repair
from retinaedge.service.results.rows import (
    ADD_NOT_APPLICABLE,
    ADD_PENDING,
    PUT_DONE,
    Declined,
    Row,
    subject_key,
)


class _Clock:
    """The clock the bound stores of one database share (set once by the service)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.now = clock


class Store:
    """Thread-safe (one connection behind a lock); every write is a committed transaction.

    ``clock`` gives the timestamps it writes and retention compares (epoch seconds): the service passes
    its :class:`~retinaedge.service.clock.ServiceClock`, which does not jump with the wall clock.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time, *, model: str = "") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        #: Set when the database was found damaged at start and rebuilt (:mod:`retinaedge.service.repair`).
        self.damage: repair.Damage | None
        self._db, self.damage = repair.open_state(path)
        self._lock = threading.Lock()
        self._clock = _Clock(clock)
        #: The model whose results this store reads and writes (module docstring).
        self.model = model

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock.now

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self._clock.now = clock  # for every store bound to this database

    def bound(self, model: str) -> Store:
        """The same database, reading and writing ``model``'s results (one connection, one lock)."""
        other = object.__new__(Store)
        other._db, other._lock, other._clock, other.damage = self._db, self._lock, self._clock, self.damage
        other.model = model
        return other

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
        added = self.add_instance(
            uid, sop_class, study, series, spool_path, size, header_json, accepted=[self.model]
        )
        return bool(added)

    def add_instance(
        self,
        uid: str,
        sop_class: str,
        study: str,
        series: str,
        spool_path: str,
        size: int,
        header_json: str | None,
        *,
        accepted: list[str],
        declined: dict[str, Declined] | None = None,
    ) -> list[str]:
        """Record a received instance for several models in one transaction: a pending row for each model
        in ``accepted``, a ``not-applicable`` one for each in ``declined``. A model's earlier row stands
        unless it failed (:meth:`add_pending`). Returns the models whose pending row was added (each to be
        processed)."""
        now = self.clock()
        added: list[str] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for model in accepted:
                    cur = self._db.execute(
                        ADD_PENDING,
                        (uid, sop_class, study, series, spool_path, size, now, header_json, model),
                    )
                    if cur.rowcount == 1:
                        added.append(model)
                for model, why in (declined or {}).items():
                    self._db.execute(
                        ADD_NOT_APPLICABLE,
                        (uid, sop_class, study, series, size, now, now, why.message, json.dumps(why.outcome),
                         header_json, model),
                    )  # fmt: skip
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return added

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
                PUT_DONE,
                (uid, sop_class, study, series, size, now, now, json.dumps(result), header_json, self.model),
            )

    def put_done_many(self, rows: list[tuple[str, str, str, str, int, dict[str, Any], str | None]]) -> None:
        """:meth:`put_done` for many ``(uid, sop_class, study, series, size, result, header_json)`` in one
        transaction (one commit, one fsync)."""
        now = self.clock()
        values = [(u, c, st, se, n, now, now, json.dumps(r), h, self.model) for u, c, st, se, n, r, h in rows]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(PUT_DONE, values)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def get(self, uid: str) -> Row | None:
        """This model's row of ``uid``, or None."""
        return self._one(
            "SELECT * FROM instances WHERE sop_instance_uid = ? AND model = ?", (uid, self.model)
        )

    def instance_rows(self, uid: str) -> list[Row]:
        """Every model's row of ``uid``, in the order the models were recorded."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM instances WHERE sop_instance_uid = ? ORDER BY rowid", (uid,)
            ).fetchall()
        return [Row(*r) for r in rows]

    def _rows(self, column: str, uid: str, every_model: bool) -> list[Row]:
        """The kept rows whose ``column`` (``series_uid``, ``study_uid``) is ``uid``, this model's or every
        model's, in order of arrival."""
        where = f"{column} = ?" + ("" if every_model else " AND model = ?")
        args = (uid,) if every_model else (uid, self.model)
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM instances WHERE {where} ORDER BY received_at, sop_instance_uid, rowid", args
            ).fetchall()
        return [Row(*r) for r in rows]

    def series_rows(self, series_uid: str) -> list[Row]:
        """This model's kept instances of one series, in order of arrival."""
        return self._rows("series_uid", series_uid, False)

    def study_rows(self, study_uid: str) -> list[Row]:
        """This model's kept instances of one study, in order of arrival."""
        return self._rows("study_uid", study_uid, False)

    def series_rows_of_all(self, series_uid: str) -> list[Row]:
        """Every model's kept rows of one series, in order of arrival."""
        return self._rows("series_uid", series_uid, True)

    def study_rows_of_all(self, study_uid: str) -> list[Row]:
        """Every model's kept rows of one study, in order of arrival."""
        return self._rows("study_uid", study_uid, True)

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
        """This model's pending instances, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid FROM instances WHERE state = 'pending' AND model = ? "
                "ORDER BY received_at",
                (self.model,),
            ).fetchall()
        return [r[0] for r in rows]

    def pending_keys(self) -> list[tuple[str, str]]:
        """``(uid, model)`` of every model's pending rows, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, model FROM instances WHERE state = 'pending' ORDER BY received_at"
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def backlog(self) -> tuple[int, int]:
        """``(instances, bytes)`` acknowledged and not processed yet by some model (a pending row; an
        instance counts once, whatever number of models wait for it)."""
        with self._lock:
            n, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM (SELECT MAX(size_bytes) AS size_bytes "
                "FROM instances WHERE state = 'pending' GROUP BY sop_instance_uid)"
            ).fetchone()
        return int(n), int(size)

    def spool_in_use(self, spool_path: str) -> bool:
        """True while a row (of any model) still waits for the spool file ``spool_path``."""
        with self._lock:
            r = self._db.execute(
                "SELECT 1 FROM instances WHERE spool_path = ? LIMIT 1", (spool_path,)
            ).fetchone()
        return r is not None

    def adopt_unnamed(self, served: list[str]) -> list[tuple[str, str]]:
        """Give the rows without a model (written before several models, by the one model there was) a
        model: the one their result names when it is served, else that old model's name as the named
        results show it most often, else the first model ``served``; the outbox's documents and watched
        series likewise. Returns the ``(uid, model)`` adopted (their kept files move to their new key,
        :func:`.rows.subject_key`). One transaction."""
        named = (
            "CASE json_type(result_json, '$.model') WHEN 'object' THEN json_extract(result_json, '$.model.name') "
            "WHEN 'text' THEN json_extract(result_json, '$.model') END"
        )
        marks = ",".join("?" for _ in served)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                unnamed = [
                    r[0] for r in self._db.execute("SELECT sop_instance_uid FROM instances WHERE model = ''")
                ]
                self._db.execute(
                    f"UPDATE instances SET model = {named} WHERE model = '' AND result_json IS NOT NULL "
                    f"AND json_valid(result_json) AND {named} IN ({marks})",
                    served,
                )
                top = self._db.execute(
                    "SELECT model, COUNT(*) AS n FROM instances WHERE model != '' GROUP BY model "
                    "ORDER BY n DESC LIMIT 1"
                ).fetchone()
                old = top[0] if top is not None and top[0] in served else served[0]
                self._db.execute("UPDATE instances SET model = ? WHERE model = ''", (old,))
                self._db.execute(
                    "UPDATE export_documents SET model = COALESCE((SELECT i.model FROM instances i WHERE "
                    "i.sop_instance_uid = export_documents.subject_uid LIMIT 1), ?) "
                    "WHERE model = '' AND scope = 'instance'",
                    (old,),
                )
                self._db.execute("UPDATE export_documents SET model = ? WHERE model = ''", (old,))
                self._db.execute("UPDATE export_series_watch SET model = ? WHERE model = ''", (old,))
                adopted = [
                    (r[0], r[1])
                    for r in self._db.execute(
                        "SELECT sop_instance_uid, model FROM instances WHERE sop_instance_uid IN "
                        "(SELECT value FROM json_each(?))",
                        (json.dumps(unnamed),),
                    ).fetchall()
                ]
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return adopted

    def models(self) -> set[str]:
        """The models with rows."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT DISTINCT model FROM instances").fetchall()}

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
                "WHERE sop_instance_uid = ? AND model = ?",
                (self.clock(), json.dumps(result), uid, self.model),
            )

    def failed(self, uid: str, error_type: str, message: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE instances SET state = 'failed', completed_at = ?, error_type = ?, error_message = ?, "
                "spool_path = NULL WHERE sop_instance_uid = ? AND model = ?",
                (self.clock(), error_type, message, uid, self.model),
            )

    def not_applicable(self, uid: str, outcome: dict[str, Any], message: str) -> None:
        """Record that no model takes the instance: a ``failed`` row of error type ``not-applicable``
        whose ``result_json`` holds ``outcome`` (the model and the rules it failed, for ``GET
        /v1/results``); like a failure it enqueues nothing to export and releases its spool file."""
        with self._lock:
            self._db.execute(
                "UPDATE instances SET state = 'failed', completed_at = ?, error_type = 'not-applicable', "
                "error_message = ?, result_json = ?, spool_path = NULL WHERE sop_instance_uid = ? AND model = ?",
                (self.clock(), message, json.dumps(outcome), uid, self.model),
            )

    def prune(self, max_age_s: float, max_result_bytes: int) -> list[tuple[str, str]]:
        """Retention: drop finished rows (of every model) older than ``max_age_s``, then the oldest beyond
        the byte budget; returns the ``(uid, model)`` of the rows dropped."""
        with self._lock:
            old = [
                (r[0], r[1])
                for r in self._db.execute(
                    "DELETE FROM instances WHERE state != 'pending' AND completed_at < ? "
                    "RETURNING sop_instance_uid, model",
                    (self.clock() - max_age_s,),
                ).fetchall()
            ]
            rows = self._db.execute(
                "SELECT sop_instance_uid, model, LENGTH(COALESCE(result_json, '')) FROM instances "
                "WHERE state != 'pending' ORDER BY completed_at DESC"
            ).fetchall()
            total, drop = 0, []
            for uid, model, size in rows:
                total += size
                if total > max_result_bytes:
                    drop.append((uid, model))
            if drop:
                self._db.executemany("DELETE FROM instances WHERE sop_instance_uid = ? AND model = ?", drop)
            if old or drop:
                self._db.execute(
                    "DELETE FROM series_requests WHERE series_uid NOT IN (SELECT series_uid FROM instances)"
                )
        return old + drop

    def known(self, uids: Iterable[str]) -> set[str]:
        """Those of ``uids`` that some model still has a row of."""
        wanted = list(set(uids))
        found: set[str] = set()
        with self._lock:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" for _ in chunk)
                found.update(
                    r[0]
                    for r in self._db.execute(
                        f"SELECT DISTINCT sop_instance_uid FROM instances WHERE sop_instance_uid IN ({marks})",
                        chunk,
                    ).fetchall()
                )
        return found

    def uids(self) -> list[str]:
        """Every SOP Instance UID the database knows (of any model, each once)."""
        with self._lock:
            return [
                r[0] for r in self._db.execute("SELECT DISTINCT sop_instance_uid FROM instances").fetchall()
            ]

    def keys(self) -> set[str]:
        """The :func:`subject_key` of every row (an instance's result of one model)."""
        with self._lock:
            rows = self._db.execute("SELECT model, sop_instance_uid FROM instances").fetchall()
        return {subject_key(m, u) for m, u in rows}

    def subjects(self) -> set[str]:
        """The :func:`subject_key` of every model's SOP Instance, Series Instance and Study Instance UID
        the database knows (what documents can be kept for)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model, sop_instance_uid, series_uid, study_uid FROM instances"
            ).fetchall()
        return {subject_key(row[0], uid) for row in rows for uid in row[1:] if uid}

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
        """This model's rows by state (:func:`state_of`: ``not_applicable`` apart from ``failed``)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT CASE WHEN state = 'failed' AND error_type = 'not-applicable' THEN 'not_applicable' "
                "ELSE state END AS s, COUNT(*) FROM instances WHERE model = ? GROUP BY s",
                (self.model,),
            ).fetchall()
        return {state: n for state, n in rows}
