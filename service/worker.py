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


@dataclass
class _Swap:
    open: Callable[[], Detector]
    done: concurrent.futures.Future[bool]


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

    def report_backend(self, reason: str) -> None:
        """Replace ``backend_reason`` (e.g. when a background engine build failed)."""
        self.backend_reason = reason
        log.warning("backend %s: %s", self.backend, reason)

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

    def swap(self, open_detector: Callable[[], Detector]) -> concurrent.futures.Future[bool]:
        """Replace the detector on the inference thread, between two jobs (e.g. ONNX Runtime by a
        TensorRT engine built in the background).

        The new detector must pass the golden self-test first; if opening or the self-test fails, the
        current detector keeps serving and the failure is added to ``backend_reason``. The future is
        True when the detector was replaced. Waits behind the jobs already queued, never refused.
        """
        done: concurrent.futures.Future[bool] = concurrent.futures.Future()
        if self.state != "ready":
            done.set_result(False)
            return done
        self._queue.put(_Swap(open_detector, done))
        return done

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
            self.self_test = _passed(reports)
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
        try:
            while True:
                job = self._queue.get()
                if job is _STOP:
                    break
                if isinstance(job, _Swap):
                    detector = self._swap(detector, job)
                    continue
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
        finally:
            detector.close()
        self._drain(NotReadyError("the service is shutting down"))

    def _swap(self, current: Detector, job: _Swap) -> Detector:
        """Open and self-test the new detector; on success close ``current`` and return the new one."""
        try:
            new = job.open()
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            self.backend_reason = f"{self.backend_reason}; switching backend failed: {why}"
            log.error("switching backend failed, still serving with %s: %s", self.backend, why)
            job.done.set_result(False)
            return current
        try:
            reports = self_test(new.backend, new.bundle, criteria=new.self_test_criteria)
        except Exception as exc:
            new.close()
            why = f"{type(exc).__name__}: {exc}"
            self.backend_reason = f"{self.backend_reason}; the new backend failed the self-test: {why}"
            log.error(
                "new backend %s failed the self-test, still serving with %s", new.backend.name, self.backend
            )
            job.done.set_result(False)
            return current
        current.close()
        self.backend, self.backend_reason = new.backend.name, new.backend_reason
        self.self_test = _passed(reports)
        log.info("now serving with %s (%s)", self.backend, self.backend_reason)
        job.done.set_result(True)
        return new

    def _drain(self, exc: Exception) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _Swap):
                job.done.set_result(False)
            elif job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)


def _passed(reports: list[Any]) -> dict[str, Any]:
    """The ``self_test`` summary /readyz shows for a passed golden self-test."""
    return {
        "passed": True,
        "matched": [r.matched for r in reports],
        "expected": [r.reference for r in reports],
    }
