"""Dynamic batching: which frames the inference thread runs together.

Frames from every request (``/v1/detect``, STOW-RS, DIMSE) wait in one queue. The inference thread takes
the first and gathers more, up to ``max_batch_size``, by these rules (after Triton's dynamic batcher,
with one difference: here the pipeline knows whether more frames are on their way):

- a frame already waiting is always taken;
- with nothing waiting, the batch runs now if its size is one of the preferred sizes, or if no instance
  is being read (no frame can come soon: waiting would only add latency);
- otherwise the batch waits for more until ``delay_s`` after its first frame was queued.

Other items in the queue (control messages: swap the backend, stop) end the gathering; the batch so far
runs first, then the control item is handled.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class Queued(Protocol):
    """A frame in the queue: ``queued`` is its ``time.monotonic()`` when it was put there."""

    queued: float


@dataclass(frozen=True)
class BatchPolicy:
    """``max_batch_size`` frames at most; ``delay_s`` the longest wait for more; ``preferred`` sizes that
    run at once when reached with nothing else waiting."""

    max_batch_size: int
    delay_s: float = 0.002
    preferred: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.delay_s < 0:
            raise ValueError(f"the batch delay must be >= 0, got {self.delay_s}")


def gather(
    q: queue.Queue[Any],
    first: Queued,
    policy: BatchPolicy,
    *,
    expecting: Callable[[], bool],
    is_frame: Callable[[Any], bool],
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[Any], Any | None]:
    """Gather a batch starting with ``first`` (already taken from ``q``) -> ``(frames, control)``.

    ``expecting()`` is True while some instance is still being read (more frames may come);
    ``is_frame(item)`` tells frames from control items. ``control`` is the control item that ended the
    gathering, or None.
    """
    batch: list[Any] = [first]
    deadline = first.queued + policy.delay_s
    while len(batch) < policy.max_batch_size:
        try:
            item = q.get_nowait()
        except queue.Empty:
            if len(batch) in policy.preferred or not expecting():
                break
            remaining = deadline - clock()
            if remaining <= 0:
                break
            try:
                item = q.get(timeout=remaining)
            except queue.Empty:
                break
        if not is_frame(item):
            return batch, item
        batch.append(item)
    return batch, None
