"""The outbox's tables and triggers in the service's SQLite database (:mod:`.outbox` describes them).

:func:`migrate` creates what is missing (``IF NOT EXISTS``, so it runs at every start); it needs the
``instances`` table of :mod:`.store`, on which the triggers enqueue export jobs in the transaction that
records a result.
"""

from __future__ import annotations

import sqlite3

SCHEMA = """
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


def migrate(db: sqlite3.Connection) -> None:
    """Create the outbox tables and triggers if missing (the ``instances`` table must exist)."""
    db.executescript(SCHEMA)
