"""The serving pipeline: CPU stages in a pool of threads, one inference thread batching frames across
requests.

``submit(source)`` admits one instance (or raises :class:`OverloadedError` at once) and returns a future of
its :class:`InstanceResult`. A pool thread (``prepare_threads``) reads the instance (parse, validate,
decode, modality LUT and window, letterbox: :mod:`retinaedge.runtime.reader`) and queues its frames; the one
thread that owns the backend (and, on a GPU, the CUDA context) gathers frames from every instance into
batches (:mod:`.batching`), runs them and hands the outputs back; the result is then built in
frame order (:mod:`.jobs`) on a thread of its own (``retinaedge-finish``).

Memory is bounded twice: at most ``queue_size + 1`` instances are admitted at a time, and at most
``max_frames_in_flight`` prepared frames wait for inference (a reader blocks until frames are run).
Fairness: one instance has at most ``max_batch_size`` frames waiting in the queue, so a long multi-frame
instance cannot make the single-frame requests behind it wait for all of its frames; while it waits for
one of them to leave the queue, it holds no reader thread (its reading is parked and resumed), so long
instances cannot take every reader from the requests behind them either.
At start the inference thread opens the detector, runs the golden self-test, then runs every batch size
it will see once (warm-up) before it reports ready.
"""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.runtime.backends.base import Backend
from retinaedge.runtime.bundle import self_test
from retinaedge.runtime.detections import ImageDetections, split_outputs
from retinaedge.runtime.detector import Detector
from retinaedge.runtime.errors import NotReadyError, OverloadedError
from retinaedge.runtime.instance_result import InstanceResult
from retinaedge.runtime.reader import InstanceReader
from retinaedge.runtime.threadname import name_this_thread
from retinaedge.service.pipeline.batching import BatchPolicy, gather
from retinaedge.service.pipeline.jobs import InstanceJob, OnOpen, QueuedFrame, Reader
from retinaedge.service.pipeline.remote import RemoteReader

log = logging.getLogger(__name__)

_STOP = object()
#: A reader waiting for frame budget looks up this often whether the pipeline is stopping (seconds).
_BUDGET_POLL_S = 0.25


@dataclass
class _Swap:
    open: Callable[[], Detector]
    done: concurrent.futures.Future[bool]


def freeze_heap() -> int:
    """Collect, then move every object alive now (modules, the app, the backend) to the garbage
    collector's permanent generation, so that a full collection no longer walks them: in the service
    about 97,000 objects, whose full collection took 31 ms on a 2-vCPU Xeon, a pause of every Python
    thread. Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def default_prepare_threads() -> int:
    """The usable CPUs, at most 4 (the readers share them with the backend's own threads)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


class InferenceWorker:
    """``submit(source) -> Future[InstanceResult]``; ``state`` is ``loading``, ``ready`` or ``failed``."""

    def __init__(
        self,
        open_detector: Callable[[], Detector],
        *,
        queue_size: int,
        max_age_s: float,
        retry_after_s: int,
        policy: BatchPolicy | None = None,
        prepare_threads: int | None = None,
        max_frames_in_flight: int | None = None,
        reader_processes: int = 0,
    ) -> None:
        self._open = open_detector
        self.policy = policy or BatchPolicy(max_batch_size=4)
        self._limit = queue_size + 1
        self._max_age = max_age_s
        self._retry_after = retry_after_s
        self._frames: queue.Queue[Any] = queue.Queue()
        self._budget = threading.Semaphore(max_frames_in_flight or 4 * self.policy.max_batch_size)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            prepare_threads or default_prepare_threads(),
            thread_name_prefix="retinaedge-prepare",
            initializer=name_this_thread,
        )
        # Results are built on their own thread, never behind readers waiting for frame budget.
        self._finisher = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="retinaedge-finish", initializer=name_this_thread
        )
        self._lock = threading.Lock()
        self._jobs: set[InstanceJob] = set()
        self._unopened = 0  # admitted instances whose header is not read yet
        self._promised = 0  # frames declared by opened instances and not queued yet
        self._closing = False
        self._reader: Reader | None = None
        self._reader_processes = reader_processes  # > 0: readers in processes (:mod:`.remote`)
        self._thread = threading.Thread(target=self._run, name="retinaedge-inference", daemon=True)
        self.state = "loading"
        self.reason = "model loading"
        self.backend = ""
        self.backend_reason = ""
        self.precision = "fp32"  # what the backend computes in (results and /v1/model say it)
        self.self_test: dict[str, Any] = {}
        #: Called with the size of every batch run (metrics).
        self.on_batch: Callable[[int], None] = lambda _n: None
        self._ready = threading.Event()

    # -- status ------------------------------------------------------------------------------------------
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
        """Instances admitted and not finished (being read, waiting for or in inference)."""
        return len(self._jobs)

    # -- admission ---------------------------------------------------------------------------------------
    def submit_path(self, path: Path) -> concurrent.futures.Future[InstanceResult]:
        """Like :meth:`submit` for a spooled file (read frame by frame by a pool thread)."""
        return self.submit(path)

    def submit(
        self, data: bytes | Path, *, on_open: OnOpen | None = None
    ) -> concurrent.futures.Future[InstanceResult]:
        """Admit one instance; raises :class:`NotReadyError` or :class:`OverloadedError` (503) at once."""
        if self.state != "ready" or self._reader is None:
            raise NotReadyError(f"the model is not ready: {self.reason}")
        job = InstanceJob(
            data,
            concurrent.futures.Future(),
            time.monotonic(),
            on_open=on_open,
            max_waiting=self.policy.max_batch_size,
        )
        with self._lock:
            if self._closing:
                raise NotReadyError("the service is shutting down")
            if len(self._jobs) >= self._limit:
                raise OverloadedError(
                    f"the inference queue is full ({self._limit} instances in the pipeline)",
                    self._retry_after,
                )
            self._jobs.add(job)
            self._unopened += 1
        ref = weakref.ref(job)  # no cycle future -> callback -> job -> future: freed as soon as it is done
        job.future.add_done_callback(lambda _f: self._forget(ref()))
        try:
            self._pool.submit(self._read, job, self._reader).add_done_callback(self._dropped(job))
        except RuntimeError:  # the pool is shut down: stopping (its count is given back by _forget)
            job.fail(NotReadyError("the service is shutting down"))
        return job.future

    def _forget(self, job: InstanceJob | None) -> None:
        """The job's future is resolved: it leaves the pipeline, and the frames it will not queue any
        more stop counting as on their way."""
        if job is not None:
            with self._lock:
                self._jobs.discard(job)
                self._settle(job)

    def _settle(self, job: InstanceJob) -> None:
        """Give back what ``job`` still counts in ``_unopened`` / ``_promised`` (once; under the lock)."""
        if job.settled:
            return
        job.settled = True
        if job.promised is None:
            self._unopened -= 1
        else:
            self._promised -= job.promised
            job.promised = 0

    def _read(self, job: InstanceJob, reader: Reader) -> None:
        """A pool thread: one reading step of ``job`` (:meth:`InstanceJob.read`), keeping count of the
        frames still to come."""

        def opened(frames: int) -> None:
            with self._lock:
                if not job.settled:
                    self._unopened -= 1
                    self._promised += frames
                    job.promised = frames

        def put(frame: QueuedFrame) -> None:
            self._take_budget()
            with self._lock:  # counted before it is queued: the batcher never waits for a frame it has
                if not job.settled and job.promised:
                    self._promised -= 1
                    job.promised -= 1
            frame.queued = time.monotonic()
            self._frames.put(frame)

        outcome = None
        try:
            outcome = job.read(
                reader, put, opened=opened, max_age_s=self._max_age, retry_after_s=self._retry_after
            )
        finally:
            if outcome is not None or job.future.done():  # the reading ended (not parked)
                with self._lock:
                    self._settle(job)

    def _resume(self, job: InstanceJob) -> None:
        """Run the next reading step of a parked job on the pool."""
        reader = self._reader
        try:
            assert reader is not None
            self._pool.submit(self._read, job, reader).add_done_callback(self._dropped(job))
        except RuntimeError:  # the pool is shut down: stopping
            job.fail(NotReadyError("the service is shutting down"))
            job.close_instance()

    @staticmethod
    def _dropped(job: InstanceJob) -> Callable[[concurrent.futures.Future[None]], None]:
        """For a submitted reading step: when the pool cancels it unrun (shutdown), fail the job and
        release its instance (a resumed job's is open)."""

        def done(step: concurrent.futures.Future[None]) -> None:
            if step.cancelled():
                job.fail(NotReadyError("the service is shutting down"))
                job.close_instance()

        return done

    def _take_budget(self) -> None:
        """One unit of the frame budget (bounded waits; gives up when the pipeline stops)."""
        self._take(self._budget)
        if self._closing:
            self._budget.release()
            raise NotReadyError("the service is shutting down")

    def _take(self, semaphore: threading.Semaphore) -> None:
        while not semaphore.acquire(timeout=_BUDGET_POLL_S):
            if self._closing:
                raise NotReadyError("the service is shutting down")

    def _expecting(self) -> bool:
        """More frames are on their way: an admitted instance is not opened yet, or has frames to come."""
        return self._unopened > 0 or self._promised > 0

    # -- control -----------------------------------------------------------------------------------------
    def swap(self, open_detector: Callable[[], Detector]) -> concurrent.futures.Future[bool]:
        """Replace the detector on the inference thread, between two batches (e.g. ONNX Runtime by a
        TensorRT engine built in the background).

        The new detector must pass the golden self-test first; if opening or the self-test fails, the
        current detector keeps serving and the failure is added to ``backend_reason``. The future is
        True when the detector was replaced. Waits behind the frames already queued, never refused.
        """
        done: concurrent.futures.Future[bool] = concurrent.futures.Future()
        if self.state != "ready":
            done.set_result(False)
            return done
        self._frames.put(_Swap(open_detector, done))
        return done

    def stop(self, timeout: float = 30.0) -> None:
        """Stop reading and inference; instances not finished get :class:`NotReadyError`."""
        if self._thread.is_alive():
            self._frames.put(_STOP)
            self._thread.join(timeout)
        self._close(NotReadyError("the service is shutting down"))

    # -- the inference thread ----------------------------------------------------------------------------
    def run_batch(self, backend: Backend, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run one serving batch ``(N, C, H, W)`` float32 (not the self-test nor the warm-up)."""
        return backend.infer(images)

    def _run(self) -> None:
        name_this_thread()  # before the backend opens: ONNX Runtime's threads inherit the name
        try:
            detector = self._open()
            self.backend = detector.backend.name
            self.backend_reason = detector.backend_reason
            self.precision = detector.backend.precision
            try:
                reports = self_test(detector.backend, detector.bundle, criteria=detector.self_test_criteria)
                self._warm_up(detector)
            except BaseException:
                detector.close()
                raise
            self._reader = (
                RemoteReader(detector.bundle, detector.limits, self._reader_processes)
                if self._reader_processes > 0
                else InstanceReader(detector.bundle, detector.limits)
            )
            self.self_test = _passed(reports)
            log.info("%d objects moved out of the garbage collector's way", freeze_heap())
            self.state, self.reason = "ready", "model loaded and golden self-test passed"
            log.info("inference worker ready: backend %s (%s)", self.backend, self.backend_reason or "-")
        except Exception as exc:  # any failure to load means not ready, reported, never a crash
            self.state, self.reason = "failed", f"{type(exc).__name__}: {exc}"
            self.self_test = {"passed": False, "error": self.reason}
            log.error("inference worker failed to start: %s", self.reason)
            self._ready.set()
            self._close(NotReadyError(self.reason))
            return
        self._ready.set()
        try:
            while True:
                item = self._frames.get()
                control = item
                if isinstance(item, QueuedFrame):
                    batch, control = gather(
                        self._frames,
                        item,
                        self.policy,
                        expecting=self._expecting,
                        is_frame=lambda x: isinstance(x, QueuedFrame),
                    )
                    self._infer(detector, batch)
                if control is _STOP:
                    break
                if isinstance(control, _Swap):
                    detector = self._swap(detector, control)
        finally:
            detector.close()
        self._close(NotReadyError("the service is shutting down"))

    def _infer(self, detector: Detector, batch: list[QueuedFrame]) -> None:
        """Run ``batch`` and hand each frame's outputs to its instance."""
        started = time.monotonic()
        for f in batch:  # out of the queue: each instance may queue its next frames
            if f.job.left_queue():
                self._resume(f.job)
        t = time.perf_counter()
        try:
            images = np.stack([f.frame.image for f in batch]).astype(np.float32, copy=False)
            per_image = split_outputs(self.run_batch(detector.backend, images))
        except BaseException as exc:  # the backend failed: every instance in the batch gets the error
            for f in batch:
                f.job.fail(exc)
            return
        finally:
            for _ in batch:
                self._budget.release()
        share_ms = (time.perf_counter() - t) * 1e3 / len(batch)
        for f, dets in zip(batch, per_image, strict=True):
            # Copies: a backend may reuse its output buffers for the next batch.
            own = ImageDetections(dets.boxes.copy(), dets.scores.copy(), dets.labels.copy(), dets.rechecked)
            wait_ms = (started - f.queued) * 1e3
            if f.job.add_outputs(f.frame, own, share_ms, wait_ms):
                reader = self._reader
                assert reader is not None
                try:
                    self._finisher.submit(f.job.finish, reader)
                except RuntimeError:  # stopping: finish here
                    f.job.finish(reader)
        self.on_batch(len(batch))

    def _warm_up(self, detector: Detector) -> None:
        """Run each batch size the pipeline will form once, so the first requests are not outliers."""
        spec = detector.bundle.manifest.input
        t = time.perf_counter()
        for n in range(1, self.policy.max_batch_size + 1):
            detector.backend.infer(np.zeros((n, spec.channels, spec.height, spec.width), np.float32))
        log.info(
            "warm-up: batch sizes 1-%d in %.0f ms",
            self.policy.max_batch_size,
            (time.perf_counter() - t) * 1e3,
        )

    def _swap(self, current: Detector, job: _Swap) -> Detector:
        """Open, self-test and warm up the new detector; on success close ``current`` and return the new."""
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
            self._warm_up(new)
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
        gc.unfreeze()  # the old detector's objects were frozen: a collection may free them now
        freeze_heap()
        self.backend, self.backend_reason = new.backend.name, new.backend_reason
        self.precision = new.backend.precision
        self.self_test = _passed(reports)
        log.info("now serving with %s (%s)", self.backend, self.backend_reason)
        job.done.set_result(True)
        return new

    def _close(self, exc: Exception) -> None:
        """Refuse new work; fail every unfinished instance and queued control item with ``exc``."""
        with self._lock:
            self._closing = True
            jobs = list(self._jobs)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._finisher.shutdown(wait=False, cancel_futures=True)
        while True:
            try:
                item = self._frames.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Swap):
                item.done.set_result(False)
            elif isinstance(item, QueuedFrame):
                self._budget.release()
        for job in jobs:
            job.fail(exc)
        if isinstance(self._reader, RemoteReader):
            self._reader.close()


def _passed(reports: list[Any]) -> dict[str, Any]:
    """The ``self_test`` summary /readyz shows for a passed golden self-test."""
    return {
        "passed": True,
        "matched": [r.matched for r in reports],
        "expected": [r.reference for r in reports],
    }
