"""Runs acknowledged STOW-RS and C-STORE instances through the inference workers of their models, durably.

The SQLite rows are the truth: an instance has a row per model that takes it; a pending row is processed
by its model's worker (:class:`Runner`) until it is done or failed; the models of one instance run at
the same time. After a crash or a restart every pending row is queued again; a pending row of a model no
longer served is recorded as failed (``model-not-served``). The spool file is removed only after every
model's outcome is committed.
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
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from retinaedge.runtime.dicomio import Limits
from retinaedge.runtime.errors import DicomInputError, NotReadyError, OverloadedError
from retinaedge.runtime.intended_use import NotApplicableError
from retinaedge.runtime.logsafety import redacted_traceback
from retinaedge.service.intake.ingest import Route
from retinaedge.service.intake.recovery import adopt_orphans
from retinaedge.service.intake.spool import Spool
from retinaedge.service.pipeline.stages import InferenceWorker
from retinaedge.service.results.captures import CaptureMaker
from retinaedge.service.results.evidence import IdentityFiles
from retinaedge.service.results.rows import Row
from retinaedge.service.results.storage import STORAGE_ERRORS, STORAGE_RETRY_MAX_S, STORAGE_RETRY_S
from retinaedge.service.results.store import Store

log = logging.getLogger(__name__)


T = TypeVar("T")

NOT_READY_RETRY_S = 1.0  # a row of a model not ready (loading, building, failed) is tried again after this


class Runner(Protocol):
    """What processing one model's rows needs, read at each use (a model's version can change between
    two instances: :mod:`retinaedge.service.lifecycle`): its bound store, its worker, its captures (None:
    captures=never)."""

    store: Store
    worker: InferenceWorker
    captures: CaptureMaker | None

    def captures_for(self, result: dict[str, Any]) -> CaptureMaker | None: ...


#: After a model's result is recorded: ``(model, the spooled file, the result body)``, awaited before
#: the spool file is released (the silent trial of another version runs the same file).
AfterResult = Callable[[str, Path, dict[str, Any]], Awaitable[None]]


class Processor:
    """Asyncio tasks feeding pending instances to the worker; ``enqueue(uid)`` from the event loop only."""

    def __init__(
        self,
        store: Store,
        spool: Spool,
        runners: Mapping[str, Runner],
        *,
        retry_s: float = 0.25,
        on_outcome: Callable[[str], None] = lambda _o: None,
        after_each: Callable[[], None] = lambda: None,
        concurrency: int = 1,
        on_not_applicable: Callable[[NotApplicableError], None] = lambda _e: None,
        limits: Limits | None = None,
        identities: IdentityFiles | None = None,
        route: Route | None = None,
        after_result: AfterResult | None = None,
    ) -> None:
        self.after_result = after_result
        self.store = store  # any model's view: the rows of every model are read through it
        self.on_not_applicable = on_not_applicable  # counts it (metrics) by model and rule
        self.limits = limits or Limits()  # for reading spool files the database lost (recover)
        self.identities = identities
        self.route = route  # for spool files recovered from their bytes
        self.spool = spool
        self.runners = dict(runners)
        self.retry_s = retry_s
        self.on_outcome = on_outcome
        self.after_each = after_each
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.concurrency = max(1, concurrency)
        self._tasks: list[asyncio.Task[None]] = []
        self._active: set[str] = set()  # instances a task is processing now
        self._waiting: set[tuple[str, str]] = set()  # (uid, model) rows waiting for their model to load
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
                    route=self.route,
                )
            except STORAGE_ERRORS as exc:  # a read-only volume: said by /readyz, retried at the next start
                self.problem = f"spool files cannot be recovered: {type(exc).__name__}: {exc}"
                log.error("%s; they are left in the spool for the next start", self.problem)
        pending: dict[str, None] = {}
        for uid, model in self.store.pending_keys():
            if model in self.runners:
                pending[uid] = None
                continue
            gone = self.store.bound(model)
            row = gone.get(uid)
            gone.failed(uid, "model-not-served", f"the model {model!r} is no longer served by this appliance")
            log.warning("a pending instance of model %r, no longer served, is recorded as failed", model)
            if row is not None and row.spool_path is not None:
                self._release(row.spool_path)
        for uid in pending:
            self.enqueue(uid)
        return len(pending)

    def _retry_later(self, uid: str, model: str) -> None:
        """Queue ``uid`` again in a second for ``model``, whose worker is not ready; the other models of the
        instance and the other instances go on meanwhile (a task never waits for one model)."""
        key = (uid, model)
        self._waiting.add(key)

        def again() -> None:
            self._waiting.discard(key)
            self.enqueue(uid)

        asyncio.get_running_loop().call_later(NOT_READY_RETRY_S, again)

    def _release(self, spool_path: str) -> None:
        """Remove an instance's spool file (its name under the spool) once no row waits for it."""
        if self.store.spool_in_use(spool_path):
            return
        try:
            (self.spool.root / spool_path).unlink(
                missing_ok=True
            )  # recorded: a file left behind is removed at the next start
        except OSError as exc:
            log.warning("a processed spool file could not be removed (%s)", type(exc).__name__)

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
        """Every served model's pending row of ``uid``, at the same time; again while rows were added
        meanwhile (a copy sent to another AE title, a correction), so none waits for a restart."""
        while True:
            rows = await self._stored("reading a pending instance", lambda: self.store.instance_rows(uid))
            todo = [
                r
                for r in rows
                if r.state == "pending" and r.spool_path is not None and r.model in self.runners
            ]
            todo = [r for r in todo if (uid, r.model) not in self._waiting]
            if not todo:
                return
            await asyncio.gather(*(self._process_row(row) for row in todo))
            await self._stored("retention", self.after_each)  # off the event loop; retried like any write

    async def _process_row(self, row: Row) -> None:
        """Run one model's pending row, record the outcome, release the spool file when no row waits."""
        assert row.spool_path is not None
        runner, spool_path = self.runners[row.model], row.spool_path
        path: Path = self.spool.root / spool_path
        outcome, record, body = await self._infer(runner, path, row.sop_instance_uid, row.header_json)
        if outcome == "later":  # the model is not ready: its row stays pending, tried again later
            self._retry_later(row.sop_instance_uid, row.model)
            return
        await self._stored("recording an outcome", record)
        self.on_outcome(outcome)
        if body is not None and self.after_result is not None:
            try:
                await self.after_result(row.model, path, body)
            except Exception as exc:  # the trial never stands in the way of the result
                log.warning("after a result: %s", type(exc).__name__)
        await self._stored("releasing a spool file", lambda: self._release(spool_path))

    async def _infer(
        self, runner: Runner, path: Path, uid: str, evidence: str | None
    ) -> tuple[str, Callable[[], None], dict[str, Any] | None]:
        """Run one spooled instance on ``runner``'s model -> ``(outcome, the call that records it, the
        result body when done)``; ``evidence`` is its kept header (for the captures)."""
        store = runner.store
        while True:
            worker = runner.worker  # again at each try: a new version may serve now
            try:
                result = await asyncio.wrap_future(worker.submit_path(path))
            except (OverloadedError, NotReadyError):
                if worker.state != "ready":  # loading, building an engine, failed: free this task
                    if worker.state == "failed":
                        log.error("processing paused: the backend failed (%s)", worker.reason)
                    return "later", lambda: None, None
                await asyncio.sleep(self.retry_s)  # stays pending: nothing is lost
                continue
            except NotApplicableError as exc:  # stored and acknowledged; recorded, never exported
                self.on_not_applicable(exc)
                outcome = {"model": exc.model, "rules": [f.to_json() for f in exc.failures]}
                return exc.type, _call(store.not_applicable, uid, outcome, str(exc)), None
            except DicomInputError as exc:
                return exc.type, _call(store.failed, uid, exc.type, str(exc)), None
            except Exception as exc:  # a bug: record it against the instance, keep serving
                log.error("processing failed:\n%s", redacted_traceback(sys.exc_info()))
                message = f"{type(exc).__name__}: {exc}"
                return "internal-error", _call(store.failed, uid, "internal-error", message), None
            body = result.to_json()
            body["backend"] = worker.backend
            body["backend_reason"] = worker.backend_reason
            body["precision"] = worker.precision
            return "ok", self._done(runner, uid, path, body, evidence), body

    def _done(
        self, runner: Runner, uid: str, path: Path, body: dict[str, Any], evidence: str | None
    ) -> Callable[[], None]:
        """The call that records a done result: its captures from the spool file, then the row (retried
        together while storage fails)."""

        captures = runner.captures_for(body)  # of the version that ran it

        def record() -> None:
            if captures is not None:
                captures.keep(uid, path, body, evidence)
            runner.store.done(uid, body)

        return record


def _call(func: Callable[..., None], *args: object) -> Callable[[], None]:
    return lambda: func(*args)
