"""The outbox's tables and triggers in the service's SQLite database (``state.sqlite3``), as the latest
schema version has them: the description of record (:mod:`.queue` says what each table holds). The
migration steps of :mod:`retinaedge.service.database` are what creates and changes them, and must produce
exactly this (tests/service/test_state_migrations.py).

Document kinds (``sr``, ``series-sr``, ...: :mod:`retinaedge.service.results.documents`) are plain text
here, never a list in SQL: a new kind needs no schema change. ``scope`` (``instance``, ``series`` or
``study``) says what ``subject_uid`` is (a SOP Instance UID, a Series Instance UID or a Study Instance
UID) and which trigger or step enqueues it. The triggers need the ``instances`` table of :mod:`retinaedge.service.results.schema`: an instance's
jobs are inserted in the transaction that records its result.
"""

from __future__ import annotations

SCHEMA = """
CREATE TABLE export_targets (
    name  TEXT NOT NULL,
    kind  TEXT NOT NULL,
    scope TEXT NOT NULL CHECK (scope IN ('instance', 'series', 'study')),
    PRIMARY KEY (name, kind)
);
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
CREATE TABLE export_jobs (
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
CREATE INDEX export_jobs_due ON export_jobs (destination, state, next_attempt_at);
CREATE INDEX export_jobs_document ON export_jobs (document_id);
CREATE TABLE export_attempts (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    outcome     TEXT,
    detail      TEXT
);
CREATE INDEX export_attempts_job ON export_attempts (job_id);
CREATE TABLE export_counters (
    destination TEXT NOT NULL,
    key         TEXT NOT NULL,
    n           INTEGER NOT NULL,
    PRIMARY KEY (destination, key)
);
CREATE TABLE export_series_watch (
    series_uid TEXT NOT NULL,
    since      REAL NOT NULL,
    model      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (series_uid, model)
);
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
"""
