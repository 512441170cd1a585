"""A damaged ``state.sqlite3``: found at start, moved aside, replaced by a new database, salvaged.

A database truncated or overwritten while the service was stopped (a failing card, a bad copy) must not
stop it from starting, and must not take the instances in the spool with it. :func:`open_state` opens the
database as every room does (:func:`.database.connect`) and runs SQLite's ``PRAGMA quick_check``; when
SQLite says the file is not a database, or is malformed, it

1. moves the file and its ``-wal``/``-shm`` aside, to ``state.sqlite3.damaged-<UTC time>`` (kept for a
   person to look at, never deleted by the service), with one ERROR line saying so;
2. creates a new database at the latest schema version;
3. copies the ``instances`` rows it can still read from the damaged file (results, pending rows: the
   rest, export jobs included, is lost with it);
4. leaves the spool to the processor's recovery, which records every spool file that has no row from the
   file's own bytes (:mod:`.intake.recovery`).

``/readyz`` and ``retinaedge boot --check`` report it (:class:`Damage`, :func:`inspect_state`). Errors
that are not damage (the disk is read-only, an I/O error, a lock) are raised as they are: they are
storage faults, answered 503, and the file is left alone.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaedge.service import database

log = logging.getLogger(__name__)

#: Columns of ``instances`` copied from a damaged database (those of every schema version).
_INSTANCE_COLUMNS = (
    "sop_instance_uid, sop_class_uid, study_uid, series_uid, spool_path, size_bytes, received_at, state, "
    "completed_at, error_type, error_message, result_json, header_json"
)


@dataclass(frozen=True)
class Damage:
    """What was found and done at start: why the file was damaged, where it went, rows salvaged."""

    reason: str
    moved_to: str
    salvaged_rows: int

    def to_json(self) -> dict[str, Any]:
        return {"damaged": self.reason, "moved_to": self.moved_to, "salvaged_rows": self.salvaged_rows}

    def describe(self) -> str:
        return (
            f"the state database was damaged at start ({self.reason}) and moved aside to {self.moved_to}; "
            f"a new one was built ({self.salvaged_rows} result row(s) salvaged, pending instances "
            "recovered from the spool)"
        )


def damage_of(exc: sqlite3.DatabaseError) -> str | None:
    """The reason when ``exc`` says the file is damaged, None for a storage fault (locked, read-only,
    I/O: ``sqlite3.OperationalError``) that moving the file aside would not cure."""
    if isinstance(exc, sqlite3.OperationalError):
        return None
    return str(exc) or type(exc).__name__


def quick_check(db: sqlite3.Connection) -> str | None:
    """SQLite's ``quick_check`` on an open database: None when it is sound, else its first complaint."""
    rows = db.execute("PRAGMA quick_check(5)").fetchall()
    if rows and rows[0][0] == "ok":
        return None
    return "; ".join(str(r[0]) for r in rows)[:300] or "quick_check failed"


def open_state(path: Path, *, timeout_s: float = 5.0) -> tuple[sqlite3.Connection, Damage | None]:
    """Open (and migrate) the database at ``path``; a damaged one is replaced (module docstring)."""
    reason: str | None
    try:
        db = database.connect(path, timeout_s=timeout_s)
        reason = quick_check(db)
        if reason is None:
            return db, None
        db.close()
    except sqlite3.DatabaseError as exc:
        reason = damage_of(exc)
        if reason is None:
            raise
    aside = move_aside(path)
    log.error(
        "the state database %s is damaged (%s): moved aside to %s; a new one is built, and every spool "
        "file is recovered from its own bytes",
        path,
        reason,
        aside.name,
    )
    db = database.connect(path, timeout_s=timeout_s)
    salvaged = salvage(aside, db)
    if salvaged:
        log.warning("%d instance row(s) were salvaged from the damaged database", salvaged)
    return db, Damage(reason, aside.name, salvaged)


def move_aside(path: Path) -> Path:
    """Rename ``path`` and its ``-wal``/``-shm`` to ``<name>.damaged-<UTC time>[-wal|-shm]``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, aside.with_name(aside.name + suffix))
    os.replace(path, aside)
    return aside


def salvage(damaged: Path, db: sqlite3.Connection) -> int:
    """Copy the ``instances`` rows SQLite can still read from ``damaged`` into ``db``; returns how many."""
    rows: list[tuple[Any, ...]] = []
    try:
        old = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    try:
        for row in old.execute(f"SELECT {_INSTANCE_COLUMNS} FROM instances"):
            rows.append(row)
    except sqlite3.Error as exc:
        log.info("salvage stopped after %d row(s): %s", len(rows), exc)
    finally:
        old.close()
    if rows:
        marks = ",".join("?" for _ in range(13))
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(f"INSERT OR IGNORE INTO instances ({_INSTANCE_COLUMNS}) VALUES ({marks})", rows)
        except sqlite3.Error as exc:
            db.execute("ROLLBACK")
            log.info("the salvaged rows could not be kept: %s", exc)
            return 0
        db.execute("COMMIT")
    return len(rows)


def inspect_state(path: Path) -> dict[str, Any]:
    """For ``boot --check``, read-only: ``state`` ``missing``, ``ok`` (with ``schema_version``),
    ``damaged`` (with ``reason``: the service will move it aside and rebuild) or ``unreadable`` (a
    storage fault: the service answers 503 until it is fixed)."""
    if not path.exists():
        return {"state": "missing", "path": str(path)}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            reason = quick_check(db)
            version = database.version(db)
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        reason = damage_of(exc)
        if reason is None:
            return {"state": "unreadable", "path": str(path), "reason": str(exc)}
        version = None
    if reason is not None:
        return {
            "state": "damaged",
            "path": str(path),
            "reason": reason,
            "action": "moved aside and rebuilt from the spool at start",
        }
    return {"state": "ok", "path": str(path), "schema_version": version}
