"""Runs acknowledged STOW-RS instances through the inference worker, durably.

The SQLite row is the truth: a pending row is processed until it is done or failed; after a crash or a
restart every pending row is queued again. The spool file is removed only after the outcome is committed.
Before a done result is committed, the secondary captures of its frames with findings are made from the
spool file (:class:`~retinaedge.service.results.captures.CaptureMaker`: the frames are read again, one at a
time), so they exist once the result and its export jobs do.

A storage error while reading a row or recording an outcome (SQLite's "database or disk is full", an I/O
error) never ends the task: the outcome is kept in memory and recorded again with exponential back-off
(:data:`~retinaedge.service.results.storage.STORAGE_RETRY_S` up to ``STORAGE_RETRY_MAX_S``); :attr:`Processor.problem` says why meanwhile
(``/readyz`` reports it) and clears once a write succeeds, so processing resumes by itself when space
returns.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from retinaedge.runtime.dicomio import Limits
from retinaedge.runtime.errors import DicomInputError, NotReadyError, OverloadedError
from retinaedge.runtime.intended_use import NotApplicableError
from retinaedge.runtime.logsafety import redacted_traceback
from retinaedge.service.intake.recovery import adopt_orphans
from retinaedge.service.intake.spool import Spool
from retinaedge.service.pipeline.stages import InferenceWorker
from retinaedge.service.results.captures import CaptureMaker
from retinaedge.service.results.evidence import IdentityFiles
from retinaedge.service.results.storage import STORAGE_ERRORS, STORAGE_RETRY_MAX_S, STORAGE_RETRY_S
from retinaedge.service.results.store import Store

log = logging.getLogger(__name__)


T = TypeVar("T")


class Processor:
    """Asyncio tasks feeding pending instances to the worker; ``enqueue(uid)`` from the event loop only."""

    def __init__(
        self,
        store: Store,
        spool: Spool,
        worker: InferenceWorker,
        *,
        retry_s: float = 0.25,
        on_outcome: Callable[[str], None] = lambda _o: None,
        after_each: Callable[[], None] = lambda: None,
        concurrency: int = 1,
        captures: CaptureMaker | None = None,
        on_not_applicable: Callable[[NotApplicableError], None] = lambda _e: None,
        limits: Limits | None = None,
        identities: IdentityFiles | None = None,
    ) -> None:
        self.store = store
        self.on_not_applicable = on_not_applicable  # counts it (metrics) by model and rule
        self.limits = limits or Limits()  # for reading spool files the database lost (recover)
        self.identities = identities
        self.captures = captures
        self.spool = spool
        self.worker = worker
        self.retry_s = retry_s
        self.on_outcome = on_outcome
        self.after_each = after_each
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.concurrency = max(1, concurrency)
        self._tasks: list[asyncio.Task[None]] = []
        self._active: set[str] = set()  # instances a task is processing now
        #: Why outcomes cannot be recorded now (a storage error), or None.
        self.problem: str | None = None

    def enqueue(self, uid: str) -> None:
        self.queue.put_nowait(uid)

    def recover(self) -> int:
        """Queue every pending row again. A spool file no row refers to (the database was lost, or a
        crash came between its rename and its row) is recovered from its own bytes, or quarantined with a
        log line (:mod:`retinaedge.service.intake.recovery`): never deleted silently."""
        known = self.store.spool_paths()
        orphans = [path for path in self.spool.files() if path.name not in known]
        if orphans:
            try:
                adopt_orphans(
                    orphans,
                    spool=self.spool,
                    store=self.store,
                    limits=self.limits,
                    identities=self.identities,
                )
            except STORAGE_ERRORS as exc:  # a read-only volume: said by /readyz, retried at the next start
                self.problem = f"spool files cannot be recovered: {type(exc).__name__}: {exc}"
                log.error("%s; they are left in the spool for the next start", self.problem)
        pending = self.store.pending()
        for uid in pending:
            self.enqueue(uid)
        return len(pending)

    def start(self) -> None:
        """``concurrency`` tasks, each taking the next pending instance: their frames share batches."""
        self._tasks = [
            asyncio.create_task(self._run(), name=f"retinaedge-processor-{n}")
            for n in range(self.concurrency)
        ]

    @property
    def running(self) -> bool:
        """True while every processing task runs (none ended on an error)."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []

    async def _stored(self, what: str, call: Callable[[], T]) -> T:
        """``call()`` in a thread, retried with back-off while storage fails (see the module docstring)."""
        delay = STORAGE_RETRY_S
        while True:
            try:
                value = await asyncio.to_thread(call)
            except STORAGE_ERRORS as exc:
                problem = f"results cannot be recorded ({what}): {type(exc).__name__}: {exc}"
                if problem != self.problem:
                    log.warning("%s; retrying every %.2g-%.2g s", problem, delay, STORAGE_RETRY_MAX_S)
                self.problem = problem
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORAGE_RETRY_MAX_S)
                continue
            if self.problem is not None:
                log.info("results are recorded again (%s)", what)
                self.problem = None
            return value

    async def _run(self) -> None:
        while True:
            uid = await self.queue.get()
            if uid in self._active:  # queued twice (a duplicate upload): the task that has it finishes it
                continue
            self._active.add(uid)
            try:
                await self._process(uid)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never ends the task: the row stays as recorded, a restart retries
                self.problem = f"processing stopped on an instance: {type(exc).__name__}"
                log.error(
                    "processing an instance failed; the task goes on:\n%s",
                    redacted_traceback(sys.exc_info()),
                )
            finally:
                self._active.discard(uid)

    async def _process(self, uid: str) -> None:
        row = await self._stored("reading a pending instance", lambda: self.store.get(uid))
        if row is None or row.state != "pending" or row.spool_path is None:
            return
        path: Path = self.spool.root / row.spool_path
        outcome, record = await self._infer(path, uid, row.header_json)
        await self._stored("recording an outcome", record)
        self.on_outcome(outcome)
        try:
            path.unlink(missing_ok=True)  # recorded: a file left behind is removed at the next start
        except OSError as exc:
            log.warning("a processed spool file could not be removed (%s)", type(exc).__name__)
        await self._stored("retention", self.after_each)  # off the event loop; retried like any write

    async def _infer(self, path: Path, uid: str, evidence: str | None) -> tuple[str, Callable[[], None]]:
        """Run one spooled instance -> ``(outcome, the call that records it)``; ``evidence`` is its kept
        header (for the captures)."""
        while True:
            try:
                result = await asyncio.wrap_future(self.worker.submit_path(path))
            except (OverloadedError, NotReadyError):
                if self.worker.state == "failed":
                    log.error("processing paused: the backend failed (%s)", self.worker.reason)
                await asyncio.sleep(self.retry_s)  # stays pending: nothing is lost
                continue
            except NotApplicableError as exc:  # stored and acknowledged; recorded, never exported
                self.on_not_applicable(exc)
                outcome = {"model": exc.model, "rules": [f.to_json() for f in exc.failures]}
                return exc.type, _call(self.store.not_applicable, uid, outcome, str(exc))
            except DicomInputError as exc:
                return exc.type, _call(self.store.failed, uid, exc.type, str(exc))
            except Exception as exc:  # a bug: record it against the instance, keep serving
                log.error("processing failed:\n%s", redacted_traceback(sys.exc_info()))
                message = f"{type(exc).__name__}: {exc}"
                return "internal-error", _call(self.store.failed, uid, "internal-error", message)
            body = result.to_json()
            body["backend"] = self.worker.backend
            body["backend_reason"] = self.worker.backend_reason
            body["precision"] = self.worker.precision
            return "ok", self._done(uid, path, body, evidence)

    def _done(self, uid: str, path: Path, body: dict[str, Any], evidence: str | None) -> Callable[[], None]:
        """The call that records a done result: its captures from the spool file, then the row (retried
        together while storage fails)."""

        def record() -> None:
            if self.captures is not None:
                self.captures.keep(uid, path, body, evidence)
            self.store.done(uid, body)

        return record


def _call(func: Callable[..., None], *args: object) -> Callable[[], None]:
    return lambda: func(*args)
