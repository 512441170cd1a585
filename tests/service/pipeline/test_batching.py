"""The dynamic batching rules (service/pipeline/batching.py), each with a queue and a clock built to produce it: no
test depends on how fast this machine is."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import pytest
from retinaedge.service.pipeline.batching import BatchPolicy, gather


@dataclass
class Frame:
    name: str
    queued: float = 0.0


STOP = object()


def _queue(*items: object) -> queue.Queue[object]:
    q: queue.Queue[object] = queue.Queue()
    for item in items:
        q.put(item)
    return q


def _gather(q: queue.Queue[object], policy: BatchPolicy, *, expecting: bool, now: float = 0.0) -> tuple:
    return gather(
        q,
        q.get_nowait(),  # type: ignore[arg-type]
        policy,
        expecting=lambda: expecting,
        is_frame=lambda x: isinstance(x, Frame),
        clock=lambda: now,
    )


def test_waiting_frames_are_taken_up_to_the_maximum() -> None:
    q = _queue(*(Frame(str(i)) for i in range(6)))
    batch, control = _gather(q, BatchPolicy(max_batch_size=4, delay_s=3600), expecting=True)
    assert [f.name for f in batch] == ["0", "1", "2", "3"] and control is None
    assert q.qsize() == 2


def test_with_nothing_on_its_way_a_batch_runs_at_once() -> None:
    """No instance is being read: waiting (here up to an hour) would only add latency."""
    batch, _ = _gather(_queue(Frame("a")), BatchPolicy(max_batch_size=4, delay_s=3600), expecting=False)
    assert [f.name for f in batch] == ["a"]


def test_a_preferred_size_runs_at_once_even_while_frames_are_on_their_way() -> None:
    q = _queue(Frame("a"), Frame("b"))
    batch, _ = _gather(q, BatchPolicy(max_batch_size=8, delay_s=3600, preferred=(2, 4)), expecting=True)
    assert [f.name for f in batch] == ["a", "b"]


def test_past_the_delay_the_batch_runs_with_what_it_has() -> None:
    """The first frame was queued at t=0 with a 2 ms delay; the clock says 5 ms."""
    q = _queue(Frame("a", queued=0.0))
    batch, _ = _gather(q, BatchPolicy(max_batch_size=4, delay_s=0.002), expecting=True, now=0.005)
    assert [f.name for f in batch] == ["a"]


def test_within_the_delay_a_frame_that_arrives_joins_the_batch() -> None:
    """Another thread puts a frame while the batch waits (the delay is an hour: only its arrival ends it
    before the maximum is reached)."""
    q = _queue(Frame("a"))
    first = q.get_nowait()
    waiting = threading.Event()

    class Clock:
        def __call__(self) -> float:
            waiting.set()
            return 0.0

    def late() -> None:
        assert waiting.wait(30)
        q.put(Frame("b"))
        q.put(Frame("c"))

    t = threading.Thread(target=late)
    t.start()
    batch, _ = gather(
        q,
        first,  # type: ignore[arg-type]
        BatchPolicy(max_batch_size=3, delay_s=3600),
        expecting=lambda: True,
        is_frame=lambda x: isinstance(x, Frame),
        clock=Clock(),
    )
    t.join(30)
    assert [f.name for f in batch] == ["a", "b", "c"]


def test_a_control_item_ends_the_batch_and_is_handed_back() -> None:
    q = _queue(Frame("a"), Frame("b"), STOP, Frame("c"))
    batch, control = _gather(q, BatchPolicy(max_batch_size=8, delay_s=3600), expecting=True)
    assert [f.name for f in batch] == ["a", "b"] and control is STOP
    assert q.qsize() == 1  # the frame after the control item waits for the next batch


@pytest.mark.parametrize("size,delay", [(0, 0.001), (4, -1.0)])
def test_invalid_policies_are_refused(size: int, delay: float) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_batch_size=size, delay_s=delay)
