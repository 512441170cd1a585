"""The export outbox: durable delivery jobs of result documents in the service's SQLite database (WAL).

Tables (:mod:`.schema`; created and migrated with the results' tables by
:func:`retinaedge.service.database.prepare` when an :class:`Outbox` or a ``Store`` opens the database):

- ``export_targets``: one row per configured destination and document kind it receives (``kind``: a
  kind of :mod:`retinaedge.service.results.documents`, ``sr``, ``series-sr``, ``gsps``, ``kos``, with its
  ``scope``), rewritten at each start from the settings (:meth:`Outbox.sync_targets`).
- ``export_documents``: one document per (kind, subject, version, model: whose result it shows): scope ``instance`` (subject: SOP
  Instance UID, version: when it was received), ``series`` (subject: Series Instance UID, version: when
  its last instance arrived, so a series re-opened by a late instance gets a new document) or ``study``
  (subject: Study Instance UID, version: when the last instance of the series whose completion issued
  it arrived: a new version each time one of the study's series completes). ``path``
  names the built file under ``<data_dir>/outbox``, built once, so every retry and every destination gets
  the same SOP instance, ``sop_instance_uid`` (for a stored document such as ``sc``: the folder of its
  files, :mod:`.files`, and their SOP Instance UIDs joined by ``\\``).
- ``export_jobs``: one per (destination, document): ``pending`` until ``delivered`` or ``dead``.
- ``export_attempts``: every attempt; ``outcome`` NULL while in flight, then ``delivered``, ``failed``,
  ``unknown`` (the document may have reached the peer: a time-out after sending) or ``interrupted`` (the
  process stopped during the attempt, found at the next start).
- ``export_counters``: cumulative counts per destination (Prometheus counters survive restarts).
- ``export_series_watch``: series that may become complete (while a destination takes a series- or
  study-scope document such as ``series-sr`` or ``kos``).

Enqueueing is a trigger on ``instances``: the jobs of every instance-scope kind the destinations receive
are inserted in the very transaction that records the instance's result (``pending`` -> ``done``), so a
crash cannot separate the two; series- and study-scope jobs are inserted when a series is complete
(:meth:`Outbox.series_complete`). A delivered job after an ``interrupted`` or ``unknown`` attempt is
counted as a *possible duplicate*: the only way the peer can receive a document twice. A document whose
subject has nothing to show (an instance without findings has no GSPS) is dropped with its jobs
(:meth:`Outbox.discard`), counted per destination as ``skipped``.

``GET /v1/exports`` shows a job's ``kind`` as its scope (``instance``, ``series``, ``study``) and its
document kind as ``document``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from retinaedge.service import database
from retinaedge.service.outbox.records import JOB_SELECT, Job, job_from_row
from retinaedge.service.results.documents import DOCUMENTS, DocumentRegistry

#: Outcomes after which the peer may hold the document although no success was recorded.
MAYBE_SENT = ("unknown", "interrupted")


class Outbox:
    """Thread-safe (one connection behind a lock) access to the outbox tables of ``path``; ``documents``
    says each document kind's scope."""

    def __init__(
        self, path: Path, documents: DocumentRegistry = DOCUMENTS, clock: Callable[[], float] = time.time
    ) -> None:
        self.documents = documents
        #: Timestamps written and compared (back-off, retention): the service's clock, which does not jump.
        self.clock = clock
        self._db = database.connect(path, timeout_s=30)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One committed write transaction (rolled back on error)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- start-up ---------------------------------------------------------------------------------------
    def sync_targets(self, targets: Iterable[tuple[str, Collection[str]]]) -> int:
        """Make ``(name, document kinds)`` the configured destinations; pending jobs of a destination no
        longer configured become dead (returns how many). A kind the registry does not know is a
        ``ValueError`` (the settings check them first)."""
        targets = list(targets)
        names = [t[0] for t in targets]
        rows = []
        for name, kinds in targets:
            for kind in dict.fromkeys(kinds):
                doc = self.documents.get(kind)
                if doc is None:
                    raise ValueError(f"destination {name!r}: no result document is called {kind!r}")
                rows.append((name, kind, doc.scope))
        now = self.clock()
        with self._tx() as db:
            db.execute("DELETE FROM export_targets")
            db.executemany("INSERT INTO export_targets (name, kind, scope) VALUES (?, ?, ?)", rows)
            marks = ",".join("?" for _ in names) or "''"
            cur = db.execute(
                f"UPDATE export_jobs SET state = 'dead', finished_at = ?, "
                f"last_error = 'the destination is no longer configured' "
                f"WHERE state = 'pending' AND destination NOT IN ({marks})",
                (now, *names),
            )
            return cur.rowcount

    def recover(self) -> int:
        """Attempts left in flight by a stopped process become ``interrupted``, their jobs possibly
        delivered (a later delivery counts as a possible duplicate); returns how many."""
        now = self.clock()
        with self._tx() as db:
            rows = db.execute("SELECT id, job_id FROM export_attempts WHERE outcome IS NULL").fetchall()
            for attempt, job in rows:
                db.execute(
                    "UPDATE export_attempts SET outcome = 'interrupted', finished_at = ?, "
                    "detail = 'the service stopped during this attempt' WHERE id = ?",
                    (now, attempt),
                )
                db.execute("UPDATE export_jobs SET possibly_delivered = 1 WHERE id = ?", (job,))
                dest = db.execute("SELECT destination FROM export_jobs WHERE id = ?", (job,)).fetchone()
                if dest:
                    _count(db, dest[0], "attempts_interrupted")
            return len(rows)

    def known_paths(self) -> set[str]:
        return {r[0] for r in self._rows("SELECT path FROM export_documents WHERE path IS NOT NULL")}

    # -- the sender's side ------------------------------------------------------------------------------
    def due(self, destination: str, now: float) -> Job | None:
        """The pending job of ``destination`` that is due first (``next_attempt_at <= now``)."""
        rows = self._rows(
            f"{JOB_SELECT} WHERE j.destination = ? AND j.state = 'pending' AND j.next_attempt_at <= ? "
            "ORDER BY j.next_attempt_at, j.id LIMIT 1",
            (destination, now),
        )
        return job_from_row(rows[0]) if rows else None

    def next_due_at(self, destination: str) -> float | None:
        rows = self._rows(
            "SELECT MIN(next_attempt_at) FROM export_jobs WHERE destination = ? AND state = 'pending'",
            (destination,),
        )
        return rows[0][0] if rows and rows[0][0] is not None else None

    def job(self, job_id: int) -> Job | None:
        rows = self._rows(f"{JOB_SELECT} WHERE j.id = ?", (job_id,))
        return job_from_row(rows[0]) if rows else None

    def set_document(self, document_id: int, path: str, sop_instance_uid: str) -> None:
        """Record the built file (a name under ``<data_dir>/outbox``) of a document and its SOP Instance UID."""
        with self._tx() as db:
            db.execute(
                "UPDATE export_documents SET path = ?, sop_instance_uid = ?, built_at = ? WHERE id = ?",
                (path, sop_instance_uid, self.clock(), document_id),
            )

    def begin(self, job: Job) -> int:
        """Record an attempt as in flight (committed before anything is sent); returns its id."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO export_attempts (job_id, started_at) VALUES (?, ?)", (job.id, self.clock())
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def finish(
        self,
        job: Job,
        attempt: int,
        outcome: str,
        detail: str,
        *,
        confirmed_duplicate: bool = False,
        retry_in_s: float | None = None,
        found_after: int = 0,
    ) -> str:
        """Record the attempt's ``outcome`` (``delivered``, ``failed`` or ``unknown``) and the job's new
        state; ``retry_in_s`` None after a failure means dead-lettered. ``found_after``: the peer was
        asked instead of sent to and holds the document, after that many unanswered attempts (one of
        them stored it; more than one may have stored it twice: a possible duplicate). Returns the job's
        state."""
        now = self.clock()
        with self._tx() as db:
            db.execute(
                "UPDATE export_attempts SET outcome = ?, detail = ?, finished_at = ? WHERE id = ?",
                (outcome, detail[:500], now, attempt),
            )
            _count(db, job.destination, f"attempts_{outcome}")
            maybe_sent = job.possibly_delivered or outcome == "unknown"
            if found_after:
                maybe_sent = found_after > 1
            if outcome == "delivered":
                duplicate = "confirmed" if confirmed_duplicate else ("possible" if maybe_sent else None)
                db.execute(
                    "UPDATE export_jobs SET state = 'delivered', attempts = attempts + 1, finished_at = ?, "
                    "duplicate = ?, last_error = NULL WHERE id = ?",
                    (now, duplicate, job.id),
                )
                _count(db, job.destination, "delivered")
                if duplicate:
                    _count(db, job.destination, f"duplicates_{duplicate}")
                return "delivered"
            state = "pending" if retry_in_s is not None else "dead"
            db.execute(
                "UPDATE export_jobs SET state = ?, attempts = attempts + 1, next_attempt_at = ?, "
                "last_error = ?, finished_at = ?, possibly_delivered = ? WHERE id = ?",
                (
                    state,
                    now + (retry_in_s or 0.0),
                    detail[:500],
                    None if state == "pending" else now,
                    int(maybe_sent),
                    job.id,
                ),
            )
            if state == "dead":
                _count(db, job.destination, "dead")
            return state

    def unanswered(self, job_id: int) -> int:
        """How many attempts of the job may have reached the peer without an answer (``unknown`` or
        ``interrupted``)."""
        marks = ", ".join("?" for _ in MAYBE_SENT)
        with self._lock:
            row = self._db.execute(
                f"SELECT COUNT(*) FROM export_attempts WHERE job_id = ? AND outcome IN ({marks})",
                (job_id, *MAYBE_SENT),
            ).fetchone()
        return int(row[0])

    def kill(self, job: Job, reason: str) -> None:
        """Dead-letter ``job`` without an attempt (its document cannot be built)."""
        with self._tx() as db:
            db.execute(
                "UPDATE export_jobs SET state = 'dead', finished_at = ?, last_error = ? WHERE id = ?",
                (self.clock(), reason[:500], job.id),
            )
            _count(db, job.destination, "dead")

    def discard(self, document_id: int) -> list[str]:
        """Drop a document that has nothing to show: its pending jobs are deleted (each counted as
        ``skipped`` for its destination), and the document with them when no other job refers to it.
        Returns the destinations whose job was dropped."""
        with self._tx() as db:
            names = [
                r[0]
                for r in db.execute(
                    "DELETE FROM export_jobs WHERE document_id = ? AND state = 'pending' RETURNING destination",
                    (document_id,),
                ).fetchall()
            ]
            for name in names:
                _count(db, name, "skipped")
            db.execute(
                "DELETE FROM export_documents WHERE id = ? AND path IS NULL AND NOT EXISTS "
                "(SELECT 1 FROM export_jobs WHERE document_id = ?)",
                (document_id, document_id),
            )
        return names

    def release_documents(self) -> list[str]:
        """Files of documents every job of which is delivered: their paths are cleared and returned
        (the caller deletes the files)."""
        query = (
            "SELECT id, path FROM export_documents d WHERE path IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM export_jobs j WHERE j.document_id = d.id AND j.state != 'delivered')"
        )
        if not self._rows(query):  # the usual case: no write transaction at all
            return []
        with self._tx() as db:
            rows = db.execute(query).fetchall()
            db.executemany("UPDATE export_documents SET path = NULL WHERE id = ?", [(r[0],) for r in rows])
        return [r[1] for r in rows]

    def requeue_dead(self, destinations: list[str]) -> int:
        """Dead jobs of ``destinations`` become pending again, due now, with their attempts reset."""
        marks = ",".join("?" for _ in destinations) or "''"
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE export_jobs SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                f"finished_at = NULL WHERE state = 'dead' AND destination IN ({marks})",
                (self.clock(), *destinations),
            )
            return cur.rowcount

    # -- series -----------------------------------------------------------------------------------------
    def watched_series(self) -> list[tuple[str, str]]:
        """``(series_uid, model)`` of the series that may become complete, oldest first."""
        rows = self._rows("SELECT series_uid, model FROM export_series_watch ORDER BY since")
        return [(r[0], r[1]) for r in rows]

    def unwatch(self, series_uid: str, model: str = "") -> None:
        with self._tx() as db:
            db.execute(
                "DELETE FROM export_series_watch WHERE series_uid = ? AND model = ?", (series_uid, model)
            )

    def series_complete(
        self, series_uid: str, version: float, study_uid: str | None = None, model: str = ""
    ) -> int:
        """Enqueue the documents a complete series issues for the destinations that receive them: the
        series' own (each series-scope kind, e.g. ``series-sr``) and, given its ``study_uid``, a new
        version of its study's (each study-scope kind, e.g. ``kos``), of ``model``'s results; ``version``
        is the series' last instance's arrival for both. Stops watching the series for that model; one
        transaction; returns the jobs added."""
        now = self.clock()
        subjects = [("series", series_uid)] + ([("study", study_uid)] if study_uid is not None else [])
        added = 0
        with self._tx() as db:
            for scope, subject in subjects:
                db.execute(
                    "INSERT OR IGNORE INTO export_documents (kind, scope, subject_uid, version, model) "
                    "SELECT DISTINCT kind, ?, ?, ?, ? FROM export_targets WHERE scope = ?",
                    (scope, subject, version, model, scope),
                )
                cur = db.execute(
                    "INSERT OR IGNORE INTO export_jobs (destination, document_id, state, created_at, "
                    "next_attempt_at) SELECT t.name, d.id, 'pending', ?, ? FROM export_targets t "
                    "JOIN export_documents d ON d.kind = t.kind AND d.subject_uid = ? AND d.version = ? "
                    "AND d.model = ? WHERE t.scope = ?",
                    (now, now, subject, version, model, scope),
                )
                added += cur.rowcount
            db.execute(
                "DELETE FROM export_series_watch WHERE series_uid = ? AND model = ?", (series_uid, model)
            )
            return added

    # -- reporting --------------------------------------------------------------------------------------
    def summary(self) -> dict[str, dict[str, Any]]:
        """Per destination name: ``jobs`` by state, ``counters``, ``oldest_pending_at``, ``last_attempt``
        (``at``, ``outcome``, ``detail``) and ``last_delivered_at``."""
        out: dict[str, dict[str, Any]] = {}

        def entry(name: str) -> dict[str, Any]:
            return out.setdefault(
                name,
                {
                    "jobs": {"pending": 0, "delivered": 0, "dead": 0},
                    "counters": {},
                    "oldest_pending_at": None,
                    "last_attempt": None,
                    "last_delivered_at": None,
                },
            )

        with self._lock:
            db = self._db
            for name, state, n, oldest in db.execute(
                "SELECT destination, state, COUNT(*), MIN(created_at) FROM export_jobs "
                "GROUP BY destination, state"
            ):
                e = entry(name)
                e["jobs"][state] = n
                if state == "pending":
                    e["oldest_pending_at"] = oldest
            for name, key, n in db.execute("SELECT destination, key, n FROM export_counters"):
                entry(name)["counters"][key] = n
            for name, at, outcome, detail in db.execute(
                "SELECT j.destination, a.started_at, a.outcome, a.detail FROM export_attempts a "
                "JOIN export_jobs j ON j.id = a.job_id WHERE a.id IN "
                "(SELECT MAX(a2.id) FROM export_attempts a2 JOIN export_jobs j2 ON j2.id = a2.job_id "
                "WHERE a2.outcome IS NOT NULL GROUP BY j2.destination)"
            ):
                entry(name)["last_attempt"] = {"at": at, "outcome": outcome, "detail": detail}
            for name, at in db.execute(
                "SELECT destination, MAX(finished_at) FROM export_jobs WHERE state = 'delivered' "
                "GROUP BY destination"
            ):
                entry(name)["last_delivered_at"] = at
        return out

    def jobs(self, state: str | None, destination: str | None, limit: int) -> list[Job]:
        """Jobs, newest first, optionally of one state and destination."""
        where, args = [], []
        if state is not None:
            where.append("j.state = ?")
            args.append(state)
        if destination is not None:
            where.append("j.destination = ?")
            args.append(destination)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self._rows(f"{JOB_SELECT}{clause} ORDER BY j.id DESC LIMIT ?", (*args, limit))
        return [job_from_row(r) for r in rows]

    def attempts(self, job_id: int) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT started_at, finished_at, outcome, detail FROM export_attempts WHERE job_id = ? ORDER BY id",
            (job_id,),
        )
        return [
            {"started_at": s, "finished_at": f, "outcome": o or "in-flight", "detail": d}
            for s, f, o, d in rows
        ]

    def prune(self, max_age_s: float) -> list[str]:
        """Drop finished jobs older than ``max_age_s``, their attempts, and documents no job refers to;
        returns the file names to delete (under ``<data_dir>/outbox``)."""
        cutoff = self.clock() - max_age_s
        with self._tx() as db:
            old = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM export_jobs WHERE state != 'pending' AND finished_at < ?", (cutoff,)
                )
            ]
            db.executemany("DELETE FROM export_attempts WHERE job_id = ?", [(i,) for i in old])
            db.executemany("DELETE FROM export_jobs WHERE id = ?", [(i,) for i in old])
            gone = db.execute(
                "DELETE FROM export_documents WHERE id NOT IN (SELECT document_id FROM export_jobs) "
                "RETURNING path"
            ).fetchall()
        return [r[0] for r in gone if r[0]]


def _count(db: sqlite3.Connection, destination: str, key: str) -> None:
    db.execute(
        "INSERT INTO export_counters (destination, key, n) VALUES (?, ?, 1) "
        "ON CONFLICT(destination, key) DO UPDATE SET n = n + 1",
        (destination, key),
    )
