"""Runs acknowledged STOW-RS instances through the inference worker, durably.

The SQLite row is the truth: a pending row is processed until it is done or failed; after a crash or a
restart every pending row is queued again. The spool file is removed only after the outcome is committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from retinaedge.runtime.errors import DicomInputError, NotReadyError, OverloadedError

from .spool import Spool
from .store import Store
from .worker import InferenceWorker

log = logging.getLogger(__name__)


class Processor:
    """An asyncio task feeding pending instances to the worker; ``enqueue(uid)`` is thread-safe-free (loop only)."""

    def __init__(
        self,
        store: Store,
        spool: Spool,
        worker: InferenceWorker,
        *,
        retry_s: float = 0.25,
        on_outcome: Callable[[str], None] = lambda _o: None,
        after_each: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.spool = spool
        self.worker = worker
        self.retry_s = retry_s
        self.on_outcome = on_outcome
        self.after_each = after_each
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def enqueue(self, uid: str) -> None:
        self.queue.put_nowait(uid)

    def recover(self) -> int:
        """Queue every pending row again and delete spool files no row refers to (never acknowledged)."""
        known = self.store.spool_paths()
        for path in self.spool.files():
            if path.name not in known:
                path.unlink(missing_ok=True)
        pending = self.store.pending()
        for uid in pending:
            self.enqueue(uid)
        return len(pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="retinaedge-processor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            uid = await self.queue.get()
            row = await asyncio.to_thread(self.store.get, uid)
            if row is None or row.state != "pending" or row.spool_path is None:
                continue
            path: Path = self.spool.root / row.spool_path
            while True:
                try:
                    result = await asyncio.wrap_future(self.worker.submit_path(path))
                except (OverloadedError, NotReadyError):
                    if self.worker.state == "failed":
                        log.error("processing paused: the backend failed (%s)", self.worker.reason)
                    await asyncio.sleep(self.retry_s)  # stays pending: nothing is lost
                    continue
                except DicomInputError as exc:
                    await asyncio.to_thread(self.store.failed, uid, exc.type, str(exc))
                    self.on_outcome(exc.type)
                    break
                except Exception as exc:  # a bug: record it against the instance, keep serving
                    log.exception("processing failed")
                    await asyncio.to_thread(
                        self.store.failed, uid, "internal-error", f"{type(exc).__name__}: {exc}"
                    )
                    self.on_outcome("internal-error")
                    break
                body = result.to_json()
                body["backend"] = self.worker.backend
                body["backend_reason"] = self.worker.backend_reason
                await asyncio.to_thread(self.store.done, uid, body)
                self.on_outcome("ok")
                break
            path.unlink(missing_ok=True)
            self.after_each()
