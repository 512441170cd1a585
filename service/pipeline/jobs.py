"""One admitted instance on its way through the pipeline, and the frames it puts in the batch queue.

A pool thread reads the instance (:meth:`InstanceJob.read`): it parses and validates it, then queues its
frames one by one as :class:`QueuedFrame`. When ``max_waiting`` of them wait in the queue, the step
stops and the thread goes back to the pool; the next step runs once one of them has left the queue
(:meth:`InstanceJob.left_queue`), so a long instance never holds a reader that other requests need. The
inference thread runs frames from any instances together
and hands each one's outputs back (:meth:`InstanceJob.add_outputs`). Once every frame is back, a pool
thread builds the result in frame order (:meth:`InstanceJob.finish`) and resolves the future. The first
error (unreadable data, a frame that does not decode, the backend failing) resolves the future with that
error; outputs that arrive later are dropped.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from retinaedge.runtime.detections import ImageDetections
from retinaedge.runtime.dicomio import DicomInput, ImageInfo
from retinaedge.runtime.errors import OverloadedError
from retinaedge.runtime.geometry import Letterbox
from retinaedge.runtime.instance_result import InstanceResult, frame_result, instance_result
from retinaedge.runtime.reader import InstanceReader, OpenInstance, ReadFrame
from retinaedge.service.pipeline.remote import RemoteInstance, RemoteReader

#: The pipeline's readers: in the service's process (threads) or in reader processes (:mod:`.remote`).
Reader = InstanceReader | RemoteReader

OnOpen = Callable[[DicomInput], None]
"""Called in the pool thread with the parsed and validated instance, before any frame is decoded (for
example to split its header for the record kept of a ``/v1/detect`` result). With reader processes only
an :class:`~.remote.Extracting` callback is honoured: its ``extract`` runs in the reader process."""


@dataclass
class QueuedFrame:
    """One prepared frame waiting for the backend; ``queued`` is ``time.monotonic()`` when it was put."""

    job: InstanceJob
    frame: ReadFrame
    queued: float


@dataclass
class _Output:
    index: int
    rule: str
    letterbox: Letterbox  # not the frame's image: a finished frame's pixels are freed at once
    detections: ImageDetections
    inference_ms: float  # this frame's share of its batch's run
    wait_ms: float  # from queued to its batch's start


@dataclass(eq=False)  # identity semantics: jobs live in a set while admitted
class InstanceJob:
    """``source`` (PS3.10 bytes or a spooled file) and the future its :class:`InstanceResult` resolves."""

    source: bytes | Path
    future: concurrent.futures.Future[InstanceResult]
    enqueued: float  # time.monotonic() when admitted
    started: float = field(default_factory=time.perf_counter)
    on_open: OnOpen | None = None
    #: Frames of this instance that may wait in the batch queue at once (0: no limit; the worker sets
    #: it): a long instance cannot fill the queue ahead of the frames of other requests.
    max_waiting: int = 0
    info: ImageInfo | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: The worker's count of this job's frames declared and not queued yet (None until the header is
    #: read), and whether that count was given back (the worker's lock guards both).
    promised: int | None = None
    settled: bool = False
    _outputs: list[_Output] = field(default_factory=list)
    _expected: int | None = None  # frames queued, once all of them are
    _failed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _started_reading: bool = False
    _inst: OpenInstance | RemoteInstance | None = None
    _frames: Iterator[ReadFrame] | None = None
    _queued: int = 0  # frames put in the batch queue so far
    _waiting: int = 0  # of those, frames still in the queue (or about to be put there)
    _parked: bool = False  # a reading step stopped at max_waiting; left_queue() resumes it

    def read(
        self,
        reader: Reader,
        put: Callable[[QueuedFrame], None],
        *,
        opened: Callable[[int], None],
        max_age_s: float,
        retry_after_s: int,
    ) -> bool | None:
        """One reading step: the first one opens the instance (parse, validate, ``on_open``) and tells
        ``opened`` how many frames it declares; every step then decodes and ``put``s frames (``put`` may
        block while the worker's frame budget is spent) until ``max_waiting`` of them wait in the queue.

        Returns True when every frame was queued (the result follows once they are all back), False when
        the job ended here (cancelled, too old, or failed: the future holds the error), None when the step
        stopped with frames still to read: :meth:`left_queue` says when the next step may run. A parked
        job holds no thread.
        """
        if not self._started_reading:
            self._started_reading = True
            if not self._open(reader, opened, max_age_s, retry_after_s):
                return False
        assert self._frames is not None and self._inst is not None
        try:
            while True:
                with self._lock:
                    if self._failed:
                        break
                    declared = self.info.frames if self.info is not None else 0
                    if self.max_waiting and self._waiting >= self.max_waiting and self._queued < declared:
                        self._parked = True  # frames are left to read (after the last one: no step more)
                        return None
                    self._waiting += 1  # this frame's place, taken before it is decoded
                try:
                    frame = next(self._frames)
                except StopIteration:
                    with self._lock:
                        self._waiting -= 1
                    break
                put(QueuedFrame(self, frame, time.monotonic()))
                self._queued += 1
        except BaseException as exc:  # handed to the request that caused it
            self.fail(exc)
        if self._failed:
            self._close()
            return False
        self.timings_ms.update(self._inst.timings_ms)
        self._close()
        with self._lock:
            self._expected = self._queued
            complete = len(self._outputs) == self._queued
        if complete:
            self.finish(reader)
        return True

    def _open(
        self, reader: Reader, opened: Callable[[int], None], max_age_s: float, retry_after_s: int
    ) -> bool:
        """The first step: parse and validate; False when the job ended here."""
        if not self.future.set_running_or_notify_cancel():
            return False
        age = time.monotonic() - self.enqueued
        if age > max_age_s:
            self.fail(
                OverloadedError(
                    f"the request waited {age:.1f} s in the queue (limit {max_age_s:.0f} s)", retry_after_s
                )
            )
            return False
        try:
            if isinstance(reader, RemoteReader):
                self._inst = reader.open(self.source, self.on_open)
            else:
                self._inst = reader.open(self.source)
                if self.on_open is not None:
                    self.on_open(self._inst.src)
            self.info = self._inst.info
            opened(self._inst.info.frames)
            self._frames = self._inst.frames()
        except BaseException as exc:  # handed to the request that caused it
            self.fail(exc)
            self._close()
            return False
        finally:
            self.source = b""  # parsed: the request's bytes are not kept while its frames run
        return True

    def left_queue(self) -> bool:
        """One of this job's frames left the batch queue (into a batch): True when a parked reading step
        should run now (the caller submits it)."""
        with self._lock:
            self._waiting -= 1
            if self._parked and not self._failed:
                self._parked = False
                return True
            return False

    def close_instance(self) -> None:
        """Release the instance of a job that failed while no reading step runs (once)."""
        self._close()

    def _close(self) -> None:
        """Release the instance's file and buffers. One thread at a time owns the reading (a step, or,
        while the job is parked, whichever thread fails it), so this runs once."""
        inst, self._inst, self._frames = self._inst, None, None
        if inst is not None:
            inst.close()

    def add_outputs(
        self, frame: ReadFrame, detections: ImageDetections, inference_ms: float, wait_ms: float
    ) -> bool:
        """Record one frame's outputs; True when that was the last frame (call :meth:`finish` then)."""
        with self._lock:
            if self._failed:
                return False
            self._outputs.append(
                _Output(frame.index, frame.rule, frame.letterbox, detections, inference_ms, wait_ms)
            )
            return self._expected is not None and len(self._outputs) == self._expected

    def finish(self, reader: Reader) -> None:
        """Build the result in frame order and resolve the future (a pool thread; not the inference one)."""
        if self.info is None or self._failed:
            return
        t = time.perf_counter()
        try:
            manifest = reader.bundle.manifest
            outputs = sorted(self._outputs, key=lambda o: o.index)
            frames = [
                frame_result(
                    manifest.class_names, o.index, o.rule, o.letterbox, o.detections, manifest.operating_point
                )
                for o in outputs
            ]
            timings = {
                **{k: self.timings_ms.get(k, 0.0) for k in ("parse", "decode", "preprocess")},
                "queue": max((o.wait_ms for o in outputs), default=0.0),
                "inference": sum(o.inference_ms for o in outputs),
                "postprocess": (time.perf_counter() - t) * 1e3,
            }
            timings["total"] = (time.perf_counter() - self.started) * 1e3
            result = instance_result(reader.bundle.manifest, self.info, frames, timings)
        except BaseException as exc:
            self.fail(exc)
            return
        try:
            self.future.set_result(result)
        except concurrent.futures.InvalidStateError:  # cancelled meanwhile
            pass

    def fail(self, exc: BaseException) -> None:
        """Resolve the future with ``exc`` (the first error wins; later outputs are dropped)."""
        with self._lock:
            if self._failed:
                return
            self._failed = True
            parked, self._parked = self._parked, False
        if parked:  # no reading step runs, nor will: this thread closes the instance
            self._close()
        try:
            if self.future.running() or self.future.set_running_or_notify_cancel():
                self.future.set_exception(exc)
        except (concurrent.futures.InvalidStateError, RuntimeError):  # already resolved or cancelled
            pass
