"""Built documents kept on disk: an instance's SR or GSPS is built once per result, then served from disk.

Building a document costs CPU in proportion to what it shows (highdicom takes about 10 ms per finding:
an SR of a 300-frame result with 1,586 boxes took 17 s of a core), and without a copy on disk every
``GET /v1/results/{uid}?document=sr`` rebuilt it, with a new SOP Instance UID each time. So the first
request or delivery that needs one builds it, and every later one reads the file:

- one file per subject (an instance, a series, a study), kind and *version* (:func:`result_version` of
  an instance: a digest of its stored result, kept header and patient identity; :func:`rows_version` of a
  series or study: a digest of its instances' rows), under ``<data_dir>/documents/<sha256(uid)[:40]>/
  <kind>-<version>.dcm``; a new result of the instance (a correction, ``/v1/detect`` again) has another
  version, so its documents are built anew and the old files are removed when the new one is written;
- callers asking for one document at once wait for a single build (a lock per document), so three
  clients asking for a large SR together cost one build, not three;
- the routes build on one thread of their own (:meth:`BuiltDocuments.file_async`): however many
  clients ask for documents never built before, at most one core's worth of the service builds them
  for HTTP, and the event loop, the readers and the pipeline keep the rest;
- result delivery links the same file (:class:`~..outbox.files.DocumentFiles`), so what the PACS
  receives and what a GET returns is one object with one SOP Instance UID;
- files are written to a temporary name, fsynced and renamed, so a crash never leaves half a document;
  they go with their instance's result (retention, :class:`~.retention.Pruner`), a series' or study's when
  none of its instances is kept any more, and, at start, with results no longer kept
  (:meth:`BuiltDocuments.keep_only`).

The directory layout and the version digest are internal: nothing outside this module names a file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from retinaedge.runtime.durable import fsync_path

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from retinaedge.service.results.rows import Row

log = logging.getLogger(__name__)

#: The documents' directory under the data directory.
BUILT = "documents"


def result_version(result_json: str | None, header_json: str | None, identity: str | None) -> str:
    """A digest (16 hex digits) of what an instance's documents are built from: its stored result, its
    kept header and its patient identity. Any change of them gives another version."""
    h = hashlib.sha256()
    for part in (result_json, header_json, identity):
        data = (part or "").encode()
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:16]


def rows_version(rows: Iterable[Row]) -> str:
    """The version of a series' or a study's documents: a digest (16 hex digits) of its instances' rows
    (each UID, state, result and kept header), so that an instance arriving, a result changing or one
    expiring gives another version."""
    h = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r.sop_instance_uid):
        for part in (row.sop_instance_uid, row.state, row.error_type, row.result_json, row.header_json):
            data = (part or "").encode()
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
    return h.hexdigest()[:16]


class BuiltDocuments:
    """The built documents of the results kept, under ``root`` (module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._http = ThreadPoolExecutor(max_workers=1, thread_name_prefix="documents")

    def close(self) -> None:
        """Stop the routes' build thread (a build under way finishes first)."""
        self._http.shutdown(wait=True, cancel_futures=True)

    def folder(self, uid: str) -> Path:
        """The directory of one instance's documents (it may not exist)."""
        return self.root / hashlib.sha256(uid.encode()).hexdigest()[:40]

    def path(self, uid: str, kind: str, version: str) -> Path:
        return self.folder(uid) / f"{kind}-{version}.dcm"

    # -- building ---------------------------------------------------------------------------------------
    def file(self, uid: str, kind: str, version: str, build: Callable[[], Dataset]) -> Path:
        """The file of document ``kind`` of ``uid``'s result ``version``: the one on disk, or ``build()``
        written now (once; a concurrent caller of the same document waits for it). Raises what
        ``build`` raises (nothing is written then) and ``OSError`` when the file cannot be written."""
        path = self.path(uid, kind, version)
        if path.is_file():
            return path
        with self._lock(uid, kind):
            if path.is_file():  # built by the caller we waited for
                return path
            ds = build()
            self._write(path, ds)
        self._drop_other_versions(path, kind)
        return path

    async def file_async(self, uid: str, kind: str, version: str, build: Callable[[], Dataset]) -> Path:
        """:meth:`file` for the routes: a document on disk is found without building; one to be built
        is built on the routes' single build thread (module docstring)."""
        path = self.path(uid, kind, version)
        if path.is_file():
            return path
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._http, self.file, uid, kind, version, build)

    def _lock(self, uid: str, kind: str) -> threading.Lock:
        with self._locks_guard:
            if len(self._locks) > 4096:  # locks of documents built long ago; none is held by a waiter
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            return self._locks.setdefault((uid, kind), threading.Lock())

    def _write(self, path: Path, ds: Dataset) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".build-", suffix=".dcm")
        try:
            with os.fdopen(fd, "wb") as fh:
                ds.save_as(fh, enforce_file_format=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_path(path.parent)

    def _drop_other_versions(self, keep: Path, kind: str) -> None:
        """Remove the files of ``kind`` built from earlier results of the instance."""
        try:
            names = os.listdir(keep.parent)
        except FileNotFoundError:
            return
        for name in names:
            if name != keep.name and name.startswith(f"{kind}-") and name.endswith(".dcm"):
                (keep.parent / name).unlink(missing_ok=True)

    # -- retention --------------------------------------------------------------------------------------
    def delete(self, uids: Iterable[str]) -> None:
        """Remove the documents of results no longer kept."""
        for uid in uids:
            shutil.rmtree(self.folder(uid), ignore_errors=True)

    def keep_only(self, uids: Iterable[str]) -> int:
        """At start: remove the folders of instances not in ``uids`` (pruned while the service was down,
        or a crash between a prune and this removal); returns how many were removed."""
        wanted = {self.folder(u).name for u in uids}
        removed = 0
        for path in self.root.iterdir():
            if path.name not in wanted:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed the built documents of %d result(s) no longer kept", removed)
        return removed
