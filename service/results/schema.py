"""The results' tables in the service's SQLite database (``state.sqlite3``), as the latest schema version
has them: the description of record. The migration steps of :mod:`retinaedge.service.database` are what
creates and changes them, and must produce exactly this (tests/service/test_state_migrations.py).

- ``instances``: one row per SOP Instance UID and model (``model``, the name the service gives it; ''
  in rows written before several models) received (STOW-RS, C-STORE) or detected (``/v1/detect``):
  ``pending`` (its spooled file, ``spool_path``, waits for the worker), then ``done`` (``result_json``,
  the ``/v1/detect`` body) or ``failed`` (``error_type``, ``error_message``). ``header_json`` is the SR
  evidence (DICOM JSON, :mod:`.evidence`); times are epoch seconds, sizes bytes.
- ``series_requests``: when a client asked for a series to be treated as complete (epoch seconds).
"""

from __future__ import annotations

SCHEMA = """
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
CREATE INDEX instances_state ON instances (state, received_at);
CREATE INDEX instances_completed ON instances (completed_at);
CREATE INDEX instances_series ON instances (series_uid);
CREATE INDEX instances_study ON instances (study_uid);
CREATE INDEX instances_spool ON instances (spool_path);
CREATE TABLE series_requests (
    series_uid   TEXT PRIMARY KEY,
    requested_at REAL NOT NULL
);
"""
