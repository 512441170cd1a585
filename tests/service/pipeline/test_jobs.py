"""The reading steps of one admitted instance (service/pipeline/jobs.py): parked at its queue limit, resumed when
a frame leaves the queue, never parked after its last frame, and its instance released exactly once
however it ends. The reader here hands out numbered frames; the pipeline tests run the real one."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

from retinaedge.runtime.reader import ReadFrame
from retinaedge.service.pipeline.jobs import InstanceJob, QueuedFrame


class _Info:
    def __init__(self, frames: int) -> None:
        self.frames = frames


class _Instance:
    def __init__(self, frames: int) -> None:
        self.info = _Info(frames)
        self.src = object()
        self.timings_ms = {"parse": 0.0, "decode": 0.0, "preprocess": 0.0}
        self.closed = 0

    def frames(self) -> Any:
        for i in range(self.info.frames):
            yield ReadFrame(i, None, None, "rule", None)  # type: ignore[arg-type]

    def close(self) -> None:
        self.closed += 1


class _Reader:
    def __init__(self, frames: int) -> None:
        self.inst = _Instance(frames)

    def open(self, source: Any) -> _Instance:
        return self.inst


def _job(max_waiting: int) -> InstanceJob:
    return InstanceJob(b"x", concurrent.futures.Future(), time.monotonic(), max_waiting=max_waiting)


def _step(job: InstanceJob, reader: _Reader, queue: list[QueuedFrame]) -> bool | None:
    return job.read(reader, queue.append, opened=lambda n: None, max_age_s=60, retry_after_s=1)  # type: ignore[arg-type]


def test_a_job_parks_at_its_limit_and_each_frame_leaving_the_queue_resumes_it() -> None:
    job, reader, queue = _job(1), _Reader(3), []
    assert _step(job, reader, queue) is None and len(queue) == 1  # parked with one frame waiting
    assert job.left_queue() is True  # taken into a batch: the caller runs the next step
    assert _step(job, reader, queue) is None and len(queue) == 2
    assert job.left_queue() is True
    assert _step(job, reader, queue) is True and len(queue) == 3  # the last frame: no step more
    assert reader.inst.closed == 1


def test_no_step_more_after_the_last_frame_fills_the_limit() -> None:
    for frames, limit in ((1, 1), (4, 4), (4, 2)):
        job, reader, queue = _job(limit), _Reader(frames), []
        outcome = _step(job, reader, queue)
        while outcome is None:
            assert job.left_queue()
            outcome = _step(job, reader, queue)
        assert outcome is True and len(queue) == frames and reader.inst.closed == 1
    job, reader, queue = _job(1), _Reader(1), []
    assert _step(job, reader, queue) is True  # a slice with one frame in the queue is read at once


def test_a_parked_job_that_fails_releases_its_instance_once_and_is_not_resumed() -> None:
    job, reader, queue = _job(1), _Reader(3), []
    assert _step(job, reader, queue) is None
    job.fail(RuntimeError("the backend failed"))
    assert reader.inst.closed == 1 and job.future.exception() is not None
    assert job.left_queue() is False  # failed: nothing resumes it
    job.close_instance()
    assert reader.inst.closed == 1


def test_a_job_failing_while_a_step_runs_is_released_by_that_step() -> None:
    job, reader, queue = _job(0), _Reader(3), []

    def put(frame: QueuedFrame) -> None:
        queue.append(frame)
        job.fail(RuntimeError("the backend failed"))  # from another thread, between two frames

    assert job.read(reader, put, opened=lambda n: None, max_age_s=60, retry_after_s=1) is False  # type: ignore[arg-type]
    assert len(queue) == 1 and reader.inst.closed == 1
