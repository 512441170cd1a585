"""A long multi-frame instance does not make a single-frame request wait for all of its frames: one
instance queues at most max_batch_size frames at a time, so the slice posted while the 27-frame instance is
in inference runs in the very next batch. Inference is held by a gate (not a slow CPU) until the slice's
frame waits in the queue."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import httpx
import pytest
from retinaedge.service.pipeline.stages import InferenceWorker
from support.clients import dicom_post
from support.paths import DEMO, EXAMPLES
from support.polling import poll
from support.servers import serve

MULTIFRAME = EXAMPLES / "study_01_multiframe" / "MF0001.dcm"  # 27 frames
SLICE = EXAMPLES / "study_01" / "IM0003.dcm"


def _long_then_slice(monkeypatch: pytest.MonkeyPatch, **settings: Any) -> tuple[list[list[int]], bool, Any]:
    """Post the 27-frame instance, hold its first batch until the slice's frame waits in the queue (60 s
    at most), post the slice meanwhile -> (frame count of each frame's instance per batch, whether the
    slice's frame was queued during the hold, the multi-frame's response)."""
    batches: list[list[int]] = []
    entered, held = threading.Event(), threading.Event()
    queued_during_hold: list[bool] = []
    real_infer = InferenceWorker._infer

    def infer(self: InferenceWorker, detector: Any, batch: list[Any]) -> None:
        if not held.is_set():  # the first batch (the multi-frame's) waits until the slice's frame waits
            held.set()
            entered.set()
            queued = poll(
                lambda: any(
                    f.job.info is not None and f.job.info.frames == 1 for f in list(self._frames.queue)
                ),
                timeout=60,
                interval=0.01,
            )
            queued_during_hold.append(queued)
        batches.append([f.job.info.frames for f in batch])
        real_infer(self, detector, batch)

    monkeypatch.setattr(InferenceWorker, "_infer", infer)
    with (
        serve(model=DEMO, **settings) as url,
        httpx.Client(timeout=300) as c,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        long = pool.submit(dicom_post, c, url, MULTIFRAME.read_bytes())
        assert entered.wait(60), "the multi-frame instance never reached inference"
        short = pool.submit(dicom_post, c, url, SLICE.read_bytes())
        assert short.result().status_code == 200 and long.result().status_code == 200
    return batches, queued_during_hold == [True], long.result()


def test_a_slice_is_not_queued_behind_a_whole_multiframe_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    batches, _, _ = _long_then_slice(monkeypatch, max_batch_size=4, max_frames_in_flight=32)
    first_with_slice = next(i for i, b in enumerate(batches) if 1 in b)
    assert all(set(b) == {27} for b in batches[:first_with_slice])
    # Batch 0 was held with the multi-frame's first frames; the slice runs in batch 1, not behind the
    # up to 31 frames the frame budget would have let that instance queue.
    assert first_with_slice == 1, batches
    assert sum(b.count(27) for b in batches) == 27


def test_a_long_instance_waiting_for_the_queue_holds_no_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """With one reader thread and one frame per instance in the queue, the 27-frame instance's reading
    waits (parked) each time its frame waits; the lone reader meanwhile reads the slice, which runs in the
    next batch. A reader blocked in the long instance would leave the slice unread until all 27 frames
    were queued."""
    batches, slice_queued_during_hold, long = _long_then_slice(
        monkeypatch, max_batch_size=1, prepare_threads=1
    )
    assert len(long.json()["frames"]) == 27
    assert slice_queued_during_hold, "the slice was not read while the long instance waited"
    assert batches[0] == [27] and batches[1] == [1], batches[:3]
    assert sum(b.count(27) for b in batches) == 27
