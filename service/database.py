"""The schema version of the service's SQLite database (``state.sqlite3``) and its forward migrations.

The results (``instances``, ``series_requests``: :mod:`.results.schema`) and the outbox (``export_*``:
:mod:`.outbox.schema`) share one database file. Each room describes its tables as the latest version has
them; this module owns what is common: the version, kept in ``PRAGMA user_version``, and the ordered
:data:`~.migrations.STEPS` (in :mod:`.migrations`) that take a database from version N to N+1. The
steps are the only DDL that runs, so that a new database and a migrated one cannot differ
(tests/service/test_state_migrations.py checks that the steps produce exactly the rooms' descriptions). This module imports no room: the lowest one (the results'
``Store``) opens the database too.

Versions:

- **0**: a database written by the code before versioning (no ``user_version``; recognised by its
  tables), or a new, empty one. The outbox took "instance SRs" and "series SRs" by name
  (``export_targets.instance_sr``/``series_sr``, ``export_documents.kind`` ``instance`` or ``series``).
  :data:`V0_SCHEMA` is its DDL, frozen.
- **1**: the outbox stores result document kinds (:mod:`.results.documents`): ``export_targets`` has one
  row per destination and kind it receives, ``export_documents`` the document's ``kind`` (``sr``,
  ``series-sr``) and ``scope`` (``instance``, ``series``), and ``sop_instance_uid`` for the built object.
- **2**: documents of a study (the Key Object Selection, ``kos``): ``export_targets.scope`` and
  ``export_documents.scope`` may be ``study`` (subject: the Study Instance UID), a series is watched for
  completion while a destination takes a series- or study-scope document, and ``instances`` has an index
  on ``study_uid``.
- **3**: several models per appliance: a result per instance *and model* (``instances`` keyed by both),
  the outbox's documents and watched series name their model. Rows of before have model '' until the
  service adopts them for its first model.

:func:`prepare`, called by every connection that opens the database (:class:`.results.store.Store`,
:class:`.outbox.queue.Outbox`), brings it to :data:`LATEST` in one ``BEGIN IMMEDIATE`` transaction: every
step from its version on, all or nothing (a crash leaves it as it was). A new database runs all of them
(step 1 begins by creating the version 0 tables). A newer database is refused
(:class:`~retinaedge.runtime.errors.StateVersionError`): a database is never downgraded.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from retinaedge.runtime.errors import StateVersionError
from retinaedge.service.migrations import STEPS, has_v0_tables

log = logging.getLogger(__name__)

#: The version this code writes.
LATEST = len(STEPS)


def version(db: sqlite3.Connection) -> int:
    """The database's schema version (``PRAGMA user_version``)."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def connect(path: Path, *, timeout_s: float = 5.0) -> sqlite3.Connection:
    """A connection to the database at ``path`` as every room opens it: autocommit (transactions are
    explicit), usable from any thread (each room guards it with its own lock), write-ahead log with
    ``synchronous=FULL`` (a committed row survives a power cut), waiting up to ``timeout_s`` seconds for
    a lock, and brought to :data:`LATEST` by :func:`prepare`."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout_s)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    prepare(db)
    return db


def prepare(db: sqlite3.Connection) -> None:
    """Bring the database ``db`` (a connection in autocommit mode, ``isolation_level=None``) to
    :data:`LATEST` (module docstring); a no-op when it is there. Raises :class:`StateVersionError` for a
    database newer than this code."""
    found = version(db)
    if found == LATEST:
        return
    _check_not_newer(db, found)
    db.execute("BEGIN IMMEDIATE")  # one writer: another connection migrating meanwhile is waited for
    try:
        found = version(db)  # again, under the lock
        _check_not_newer(db, found)
        new = found == 0 and not has_v0_tables(db)
        for step in STEPS[found:]:
            step.apply(db)
            if not new:
                log.info("state database migrated to schema version %d: %s", step.version, step.what)
        db.execute(f"PRAGMA user_version = {LATEST:d}")
        if new:
            log.info("state database created at schema version %d", LATEST)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _check_not_newer(db: sqlite3.Connection, found: int) -> None:
    if found > LATEST:
        raise StateVersionError(
            f"the state database {_name(db)} has schema version {found}, written by a newer retinaedge; "
            f"this version knows up to {LATEST} and never downgrades a database: run the newer version, "
            "or move the data directory aside to start afresh"
        )


def _name(db: sqlite3.Connection) -> str:
    row = db.execute("PRAGMA database_list").fetchone()
    return str(row[2]) if row and row[2] else "(in memory)"
