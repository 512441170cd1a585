"""The one inference thread: it owns the backend (and, on a GPU, the CUDA context); handlers hand it work
through a bounded queue and await a future."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaedge.runtime.bundle import self_test
from retinaedge.runtime.detector import Detector, InstanceResult
from retinaedge.runtime.errors import NotReadyError, OverloadedError

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Job:
    data: bytes | Path
    future: concurrent.futures.Future[InstanceResult]
    enqueued: float


class InferenceWorker:
    """``submit(bytes) -> Future[InstanceResult]``; ``state`` is ``loading``, ``ready`` or ``failed``."""

    def __init__(
        self, open_detector: Callable[[], Detector], *, queue_size: int, max_age_s: float, retry_after_s: int
    ) -> None:
        self._open = open_detector
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._max_age = max_age_s
        self._retry_after = retry_after_s
        self._thread = threading.Thread(target=self._run, name="retinaedge-inference", daemon=True)
        self.state = "loading"
        self.reason = "model loading"
        self.backend = ""
        self.backend_reason = ""
        self.self_test: dict[str, Any] = {}
        self._ready = threading.Event()

    def set_status(self, reason: str) -> None:
        """Progress while loading (e.g. an engine build), shown by /readyz until the worker is ready."""
        if self.state == "loading":
            self.reason = reason
            log.info("inference worker: %s", reason)

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.state == "ready"

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit_path(self, path: Path) -> concurrent.futures.Future[InstanceResult]:
        """Like :meth:`submit` for a spooled file (read frame by frame by the worker)."""
        return self.submit(path)

    def submit(self, data: bytes | Path) -> concurrent.futures.Future[InstanceResult]:
        if self.state != "ready":
            raise NotReadyError(f"the model is not ready: {self.reason}")
        job = _Job(data, concurrent.futures.Future(), time.monotonic())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise OverloadedError(
                f"the inference queue is full ({self._queue.maxsize} instances waiting)", self._retry_after
            ) from None
        return job.future

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            detector = self._open()
            self.backend = detector.backend.name
            self.backend_reason = detector.backend_reason
            try:
                reports = self_test(detector.backend, detector.bundle, criteria=detector.self_test_criteria)
            except BaseException:
                detector.close()
                raise
            self.self_test = {
                "passed": True,
                "matched": [r.matched for r in reports],
                "expected": [r.reference for r in reports],
            }
            self.state, self.reason = "ready", "model loaded and golden self-test passed"
            log.info("inference worker ready: backend %s (%s)", self.backend, self.backend_reason or "-")
        except Exception as exc:  # any failure to load means not ready, reported, never a crash
            self.state, self.reason = "failed", f"{type(exc).__name__}: {exc}"
            self.self_test = {"passed": False, "error": self.reason}
            log.error("inference worker failed to start: %s", self.reason)
            self._ready.set()
            self._drain(NotReadyError(self.reason))
            return
        self._ready.set()
        with detector:
            while True:
                job = self._queue.get()
                if job is _STOP:
                    break
                if not job.future.set_running_or_notify_cancel():
                    continue
                age = time.monotonic() - job.enqueued
                if age > self._max_age:
                    job.future.set_exception(
                        OverloadedError(
                            f"the request waited {age:.1f} s in the queue (limit {self._max_age:.0f} s)",
                            self._retry_after,
                        )
                    )
                    continue
                try:
                    job.future.set_result(detector.detect(job.data))
                except BaseException as exc:  # handed to the request that caused it
                    job.future.set_exception(exc)
        self._drain(NotReadyError("the service is shutting down"))

    def _drain(self, exc: Exception) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)
