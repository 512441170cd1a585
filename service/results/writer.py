"""Keeps ``/v1/detect`` results for ``GET /v1/results`` off the response path, committing them in groups.

The detect handler answers as soon as the detections are known and hands the record (what the pipeline
already parsed: UIDs, the selected header elements, the response body) to :meth:`ResultWriter.keep`. One
thread writes what has gathered within ``gather_s`` (20 ms) of the first waiting result: it encodes each
header (SR evidence and patient identity, DICOM JSON), writes every identity file, then all rows in one
transaction (one commit for the group), then retention. With 4 clients of
single-frame requests on the demo bundle this halved the writer's CPU per result (0.71 to 0.38 ms). A storage error (full disk, I/O) keeps the group in memory and
retries with back-off; ``problem`` says why meanwhile. A route reading results (``/v1/results``,
``/v1/series``) first waits until what was kept before it arrived is committed (:meth:`ResultWriter.settle`),
so a client reads its own results.

A result with findings comes with the request's bytes (``source``): before its group is committed the
writer makes its secondary captures from them (:class:`.captures.CaptureMaker`, one frame at a time) and
lets go of them. The bytes waiting here are bounded by ``max_source_bytes`` (64 MiB), or one body of any
size when none waits: a result that would go beyond is kept without its bytes, hence without captures
(logged and counted by ``not_drawn``); the client has its detections, its other documents are made as
usual.

STOW-RS does not come here: its rows are committed before the instance is acknowledged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaedge.runtime.threadname import name_this_thread
from retinaedge.service.results.captures import CaptureMaker
from retinaedge.service.results.evidence import EncodedHeader, IdentityFiles, KeptHeader, header_from_json
from retinaedge.service.results.rows import subject_key
from retinaedge.service.results.storage import STORAGE_ERRORS, STORAGE_RETRY_MAX_S, STORAGE_RETRY_S
from retinaedge.service.results.store import Store

log = logging.getLogger(__name__)

_STOP = object()


@dataclass(eq=False)
class KeptResult:
    """One ``/v1/detect`` result to keep: the row's columns and what is kept of the header (encoded as
    DICOM JSON by the writer thread: the SR evidence for the row, the patient identity for its file);
    ``source``: the instance's bytes when its captures are to be made (it has findings)."""

    uid: str
    sop_class: str
    study: str
    series: str
    size: int
    body: dict[str, Any]
    header: KeptHeader | EncodedHeader
    source: bytes | None = None
    seq: int = 0  # the order it was kept in (set by ResultWriter.keep)


class ResultWriter:
    """A thread committing :class:`KeptResult` groups of up to ``max_group``; at most ``max_waiting`` wait
    (beyond, a result is not kept, logged and counted by ``dropped``: the client has its detections), with
    at most ``max_source_bytes`` of their sources (module docstring); ``captures`` makes the captures."""

    def __init__(
        self,
        store: Store,
        identities: IdentityFiles,
        after_group: Callable[[], None] = lambda: None,
        *,
        max_group: int = 64,
        max_waiting: int = 1024,
        gather_s: float = 0.02,
        captures: CaptureMaker | None = None,
        max_source_bytes: int = 64 * 1024**2,
    ) -> None:
        self.store = store
        self.identities = identities
        self.captures = captures
        #: The capture maker for a result body (by the version that produced it; a lane sets it).
        self.captures_for: Callable[[dict[str, Any]], CaptureMaker | None] = lambda _body: self.captures
        self.max_source_bytes = max_source_bytes
        self._source_bytes = 0  # of the sources waiting (under _changed)
        self.after_group = after_group
        self.max_group = max_group
        self.gather_s = gather_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_waiting)
        self._changed = threading.Condition()
        self._kept = 0  # seq of the last result queued
        self._committed = 0  # seq of the last result committed (they commit in order)
        self._thread = threading.Thread(target=self._run, name="retinaedge-result-writer", daemon=True)
        #: Why results cannot be kept now (a storage error), or None.
        self.problem: str | None = None
        self.dropped = 0
        self.not_drawn = 0  # results kept without their source: too many bytes waited
        self.groups = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Write what waits, then stop (bounded by ``timeout`` seconds)."""
        if self._thread.is_alive():
            self._queue.put(_STOP, timeout=timeout)
            self._thread.join(timeout)

    def keep(self, item: KeptResult) -> bool:
        """Queue ``item`` for the next group; False (not kept) when too many wait already. Its source is
        let go at once when there is no capture maker, or when other sources wait and with it they would
        pass ``max_source_bytes``."""
        with self._changed:
            if item.source is not None:
                if self.captures is None:
                    item.source = None
                elif self._source_bytes and self._source_bytes + len(item.source) > self.max_source_bytes:
                    item.source = None
                    self.not_drawn += 1
                    log.warning(
                        "a /v1/detect result is kept without secondary captures: %d bytes wait to be drawn",
                        self._source_bytes,
                    )
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self.dropped += 1
                log.warning("a /v1/detect result was not kept: %d wait to be written", self._queue.maxsize)
                return False
            if item.source is not None:
                self._source_bytes += len(item.source)
            self._kept += 1
            item.seq = self._kept
        return True

    def settle(self, timeout: float) -> bool:
        """Wait until every result kept before this call is committed (False after ``timeout`` s)."""
        with self._changed:
            target = self._kept
            return self._changed.wait_for(lambda: self._committed >= target, timeout)

    def _draw(self, encoded: list[tuple[KeptResult, str, str]]) -> dict[str, Path]:
        """The captures of the group's results that came with their source (``uid`` -> the folder made),
        each source let go once drawn. A failure leaves that result without captures (logged)."""
        made: dict[str, Path] = {}
        for item, evidence, identity in encoded:
            source = item.source
            maker = self.captures_for(item.body)  # the captures of the version that produced it
            if source is None or maker is None:
                continue
            try:
                folder = maker.make(source, item.body, header_from_json(evidence, identity))
            except Exception as exc:  # the result is kept without them
                log.warning("secondary captures not made: %s", type(exc).__name__)
                folder = None
            finally:
                self._let_go(item)
            if folder is not None:
                made[item.uid] = folder
        return made

    def _let_go(self, item: KeptResult) -> None:
        """Drop ``item``'s source and give its bytes back to the budget."""
        source, item.source = item.source, None
        if source is not None:
            with self._changed:
                self._source_bytes -= len(source)

    def _run(self) -> None:
        name_this_thread()
        while True:
            first = self._queue.get()
            group = [] if first is _STOP else [first]
            stop = first is _STOP
            deadline = time.monotonic() + self.gather_s
            while not stop and len(group) < self.max_group:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                else:
                    group.append(item)
            if group:
                try:
                    self._write(group)
                except Exception as exc:  # a bug must not end the thread: later results are still kept
                    log.error(
                        "%d /v1/detect result(s) not kept: %s (a bug: please report it)",
                        len(group),
                        type(exc).__name__,
                    )
                    with self._changed:  # nobody waits for them any longer
                        self._committed = max(self._committed, group[-1].seq)
                        self._changed.notify_all()
            if stop:
                return

    def _write(self, group: list[KeptResult]) -> None:
        """Commit ``group``, retrying with back-off while storage fails (never gives up: the thread's job)."""
        encoded = []
        for item in group:
            try:
                encoded.append((item, *item.header.to_json()))
            except Exception as exc:  # the client has its detections; this one is not kept for later
                log.warning("a /v1/detect result was not kept: its header: %s", type(exc).__name__)
                self._let_go(item)
        made = self._draw(encoded)
        # Each result's captures replace the earlier result's (or remove them), once.
        installs = {i.uid: made.get(i.uid) for i, _e, _i in encoded} if self.captures is not None else {}
        delay = STORAGE_RETRY_S
        while True:
            try:
                with self.identities.lock:  # no retention pass between an identity and its row
                    for uid, folder in list(installs.items()):
                        assert self.captures is not None
                        self.captures.files.install(subject_key(self.captures.manifest.name, uid), folder)
                        del installs[uid]
                    for item, _evidence, identity in encoded:
                        self.identities.put(item.uid, identity, replace=True)
                    self.store.put_done_many(
                        [
                            (i.uid, i.sop_class, i.study, i.series, i.size, i.body, evidence)
                            for i, evidence, _identity in encoded
                        ]
                    )
                break
            except STORAGE_ERRORS as exc:
                problem = f"/v1/detect results cannot be kept: {type(exc).__name__}: {exc}"
                if problem != self.problem:
                    log.warning("%s; retrying every %.2g-%.2g s", problem, delay, STORAGE_RETRY_MAX_S)
                self.problem = problem
                time.sleep(delay)
                delay = min(delay * 2, STORAGE_RETRY_MAX_S)
        if self.problem is not None:
            log.info("/v1/detect results are kept again")
            self.problem = None
        self.groups += 1
        with self._changed:
            self._committed = max(self._committed, group[-1].seq)
            self._changed.notify_all()
        try:
            self.after_group()
        except STORAGE_ERRORS as exc:
            log.warning("retention failed (%s); it runs again after the next group", type(exc).__name__)
