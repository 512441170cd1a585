"""The state database's migrations: the frozen DDL of version 0 and the ordered steps N -> N + 1.

History, kept apart from :mod:`.database` (which owns the version, the connection and :func:`~.database.
prepare`, which runs these steps): a step is never edited once released, a schema change is a new step
here plus the new description in its room's schema module (tests/service/test_state_migrations.py checks
that they agree). The versions are described in :mod:`.database`'s docstring.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass

#: The DDL of version 0, exactly as the code before versioning ran it at every start (``IF NOT
#: EXISTS``): step 1 runs it first, creating the tables of a new database and completing a version 0 one
#: that lacks some (the outbox's, say).
V0_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid    TEXT NOT NULL,
    study_uid        TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    spool_path       TEXT,
    size_bytes       INTEGER NOT NULL,
    received_at      REAL NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('pending', 'done', 'failed')),
    completed_at     REAL,
    error_type       TEXT,
    error_message    TEXT,
    result_json      TEXT,
    header_json      TEXT
);
CREATE INDEX IF NOT EXISTS instances_state ON instances (state, received_at);
CREATE INDEX IF NOT EXISTS instances_completed ON instances (completed_at);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
CREATE TABLE IF NOT EXISTS series_requests (
    series_uid   TEXT PRIMARY KEY,
    requested_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS export_targets (
    name        TEXT PRIMARY KEY,
    instance_sr INTEGER NOT NULL,
    series_sr   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS export_documents (
    id                  INTEGER PRIMARY KEY,
    kind                TEXT NOT NULL CHECK (kind IN ('instance', 'series')),
    subject_uid         TEXT NOT NULL,
    version             REAL NOT NULL,
    path                TEXT,
    sr_sop_instance_uid TEXT,
    built_at            REAL,
    UNIQUE (kind, subject_uid, version)
);
CREATE TABLE IF NOT EXISTS export_jobs (
    id                 INTEGER PRIMARY KEY,
    destination        TEXT NOT NULL,
    document_id        INTEGER NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    created_at         REAL NOT NULL,
    next_attempt_at    REAL NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    possibly_delivered INTEGER NOT NULL DEFAULT 0,
    duplicate          TEXT,
    last_error         TEXT,
    finished_at        REAL,
    UNIQUE (destination, document_id)
);
CREATE INDEX IF NOT EXISTS export_jobs_due ON export_jobs (destination, state, next_attempt_at);
CREATE INDEX IF NOT EXISTS export_jobs_document ON export_jobs (document_id);
CREATE TABLE IF NOT EXISTS export_attempts (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    outcome     TEXT,
    detail      TEXT
);
CREATE INDEX IF NOT EXISTS export_attempts_job ON export_attempts (job_id);
CREATE TABLE IF NOT EXISTS export_counters (
    destination TEXT NOT NULL,
    key         TEXT NOT NULL,
    n           INTEGER NOT NULL,
    PRIMARY KEY (destination, key)
);
CREATE TABLE IF NOT EXISTS export_series_watch (
    series_uid TEXT PRIMARY KEY,
    since      REAL NOT NULL
);
CREATE TRIGGER IF NOT EXISTS export_instance_done AFTER UPDATE OF state ON instances
WHEN OLD.state = 'pending' AND NEW.state = 'done'
BEGIN
    INSERT OR IGNORE INTO export_documents (kind, subject_uid, version)
        SELECT 'instance', NEW.sop_instance_uid, NEW.received_at
        WHERE EXISTS (SELECT 1 FROM export_targets WHERE instance_sr = 1);
    INSERT OR IGNORE INTO export_jobs (destination, document_id, state, created_at, next_attempt_at)
        SELECT t.name, d.id, 'pending', NEW.completed_at, NEW.completed_at
        FROM export_targets t JOIN export_documents d
          ON d.kind = 'instance' AND d.subject_uid = NEW.sop_instance_uid AND d.version = NEW.received_at
        WHERE t.instance_sr = 1;
END;
CREATE TRIGGER IF NOT EXISTS export_series_touched AFTER UPDATE OF state ON instances
WHEN OLD.state = 'pending' AND NEW.state IN ('done', 'failed')
     AND EXISTS (SELECT 1 FROM export_targets WHERE series_sr = 1)
BEGIN
    INSERT OR IGNORE INTO export_series_watch (series_uid, since) VALUES (NEW.series_uid, NEW.completed_at);
END;
"""

#: The tables a version 0 database is recognised by (``user_version`` 0 with any of them: not a new one).
V0_TABLES = ("instances", "series_requests", "export_targets", "export_documents", "export_jobs")


def _v1_document_kinds(db: sqlite3.Connection) -> None:
    """0 -> 1: the outbox stores document kinds instead of instance/series flags. Destinations'
    ``instance_sr`` becomes kind ``sr``, ``series_sr`` kind ``series-sr``; documents ``instance`` /
    ``series`` become ``sr`` / ``series-sr`` with that scope, keeping their ids (jobs refer to them), file
    and SOP Instance UID. Jobs, attempts, counters and the series watch are untouched."""
    script(db, V0_SCHEMA)
    script(
        db,
        """
DROP TRIGGER export_instance_done;
DROP TRIGGER export_series_touched;
ALTER TABLE export_targets RENAME TO export_targets_v0;
CREATE TABLE export_targets (
    name  TEXT NOT NULL,
    kind  TEXT NOT NULL,
    scope TEXT NOT NULL CHECK (scope IN ('instance', 'series')),
    PRIMARY KEY (name, kind)
);
INSERT INTO export_targets (name, kind, scope)
    SELECT name, 'sr', 'instance' FROM export_targets_v0 WHERE instance_sr = 1;
INSERT INTO export_targets (name, kind, scope)
    SELECT name, 'series-sr', 'series' FROM export_targets_v0 WHERE series_sr = 1;
DROP TABLE export_targets_v0;
ALTER TABLE export_documents RENAME TO export_documents_v0;
CREATE TABLE export_documents (
    id               INTEGER PRIMARY KEY,
    kind             TEXT NOT NULL,
    scope            TEXT NOT NULL CHECK (scope IN ('instance', 'series')),
    subject_uid      TEXT NOT NULL,
    version          REAL NOT NULL,
    path             TEXT,
    sop_instance_uid TEXT,
    built_at         REAL,
    UNIQUE (kind, subject_uid, version)
);
INSERT INTO export_documents (id, kind, scope, subject_uid, version, path, sop_instance_uid, built_at)
    SELECT id, CASE kind WHEN 'instance' THEN 'sr' ELSE 'series-sr' END, kind, subject_uid, version, path,
           sr_sop_instance_uid, built_at
    FROM export_documents_v0;
DROP TABLE export_documents_v0;
CREATE TRIGGER export_instance_done AFTER UPDATE OF state ON instances
WHEN OLD.state = 'pending' AND NEW.state = 'done'
BEGIN
    INSERT OR IGNORE INTO export_documents (kind, scope, subject_uid, version)
        SELECT DISTINCT kind, 'instance', NEW.sop_instance_uid, NEW.received_at
        FROM export_targets WHERE scope = 'instance';
    INSERT OR IGNORE INTO export_jobs (destination, document_id, state, created_at, next_attempt_at)
        SELECT t.name, d.id, 'pending', NEW.completed_at, NEW.completed_at
        FROM export_targets t JOIN export_documents d
          ON d.kind = t.kind AND d.subject_uid = NEW.sop_instance_uid AND d.version = NEW.received_at
        WHERE t.scope = 'instance';
END;
CREATE TRIGGER export_series_touched AFTER UPDATE OF state ON instances
WHEN OLD.state = 'pending' AND NEW.state IN ('done', 'failed')
     AND EXISTS (SELECT 1 FROM export_targets WHERE scope = 'series')
BEGIN
    INSERT OR IGNORE INTO export_series_watch (series_uid, since) VALUES (NEW.series_uid, NEW.completed_at);
END;
""",
    )


def _v2_study_documents(db: sqlite3.Connection) -> None:
    """1 -> 2: the outbox's scopes gain ``study``. ``export_targets`` and ``export_documents`` are made
    again with the wider CHECK (rows and ids kept: jobs refer to the documents' ids); the trigger that
    watches series fires for series- and study-scope targets; ``instances`` gets ``instances_study``.
    The triggers are dropped first (renaming a table rewrites the triggers that name it)."""
    script(
        db,
        """
DROP TRIGGER export_instance_done;
DROP TRIGGER export_series_touched;
ALTER TABLE export_targets RENAME TO export_targets_v1;
CREATE TABLE export_targets (
    name  TEXT NOT NULL,
    kind  TEXT NOT NULL,
    scope TEXT NOT NULL CHECK (scope IN ('instance', 'series', 'study')),
    PRIMARY KEY (name, kind)
);
INSERT INTO export_targets (name, kind, scope) SELECT name, kind, scope FROM export_targets_v1;
DROP TABLE export_targets_v1;
ALTER TABLE export_documents RENAME TO export_documents_v1;
CREATE TABLE export_documents (
    id               INTEGER PRIMARY KEY,
    kind             TEXT NOT NULL,
    scope            TEXT NOT NULL CHECK (scope IN ('instance', 'series', 'study')),
    subject_uid      TEXT NOT NULL,
    version          REAL NOT NULL,
    path             TEXT,
    sop_instance_uid TEXT,
    built_at         REAL,
    UNIQUE (kind, subject_uid, version)
);
INSERT INTO export_documents (id, kind, scope, subject_uid, version, path, sop_instance_uid, built_at)
    SELECT id, kind, scope, subject_uid, version, path, sop_instance_uid, built_at FROM export_documents_v1;
DROP TABLE export_documents_v1;
CREATE INDEX instances_study ON instances (study_uid);
CREATE TRIGGER export_instance_done AFTER UPDATE OF state ON instances
WHEN OLD.state = 'pending' AND NEW.state = 'done'
BEGIN
    INSERT OR IGNORE INTO export_documents (kind, scope, subject_uid, version)
        SELECT DISTINCT kind, 'instance', NEW.sop_instance_uid, NEW.received_at
        FROM export_targets WHERE scope = 'instance';
    INSERT OR IGNORE INTO export_jobs (destination, document_id, state, created_at, next_attempt_at)
        SELECT t.name, d.id, 'pending', NEW.completed_at, NEW.completed_at
        FROM export_targets t JOIN export_documents d
          ON d.kind = t.kind AND d.subject_uid = NEW.sop_instance_uid AND d.version = NEW.received_at
        WHERE t.scope = 'instance';
END;
CREATE TRIGGER export_series_touched AFTER UPDATE OF state ON instances
WHEN OLD.state = 'pending' AND NEW.state IN ('done', 'failed')
     AND EXISTS (SELECT 1 FROM export_targets WHERE scope IN ('series', 'study'))
BEGIN
    INSERT OR IGNORE INTO export_series_watch (series_uid, since) VALUES (NEW.series_uid, NEW.completed_at);
END;
""",
    )


def _v3_models(db: sqlite3.Connection) -> None:
    """2 -> 3: results per instance and model (several models per appliance). ``instances`` is keyed by
    (``sop_instance_uid``, ``model``), ``export_documents`` and ``export_series_watch`` name the model whose
    result they come from. Rows written before have ``model`` '' (the appliance had one model), which
    the service gives its first model's name at start (:meth:`.results.store.Store.adopt_unnamed`); ids and
    rows are kept. The triggers are dropped first and made again with the model."""
    script(
        db,
        """
DROP TRIGGER export_instance_done;
DROP TRIGGER export_series_touched;
ALTER TABLE instances RENAME TO instances_v2;
CREATE TABLE instances (
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    study_uid        TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    spool_path       TEXT,
    size_bytes       INTEGER NOT NULL,
    received_at      REAL NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('pending', 'done', 'failed')),
    completed_at     REAL,
    error_type       TEXT,
    error_message    TEXT,
    result_json      TEXT,
    header_json      TEXT,
    model            TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (sop_instance_uid, model)
);
INSERT INTO instances SELECT *, '' FROM instances_v2 ORDER BY rowid;
DROP TABLE instances_v2;
CREATE INDEX instances_state ON instances (state, received_at);
CREATE INDEX instances_completed ON instances (completed_at);
CREATE INDEX instances_series ON instances (series_uid);
CREATE INDEX instances_study ON instances (study_uid);
CREATE INDEX instances_spool ON instances (spool_path);
ALTER TABLE export_documents RENAME TO export_documents_v2;
CREATE TABLE export_documents (
    id               INTEGER PRIMARY KEY,
    kind             TEXT NOT NULL,
    scope            TEXT NOT NULL CHECK (scope IN ('instance', 'series', 'study')),
    subject_uid      TEXT NOT NULL,
    version          REAL NOT NULL,
    path             TEXT,
    sop_instance_uid TEXT,
    built_at         REAL,
    model            TEXT NOT NULL DEFAULT '',
    model_sha256     TEXT,
    UNIQUE (kind, subject_uid, version, model)
);
INSERT INTO export_documents SELECT *, '', NULL FROM export_documents_v2 ORDER BY rowid;
DROP TABLE export_documents_v2;
ALTER TABLE export_series_watch RENAME TO export_series_watch_v2;
CREATE TABLE export_series_watch (
    series_uid TEXT NOT NULL,
    since      REAL NOT NULL,
    model      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (series_uid, model)
);
INSERT INTO export_series_watch SELECT *, '' FROM export_series_watch_v2 ORDER BY rowid;
DROP TABLE export_series_watch_v2;
CREATE TRIGGER export_instance_done AFTER UPDATE OF state ON instances
WHEN OLD.state = 'pending' AND NEW.state = 'done'
BEGIN
    INSERT OR IGNORE INTO export_documents (kind, scope, subject_uid, version, model, model_sha256)
        SELECT DISTINCT kind, 'instance', NEW.sop_instance_uid, NEW.received_at, NEW.model,
               json_extract(NEW.result_json, '$.model.sha256')
        FROM export_targets WHERE scope = 'instance';
    INSERT OR IGNORE INTO export_jobs (destination, document_id, state, created_at, next_attempt_at)
        SELECT t.name, d.id, 'pending', NEW.completed_at, NEW.completed_at
        FROM export_targets t JOIN export_documents d
          ON d.kind = t.kind AND d.subject_uid = NEW.sop_instance_uid AND d.version = NEW.received_at
             AND d.model = NEW.model
        WHERE t.scope = 'instance';
END;
CREATE TRIGGER export_series_touched AFTER UPDATE OF state ON instances
WHEN OLD.state = 'pending' AND NEW.state IN ('done', 'failed')
     AND EXISTS (SELECT 1 FROM export_targets WHERE scope IN ('series', 'study'))
BEGIN
    INSERT OR IGNORE INTO export_series_watch (series_uid, since, model)
        VALUES (NEW.series_uid, NEW.completed_at, NEW.model);
END;
""",
    )


@dataclass(frozen=True)
class Step:
    """One migration: ``apply`` takes the database from ``version - 1`` to ``version`` (inside the
    transaction of :func:`prepare`; it sets no version itself)."""

    version: int
    what: str
    apply: Callable[[sqlite3.Connection], None]


#: Every migration, in order: ``STEPS[n]`` takes version n to n + 1. A schema change is a new step here
#: plus the new description in its room's schema module (tests/service/test_state_migrations.py checks
#: that they agree). Steps are history: never edit one.
STEPS: tuple[Step, ...] = (
    Step(1, "the outbox stores result document kinds", _v1_document_kinds),
    Step(2, "the outbox takes documents of a study", _v2_study_documents),
    Step(3, "results per instance and model", _v3_models),
)


def has_v0_tables(db: sqlite3.Connection) -> bool:
    """True when the database holds any table of version 0 (at ``user_version`` 0: not a new one)."""
    marks = ",".join("?" for _ in V0_TABLES)
    row = db.execute(
        f"SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ({marks})", V0_TABLES
    ).fetchone()
    return bool(row[0])


def script(db: sqlite3.Connection, sql: str) -> None:
    """Run every statement of ``sql`` on ``db`` within the open transaction (``executescript`` would
    commit it first)."""
    for statement in statements(sql):
        db.execute(statement)


def statements(sql: str) -> Iterator[str]:
    """The complete statements of ``sql`` one by one (a trigger's ``BEGIN ... END;`` is one)."""
    current = ""
    for piece in sql.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \t\n;"):
                yield current.strip()
            current = ""
    if current.strip(" \t\n;"):
        raise ValueError(f"an incomplete SQL statement: {current.strip()[:80]!r}")
