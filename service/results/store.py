"""SQLite (WAL) record of received instances and their results.

One row per SOP Instance UID and model: ``pending`` until that model's worker has run it, then ``done``
(result JSON) or ``failed`` (error type and message; ``not-applicable`` when the instance is outside the
model's intended use). Receiving a UID twice is idempotent: the first rows stand.

A :class:`Store` is *bound* to one model (``model``; :meth:`Store.bound` gives another model's view of
the same connection): the methods that read or write results (``get``, ``add_pending``, ``done``,
``series_rows``...) see that model's rows only; those about instances and the database as a whole
(``backlog``, ``spool_paths``, ``prune``, ``uids``, ``subjects``...) see every model's.
``series_requests`` records when a client asked for a series to be treated as complete. The queries of
the database as a whole that start-up and retention make (adoption, ``prune``, the keys of kept files)
live in :mod:`.upkeep`, mixed in. The tables are
described in :mod:`.schema`; opening a :class:`Store` brings the database to the schema version this code
knows (:func:`retinaedge.service.database.prepare`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retinaedge.service import repair
from retinaedge.service.results.rows import (
    ADD_NOT_APPLICABLE,
    ADD_PENDING,
    PUT_DONE,
    Declined,
    Row,
)
from retinaedge.service.results.upkeep import Clock, Upkeep


class Store(Upkeep):
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
        self._clock = Clock(clock)
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

    def counts(self) -> dict[str, int]:
        """This model's rows by state (:func:`state_of`: ``not_applicable`` apart from ``failed``)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT CASE WHEN state = 'failed' AND error_type = 'not-applicable' THEN 'not_applicable' "
                "ELSE state END AS s, COUNT(*) FROM instances WHERE model = ? GROUP BY s",
                (self.model,),
            ).fetchall()
        return {state: n for state, n in rows}
