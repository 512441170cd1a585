"""The record of a trial: ``shadow.jsonl`` under the model's directory, bounded whatever the trial's length.

The file is a *snapshot* line (``{"snapshot": ShadowReport.state()}``: the running counts per baseline and
the latency windows, :mod:`.shadow`) followed by one line per instance compared since
(``{"version", "outcome"}``: the counts of :func:`.shadow.compare`, never the detections or a UID). Once
:data:`COMPACT_EVERY` lines follow the snapshot, the file is replaced (temporary file, fsync, rename) by
one new snapshot line: it never holds more than a snapshot and :data:`COMPACT_EVERY` outcomes (a few
hundred kilobytes), and a SIGKILL leaves either file whole. At start the report is rebuilt from the
snapshot and the lines after it (a line a crash cut short is skipped), so it is the report before the
crash but for the instances whose line was not written yet.

A line of an older record (``{"version", "active", "shadow"}`` with both results) is compared again as
it is read, then the file is compacted.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from retinaedge.runtime.durable import fsync_path
from retinaedge.service.versions.shadow import ShadowReport

log = logging.getLogger(__name__)

#: Outcome lines after the snapshot at which the file is compacted into a new snapshot.
COMPACT_EVERY = 1000


class TrialRecord:
    """The file ``path`` of the trial whose report is ``report`` (module docstring). Every count of the
    report goes through :meth:`record`, under one lock with the file, so a snapshot holds exactly the
    outcomes before it."""

    def __init__(self, path: Path, report: ShadowReport, compact_every: int = COMPACT_EVERY) -> None:
        self.path = path
        self.report = report
        self.compact_every = max(1, compact_every)
        self._lock = threading.Lock()
        self._lines = 0  # outcome lines after the snapshot
        self._closed = False  # the trial ended: an outcome still arriving is not written

    def start(self, replay: bool) -> None:
        """A new trial (the file of any earlier one goes), or, with ``replay``, the same trial again: its
        report rebuilt from the file."""
        with self._lock:
            for debris in self.path.parent.glob(".shadow-*"):  # a compaction a crash interrupted
                debris.unlink(missing_ok=True)
            if not replay:
                self.path.unlink(missing_ok=True)
                self._lines = 0
                return
            legacy = self._replay()
            if legacy or self._lines >= self.compact_every:
                self._compact()

    def _replay(self) -> bool:
        """Count the file into the report; True when it held lines of an older record."""
        legacy = False
        try:
            fh = open(self.path)  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            return False
        with fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except ValueError:  # a line a crash cut short
                    continue
                if not isinstance(entry, dict):
                    continue
                snapshot = entry.get("snapshot")
                if isinstance(snapshot, dict):
                    if snapshot.get("version") == self.report.version:
                        self.report.restore(snapshot)
                        self._lines = 0
                    continue
                if entry.get("version") != self.report.version:
                    continue
                if isinstance(entry.get("outcome"), dict):
                    self.report.count(entry["outcome"])
                elif isinstance(entry.get("active"), dict):
                    self.report.add(entry["active"], entry.get("shadow"))
                    legacy = True
                else:
                    continue
                self._lines += 1
        return legacy

    def record(self, outcome: dict[str, Any]) -> None:
        """Count ``outcome`` (of :func:`.shadow.compare`) in the report and append it to the file,
        compacting it when due (blocking: run it in a thread)."""
        with self._lock:
            if self._closed:
                return
            self.report.count(outcome)
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"version": self.report.version, "outcome": outcome}) + "\n")
            self._lines += 1
            if self._lines >= self.compact_every:
                self._compact()

    def _compact(self) -> None:
        """Replace the file by one snapshot line of the report (atomically)."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".shadow-", suffix=".jsonl")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps({"snapshot": self.report.state()}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_path(self.path.parent)
        self._lines = 0

    def remove(self) -> None:
        """The trial ended: its record goes."""
        with self._lock:
            self._closed = True
            self.path.unlink(missing_ok=True)
