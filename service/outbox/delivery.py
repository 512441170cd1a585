"""Result delivery: delivers the outbox's document jobs (:mod:`.queue`) to the configured destinations.

Threads, never the event loop: one ``retinaedge-export-<name>`` per destination (so a slow or dead peer
delays only its own jobs) and one ``retinaedge-export-watch`` that turns complete series into jobs of
the series' documents (``series-sr``) and of a new version of their study's (``kos``: each time one of a
study's series completes, the study's images with findings so far), frees files delivered everywhere,
prunes old jobs and refreshes
the :meth:`Dispatcher.summary` that ``/metrics``, ``/readyz`` and ``GET /v1/exports`` read (they never
touch SQLite on the event loop).

Each job's document is built once (:meth:`Dispatcher._document`) by the builder its kind has in the
registry (:mod:`retinaedge.service.results.documents`) from the kept result, evidence and identity (the
same SR as ``GET /v1/results/{uid}`` with ``Accept: application/dicom`` for ``sr``, the series SR for
``series-sr``, the study's KOS as ``GET /v1/studies/{uid}?document=kos`` for ``kos``) and written, fsynced
and owner-only, to ``<data_dir>/outbox``; a document whose subject has nothing to show (no findings:
:class:`~retinaedge.service.results.views.NothingToReport`) is dropped with its jobs, not dead-lettered,
and counted as ``skipped``; every attempt and every
destination sends that same file, so the peer always sees one SOP instance. A stored document (``sc``:
the secondary captures made when the result was recorded, one per frame with findings) is not built:
its files are linked (or copied) into a folder of ``<data_dir>/outbox`` instead, and every attempt sends
all of them (one association, or one STOW-RS request). An attempt is committed as in flight before it is
sent. Back-off is ``export_retry_initial_s`` doubling up to ``export_retry_max_s``: after a failure that
concerns the destination (no connection, credentials refused, out of resources, no answer) the whole
destination waits, by its count of consecutive such failures, and only one job is tried per wait (a PACS
that is down is not hammered by every waiting SR); after a failure that concerns one SR (the peer
refused it) that job alone waits, by its own attempts. Due times are stored, so back-off carries across
restarts. A job is dead-lettered after ``export_max_attempts`` attempts of its own.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from retinaedge.runtime.manifest import Manifest
from retinaedge.runtime.threadname import name_this_thread
from retinaedge.service.outbox.building import DocumentBuilder, ModelSource, NoDocument, NothingToSend
from retinaedge.service.outbox.files import DocumentFiles
from retinaedge.service.outbox.presence import ASKABLE, holds
from retinaedge.service.outbox.queue import Outbox
from retinaedge.service.outbox.records import Job
from retinaedge.service.outbox.senders import Delivery, Instance, sender_for
from retinaedge.service.results.built import BuiltDocuments
from retinaedge.service.results.completion import series_status
from retinaedge.service.results.documents import DOCUMENTS, DocumentRegistry
from retinaedge.service.results.evidence import IdentityFiles
from retinaedge.service.results.storage import STORAGE_ERRORS
from retinaedge.service.results.store import Store

if TYPE_CHECKING:
    from retinaedge.service.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often idle threads look for due jobs and complete series (a new result wakes them)
PRUNE_EVERY_S = 60.0


class Dispatcher:
    """The outbox's delivery threads and their state (module docstring). ``sources`` holds every
    model's results by the name its rows carry; without it, the one model of ``store``."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        identities: IdentityFiles,
        model_name: str,
        model_sha256: str,
        documents: DocumentRegistry = DOCUMENTS,
        *,
        manifest: Manifest | None = None,
        built: BuiltDocuments | None = None,
        clock: Callable[[], float] = time.time,
        sources: Mapping[str, ModelSource] | None = None,
    ) -> None:
        self.settings = settings
        self.sources = dict(sources or {store.model: ModelSource(store, model_name, model_sha256, manifest)})
        #: Service time (:mod:`retinaedge.service.clock`): back-off, holds and series quiet periods.
        self.clock = clock
        self.built = built  # an instance's documents, built once and shared with the routes
        self.builder = DocumentBuilder(settings, self.sources, identities, documents, built)
        self.store = store
        self.identities = identities
        self.documents = documents
        self.destinations = list(settings.export_destinations)
        self.root = settings.data_dir / "outbox"
        self.files = DocumentFiles(self.root)
        self.outbox = Outbox(settings.data_dir / "state.sqlite3", documents, clock)
        dropped = self.outbox.sync_targets((d.name, d.documents) for d in self.destinations)
        if dropped:
            log.warning("%d export job(s) of destinations no longer configured are dead-lettered", dropped)
        self._senders = {d.name: sender_for(d) for d in self.destinations}
        self._destination = {d.name: d for d in self.destinations}
        self._wake = {d.name: threading.Event() for d in self.destinations}
        self._stop = threading.Event()
        self._build_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._summary: dict[str, dict[str, Any]] = {}
        self._last_prune = 0.0
        #: Per destination: consecutive destination-wide failures, and no attempt before this time.
        self._streak: dict[str, int] = {}
        self._hold_until: dict[str, float] = {}

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Recover attempts a stopped process left in flight, then start the threads."""
        interrupted = self.outbox.recover()
        if interrupted:
            log.warning(
                "%d export attempt(s) were in flight when the service stopped; their SRs may reach the "
                "peer twice (counted as possible duplicates when delivered)",
                interrupted,
            )
        known = self.outbox.known_paths()
        for name in self.files.names():  # document files built but never recorded (a crash in between)
            if name not in known:
                self.files.remove(name)
        for name in self.outbox.prune(self.settings.results_max_age_s):
            self.files.remove(name)
        self.refresh()
        if not self.destinations:
            return  # nothing to deliver; jobs left by an earlier configuration were dead-lettered
        for d in self.destinations:
            self._spawn(f"retinaedge-export-{d.name}", self._deliver_loop, d.name)
        self._spawn("retinaedge-export-watch", self._watch_loop)
        log.info("exporting results to %d destination(s)", len(self.destinations))

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        def named() -> None:
            name_this_thread()
            target(*args)

        thread = threading.Thread(target=named, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the threads; one still waiting for a peer is left behind (a daemon): its attempt stays
        in flight in the database and is found interrupted at the next start."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            log.warning("an export attempt was still waiting for its peer at shutdown")
            return  # its thread still uses the database connection
        self.outbox.close()

    def wake(self, _outcome: str = "") -> None:
        """Look for due jobs now (called when a result is recorded; its jobs were enqueued with it)."""
        for event in self._wake.values():
            event.set()

    # -- delivery ---------------------------------------------------------------------------------------
    def _deliver_loop(self, name: str) -> None:
        while not self._stop.is_set():
            try:
                held = self._hold_until.get(name, -math.inf) - self.clock()
                if held > 0:  # the destination failed as a whole: nothing is tried before then
                    self._stop.wait(min(POLL_S, held))
                    continue
                job = self.outbox.due(name, self.clock())
                if job is None:
                    due = self.outbox.next_due_at(name)
                    wait = POLL_S if due is None else min(POLL_S, max(0.01, due - self.clock()))
                    self._wake[name].wait(wait)
                    self._wake[name].clear()
                    continue
                self._attempt(name, job)
            except STORAGE_ERRORS as exc:  # the database or disk: try again later, nothing is lost
                log.warning("export to %r paused: %s", name, type(exc).__name__)
                self._stop.wait(POLL_S)
            except Exception:  # a bug: keep the thread alive; the job stays as recorded
                log.exception("export to %r: unexpected error", name)
                self._stop.wait(POLL_S)

    def _attempt(self, name: str, job: Job) -> None:
        try:
            instances = self._document(job)
        except NothingToSend as exc:
            dropped = self.outbox.discard(job.document_id)
            log.info("export job %d: no %s to send (%s); skipped for %d destination(s)",
                     job.id, job.document_kind, exc, len(dropped))  # fmt: skip
            self.refresh()
            return
        except NoDocument as exc:
            self.outbox.kill(job, str(exc))
            log.error("export job %d to %r dead-lettered: %s", job.id, name, exc)
            self.refresh()
            return
        found_after, timeout_s = self._ask_first(name, job, instances)
        if found_after == 0 and job.attempts >= self.settings.export_max_attempts:
            # Past its limit only after an unanswered last attempt, kept to be asked once: not sent again.
            self.outbox.kill(job, f"no answer to the last attempt, and {name!r} cannot confirm it holds it")
            log.error("export job %d to %r dead-lettered: no answer to its last attempt", job.id, name)
            self.refresh()
            return
        attempt = self.outbox.begin(job)
        if found_after:
            delivery = Delivery(
                "delivered", f"the peer holds it: a late success of {found_after} unanswered attempt(s)"
            )
        else:
            try:
                delivery = self._senders[name].send(instances, timeout_s=timeout_s)
            except Exception as exc:  # a bug while sending: the document may have gone out
                log.exception("export to %r: the sender failed", name)
                delivery = Delivery("unknown", f"internal error while sending: {type(exc).__name__}")
        n = job.attempts + 1
        if delivery.outcome == "delivered":
            self._streak[name] = 0
            retry: float | None = None
        elif delivery.destination_wide:  # the destination is down: hold it back, not just this job
            self._streak[name] = self._streak.get(name, 0) + 1
            retry = self._backoff(self._streak[name])
            self._hold_until[name] = self.clock() + retry
        else:
            retry = self._backoff(n)
        if delivery.outcome != "delivered" and n >= self.settings.export_max_attempts:
            # Dead-lettered, but an unanswered attempt may have stored it: the peer is asked once more.
            retry = retry if delivery.outcome == "unknown" and self._askable(name) else None
        state = self.outbox.finish(
            job,
            attempt,
            delivery.outcome,
            delivery.detail,
            confirmed_duplicate=delivery.duplicate,
            retry_in_s=retry,
            found_after=found_after,
        )
        if state == "delivered":
            log.info("export job %d: %s delivered to %r (attempt %d)", job.id, job.document_kind, name, n)
        elif state == "pending":
            log.warning(
                "export job %d to %r: attempt %d %s (%s); next in %.3g s",
                job.id, name, n, delivery.outcome, delivery.detail, retry,
            )  # fmt: skip
        else:
            log.error(
                "export job %d to %r dead-lettered after %d attempts: %s", job.id, name, n, delivery.detail
            )
        self.refresh()

    def _askable(self, name: str) -> bool:
        """Whether ``name``'s protocol lets the dispatcher ask it for a document (:mod:`.presence`)."""
        return type(self._destination[name]) in ASKABLE

    def _ask_first(self, name: str, job: Job, instances: list[Instance]) -> tuple[int, float]:
        """For a job an attempt of which went unanswered: (how many, when the peer says it holds the
        document, else 0; the timeout of the next attempt). The timeout doubles with each unanswered
        attempt (up to 16 times ``timeout_s``, at most 600 s), so a peer slower than ``timeout_s`` is
        answered in the end instead of being sent the document again and again."""
        dest = self._destination[name]
        if not job.possibly_delivered:
            return 0, dest.timeout_s
        unanswered = self.outbox.unanswered(job.id)
        timeout_s = min(dest.timeout_s * 2 ** min(unanswered, 4), max(dest.timeout_s, 600.0))
        held = holds(dest, instances, timeout_s)
        log.info("export job %d: %r %s after %d unanswered attempt(s)", job.id, name,
                 {True: "holds the document", False: "does not hold the document",
                  None: "cannot be asked whether it holds the document"}[held], unanswered)  # fmt: skip
        return (max(unanswered, 1) if held else 0), timeout_s

    def _backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures: initial, doubling, capped."""
        s = self.settings
        return float(min(s.export_retry_initial_s * 2 ** min(failures - 1, 60), s.export_retry_max_s))

    def _document(self, job: Job) -> list[Instance]:
        """The job's document, its SOP instances' files, built (or a stored document's linked) and
        recorded on first use (once for all destinations)."""
        import pydicom.errors

        with self._build_lock:
            current = self.outbox.job(job.id) or job
            if current.path is not None:
                try:
                    return self.files.instances(current.path)
                except (OSError, pydicom.errors.InvalidDicomError, ValueError, AttributeError) as exc:
                    log.warning("export job %d: its document file cannot be read (%s); building it again",
                                job.id, type(exc).__name__)  # fmt: skip
            built = self.builder.build(current)
            if isinstance(built, dict):  # a stored document's files
                try:
                    name, instances = self.files.link(current.document_id, built)
                except FileNotFoundError as exc:  # removed meanwhile (retention, a newer result)
                    raise NoDocument("the stored document's files are no longer kept") from exc
            else:
                name, instances = self.files.write(current.document_id, built)
            try:
                uids = "\\".join(i.sop_instance_uid for i in instances)  # DICOM's multi-value separator
                self.outbox.set_document(current.document_id, name, uids)
            except BaseException:
                self.files.remove(name)
                raise
            return instances

    # -- series, housekeeping, state ----------------------------------------------------------------------
    def _watch_loop(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._watch_series()
                for name in self.outbox.release_documents():
                    self.files.remove(name)
                if time.monotonic() - self._last_prune > PRUNE_EVERY_S:
                    self._last_prune = time.monotonic()
                    for name in self.outbox.prune(self.settings.results_max_age_s):
                        self.files.remove(name)
                self.refresh()
            except STORAGE_ERRORS as exc:
                log.warning("export housekeeping paused: %s", type(exc).__name__)
            except Exception:
                log.exception("export housekeeping: unexpected error")

    def _watch_series(self) -> None:
        """Jobs of the series' documents, and of their study's, for watched series that are complete now
        (:func:`retinaedge.service.results.completion.series_status`)."""
        added = 0
        for uid, model in self.outbox.watched_series():
            src = self.sources.get(model)
            rows = src.store.series_rows(uid) if src is not None else []
            if not rows:
                self.outbox.unwatch(uid, model)
                continue
            status = series_status(
                rows, self.clock(), self.settings.series_quiet_s, self.store.series_requested_at(uid)
            )
            if status.state != "complete":
                continue
            if status.done == 0:  # nothing to report: every instance failed
                self.outbox.unwatch(uid, model)
                continue
            added += self.outbox.series_complete(uid, status.last_received_at, rows[0].study_uid, model)
        if added:
            self.wake()

    def refresh(self) -> None:
        """Re-read the per-destination summary from the database."""
        self._summary = self.outbox.summary()

    def summary(self) -> list[dict[str, Any]]:
        """Each configured destination with its jobs, counters, last attempt and state (from memory)."""
        out = []
        for d in self.destinations:
            s = self._summary.get(d.name) or {
                "jobs": {"pending": 0, "delivered": 0, "dead": 0},
                "counters": {},
                "oldest_pending_at": None,
                "last_attempt": None,
                "last_delivered_at": None,
            }
            last = s["last_attempt"]
            failing = s["jobs"]["pending"] > 0 and last is not None and last["outcome"] != "delivered"
            counters = s["counters"]
            out.append(
                {
                    "name": d.name,
                    "type": d.type,
                    "target": d.target(),
                    "instance_sr": d.instance_sr,
                    "series_sr": d.series_sr,
                    "documents": list(d.documents),
                    "state": "failing" if failing else "ok",
                    "jobs": dict(s["jobs"]),
                    "oldest_pending_at": s["oldest_pending_at"],
                    "last_attempt": last,
                    "last_delivered_at": s["last_delivered_at"],
                    "attempts": {
                        k: counters.get(f"attempts_{k}", 0)
                        for k in ("delivered", "failed", "unknown", "interrupted")
                    },
                    "duplicates": {
                        "possible": counters.get("duplicates_possible", 0),
                        "confirmed": counters.get("duplicates_confirmed", 0),
                    },
                    "dead_lettered": counters.get("dead", 0),
                    "skipped": counters.get("skipped", 0),
                }
            )
        return out

    def degraded(self) -> list[str]:
        """Why export is degraded (for ``/readyz``): destinations failing now, dead-lettered jobs."""
        reasons = []
        for d in self.summary():
            if d["state"] == "failing":
                last = d["last_attempt"]
                reasons.append(
                    f"export destination {d['name']!r} failing: {d['jobs']['pending']} SR(s) waiting, "
                    f"last attempt {last['outcome']}: {last['detail']}"
                )
            if d["jobs"]["dead"]:
                reasons.append(
                    f"export destination {d['name']!r}: {d['jobs']['dead']} SR(s) dead-lettered "
                    "(GET /v1/exports?state=dead; POST /v1/exports/retry queues them again)"
                )
        return reasons
