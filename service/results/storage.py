"""What counts as a storage error (SQLite, the disk) and how storage writes are retried.

The processor (:mod:`retinaedge.service.pipeline.processor`) and the result writer (:mod:`.writer`) both
retry a failed write, doubling the delay from :data:`STORAGE_RETRY_S` up to :data:`STORAGE_RETRY_MAX_S`
seconds, so a full disk or a locked database delays results instead of losing them.
"""

from __future__ import annotations

import sqlite3

#: First delay (s) before a failed storage write is retried; doubled after each failure.
STORAGE_RETRY_S = 0.25
#: The longest delay (s) between two attempts.
STORAGE_RETRY_MAX_S = 5.0
#: The exceptions that mean "storage failed, try again" rather than a bug.
STORAGE_ERRORS = (sqlite3.OperationalError, sqlite3.DatabaseError, OSError)
