"""The state database as a whole: what start-up, retention and ``/readyz`` ask of it.

:class:`Upkeep` is the half of :class:`~.store.Store` that sees every model's rows at once (the other half,
in :mod:`.store`, reads and writes one model's results): whether the database can be written, its newest
timestamp, the adoption of rows written before several models, retention, and the keys the kept files
are swept against (identities, captures, built documents).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable

from retinaedge.service import database
from retinaedge.service.results.rows import subject_key


class Clock:
    """The clock the bound stores of one database share (set once by the service)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.now = clock


class Upkeep:
    """Database-wide queries over ``_db`` behind ``_lock`` (module docstring); mixed into ``Store``."""

    _db: sqlite3.Connection
    _lock: threading.Lock
    _clock: Clock

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

    def adopt_unnamed(
        self,
        served: list[str],
        before_commit: Callable[[list[tuple[str, str]]], object] = lambda _adopted: None,
    ) -> list[tuple[str, str]]:
        """Give the rows without a model (written before several models, by the one model there was) a
        model: the one their result names when it is served, else that old model's name as the named
        results show it most often, else the first model ``served``; the outbox's documents and watched
        series likewise. Returns the ``(uid, model)`` adopted (their kept files move to their new key,
        :func:`.rows.subject_key`). One transaction.

        ``before_commit(adopted)`` runs inside it, before the commit (the caller moves the kept files
        there): if it raises, or the process dies before the commit, the rows stay without a model and
        the next start adopts them again, so a step that must follow the commit is never lost. Moving
        files must therefore be idempotent (:meth:`.captures.CaptureFiles.adopt`)."""
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
                if adopted:
                    before_commit(adopted)
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

    def prune(self, max_age_s: float, max_result_bytes: int) -> list[tuple[str, str]]:
        """Retention: drop finished rows (of every model) older than ``max_age_s``, then the oldest beyond
        the byte budget; returns the ``(uid, model)`` of the rows dropped."""
        with self._lock:
            old = [
                (r[0], r[1])
                for r in self._db.execute(
                    "DELETE FROM instances WHERE state != 'pending' AND completed_at < ? "
                    "RETURNING sop_instance_uid, model",
                    (self._clock.now() - max_age_s,),
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
