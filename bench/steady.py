"""A load level that runs until its throughput holds still (the way Triton's perf_analyzer measures).

``clients`` threads post ``POST /v1/detect`` on a keep-alive connection each, back to back (closed loop)
or at a fixed aggregate rate (``rate_per_s``: request ``k`` is sent at ``start + k / rate``, by whichever
client is free; its latency counts from that scheduled time, so a late send is not hidden). The main
thread cuts the run into windows of ``window_requests`` completed requests and, at each window's end,
calls ``probe()`` (the service's per-thread CPU and the accelerator's counters). The level ends when the
last ``stable_windows`` windows' frames/s agree within ``tolerance`` of their mean, and they hold at least
``min_requests`` requests; or after ``max_seconds`` (then ``stable`` is False). Its figures come from
those last windows only. Times are seconds unless named ``_ms``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from retinaedge.bench.http_phase import Client
from retinaedge.runtime.errors import BenchmarkError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Done:
    """One completed request: when it ended (``perf_counter`` s), its latency (ms), its frames, which body."""

    end: float
    latency_ms: float
    frames: int
    body: int
    answer: dict[str, Any]


@dataclass
class Window:
    """One measurement window: its span and what completed in it, with the probe at its end."""

    start: float
    end: float
    done: list[Done] = field(default_factory=list)
    probe: dict[str, Any] = field(default_factory=dict)

    @property
    def frames_per_s(self) -> float:
        return sum(d.frames for d in self.done) / max(self.end - self.start, 1e-9)


@dataclass
class Level:
    """A finished level: the windows it ran, the stable ones at the end, and how it ended."""

    windows: list[Window]
    measured: list[Window]
    stable: bool
    stopped_by: str
    start_probe: dict[str, Any]

    @property
    def done(self) -> list[Done]:
        return [d for w in self.measured for d in w.done]

    @property
    def seconds(self) -> float:
        return self.measured[-1].end - self.measured[0].start

    @property
    def before(self) -> dict[str, Any]:
        """The probe at the start of the measured windows."""
        i = self.windows.index(self.measured[0])
        return self.windows[i - 1].probe if i > 0 else self.start_probe


def spread(values: Sequence[float]) -> float:
    """(max - min) / mean of ``values`` (0 for one value)."""
    mean = sum(values) / len(values)
    return (max(values) - min(values)) / mean if mean > 0 else math.inf


def agree(values: Sequence[float], tolerance: float) -> bool:
    """Every value within ``tolerance`` (a fraction) of their mean."""
    mean = sum(values) / len(values)
    return mean > 0 and all(abs(v - mean) <= tolerance * mean for v in values)


def run_level(
    port: int,
    bodies: Sequence[tuple[bytes, int]],
    clients: int,
    *,
    rate_per_s: float | None = None,
    min_requests: int = 200,
    stable_windows: int = 3,
    tolerance: float = 0.10,
    max_seconds: float = 60.0,
    probe: Callable[[], dict[str, Any]] = dict,
) -> Level:
    """Run one level (see the module docstring); raises :class:`BenchmarkError` when a client fails."""
    window_requests = max(1, math.ceil(min_requests / stable_windows))
    results: list[Done] = []
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []
    state = {"next": 0}
    ready = threading.Barrier(clients + 1)
    t_start = 0.0

    def work(i: int) -> None:
        client = Client(port)
        try:
            client.detect(bodies[i % len(bodies)][0])  # connect, untimed
            ready.wait(timeout=300)
            ready.wait(timeout=300)  # t_start is set
            while not stop.is_set():
                with lock:
                    k = state["next"]
                    state["next"] += 1
                j = k % len(bodies)
                data, frames = bodies[j]
                scheduled = None
                if rate_per_s is not None:
                    scheduled = t_start + k / rate_per_s
                    delay = scheduled - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                elapsed, answer = client.detect(data)
                end = time.perf_counter()
                latency = (end - scheduled) * 1e3 if scheduled is not None else elapsed
                with lock:
                    results.append(Done(end, latency, frames, j, answer))
        except Exception as exc:  # reported after join
            errors.append(f"{type(exc).__name__}: {exc}")
            stop.set()
            ready.abort()
        finally:
            client.close()

    threads = [
        threading.Thread(target=work, args=(i,), name=f"load-{i}", daemon=True) for i in range(clients)
    ]
    for t in threads:
        t.start()
    try:
        ready.wait(timeout=300)
    except threading.BrokenBarrierError:
        pass
    start_probe = probe()
    t_start = time.perf_counter()
    try:
        ready.wait(timeout=300)
    except threading.BrokenBarrierError:
        pass
    windows: list[Window] = []
    seen = 0
    stopped_by, stable = "time", False
    w_start = t_start
    while not stop.is_set():
        time.sleep(0.005)
        with lock:
            n = len(results)
        now = time.perf_counter()
        if n - seen >= window_requests or now - t_start > max_seconds:
            with lock:
                batch = results[seen:]
                seen = len(results)
            window = Window(w_start, now, batch, probe())
            windows.append(window)
            w_start = now
            last = windows[-stable_windows:]
            if len(last) == stable_windows and agree([w.frames_per_s for w in last], tolerance):
                if sum(len(w.done) for w in last) >= min_requests:
                    stopped_by, stable = "stable", True
                    break
            if now - t_start > max_seconds:
                break
    stop.set()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise BenchmarkError(f"{clients} client(s) failed: {errors[:3]}")
    if not windows:
        raise BenchmarkError("the level completed no window")
    measured = windows[-stable_windows:]
    if not any(w.done for w in measured):
        raise BenchmarkError(f"no request completed in the last {len(measured)} window(s) of the level")
    log.info(
        "level %d client(s)%s: %s after %d window(s), %.1f frames/s",
        clients,
        f" at {rate_per_s:.0f}/s" if rate_per_s else "",
        stopped_by,
        len(windows),
        sum(w.frames_per_s for w in measured) / len(measured),
    )
    return Level(windows, measured, stable, stopped_by, start_probe)


def as_row(level: Level, clients: int, min_requests: int, max_seconds: float) -> dict[str, Any]:
    """A level as a row of ``throughput.by_clients`` (its measured windows only): the keys the HTTP phase
    has always reported, plus ``window_frames_per_s``, ``spread`` and ``stable``."""
    done = level.done
    seconds = level.seconds
    frames = sum(d.frames for d in done)
    fps = [w.frames_per_s for w in level.measured]
    return {
        "clients": clients,
        "requests": len(done),
        "frames": frames,
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(done) / seconds, 3),
        "frames_per_s": round(frames / seconds, 3),
        "latency_ms": [d.latency_ms for d in done],
        "single_frame_latency_ms": [d.latency_ms for d in done if d.frames == 1],
        "target_requests": min_requests,
        "max_seconds": max_seconds,
        "stopped_by": level.stopped_by,
        "stable": level.stable,
        "windows": len(level.windows),
        "window_frames_per_s": [round(x, 2) for x in fps],
        "spread": round(spread(fps), 4),
    }
