"""Run ``tegrastats`` in the background and turn its power rails into energy.

:class:`TegrastatsSampler` starts ``tegrastats --interval MS``, parses every line in a reader thread and
stamps it with ``time.monotonic()`` when it arrives. :func:`summarize` integrates each rail's current
power over those timestamps with the trapezoidal rule::

    E = sum_i (P_i + P_{i+1}) / 2 * (t_{i+1} - t_i)        [mW * s / 1000 = J]

between the first and the last line received after ``start()`` (no extrapolation to the edges: for a
measurement window, run the workload between two lines, i.e. start a little early, stop a little late).
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from retinaedge.device.tegrastats import TegrastatsSample, parse_tegrastats_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RailEnergy:
    """One rail over the window: energy in J, time-weighted mean and peak power in W."""

    energy_j: float
    mean_w: float
    peak_w: float


@dataclass(frozen=True)
class PowerSummary:
    """What a sampler measured between ``start()`` and ``stop()``.

    ``duration_s`` is the span between the first and the last sample (s). ``throttling_seen`` is None
    because no known tegrastats format reports throttling (see :mod:`retinaedge.device.tegrastats`).
    """

    samples: int
    duration_s: float
    rails: dict[str, RailEnergy]
    peak_temperatures_c: dict[str, float]
    peak_gpu_load_pct: int | None
    throttling_seen: bool | None = None


def summarize(samples: Sequence[tuple[float, TegrastatsSample]]) -> PowerSummary:
    """Integrate ``(monotonic time in s, sample)`` pairs into per-rail energy (trapezoidal rule).

    A rail missing from some lines is integrated over the intervals whose two ends both report it. With
    a single sample the energy is 0 and the mean is that sample's power.
    """
    ordered = sorted(samples, key=lambda pair: pair[0])
    if not ordered:
        return PowerSummary(
            samples=0, duration_s=0.0, rails={}, peak_temperatures_c={}, peak_gpu_load_pct=None
        )
    duration = ordered[-1][0] - ordered[0][0] if len(ordered) > 1 else 0.0
    energy_mj: dict[str, float] = {}
    covered_s: dict[str, float] = {}
    peak_mw: dict[str, float] = {}
    first_mw: dict[str, float] = {}
    for _, sample in ordered:
        for name, rail in sample.rails.items():
            peak_mw[name] = max(peak_mw.get(name, rail.current_mw), rail.current_mw)
            first_mw.setdefault(name, rail.current_mw)
    for (t0, s0), (t1, s1) in zip(ordered[:-1], ordered[1:], strict=True):
        dt = t1 - t0
        for name, rail in s1.rails.items():
            before = s0.rails.get(name)
            if before is None:
                continue
            energy_mj[name] = energy_mj.get(name, 0.0) + (before.current_mw + rail.current_mw) / 2 * dt
            covered_s[name] = covered_s.get(name, 0.0) + dt
    rails: dict[str, RailEnergy] = {}
    for name in peak_mw:
        joules = energy_mj.get(name, 0.0) / 1000
        span = covered_s.get(name, 0.0)
        mean_w = joules / span if span > 0 else first_mw[name] / 1000
        rails[name] = RailEnergy(energy_j=joules, mean_w=mean_w, peak_w=peak_mw[name] / 1000)
    temps: dict[str, float] = {}
    loads: list[int] = []
    for _, sample in ordered:
        for sensor, celsius in sample.temperatures_c.items():
            temps[sensor] = max(temps.get(sensor, celsius), celsius)
        if sample.gpu_load_pct is not None:
            loads.append(sample.gpu_load_pct)
    return PowerSummary(
        samples=len(ordered),
        duration_s=duration,
        rails=rails,
        peak_temperatures_c=temps,
        peak_gpu_load_pct=max(loads) if loads else None,
    )


class TegrastatsSampler:
    """Sample ``tegrastats`` between :meth:`start` and :meth:`stop`; also a context manager.

    ``command`` is the executable and any leading arguments (``["tegrastats"]`` by default, ``["sudo",
    "-n", "tegrastats"]`` to read the rails that need root); ``--interval MS`` is appended.
    """

    def __init__(self, interval_ms: int = 100, command: Sequence[str] = ("tegrastats",)) -> None:
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be positive, got {interval_ms}")
        self.interval_ms = interval_ms
        self.command = list(command)
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._samples: list[tuple[float, TegrastatsSample]] = []
        self._summary: PowerSummary | None = None

    @property
    def samples(self) -> list[tuple[float, TegrastatsSample]]:
        """A copy of the ``(monotonic arrival time in s, sample)`` pairs received so far."""
        with self._lock:
            return list(self._samples)

    @property
    def summary(self) -> PowerSummary | None:
        """The result of :meth:`stop` (None while running)."""
        return self._summary

    def start(self) -> TegrastatsSampler:
        """Start the subprocess and the reader thread (raises OSError if the command cannot start)."""
        if self._proc is not None:
            raise RuntimeError("sampler already started")
        argv = [*self.command, "--interval", str(self.interval_ms)]
        log.debug("starting %s", argv)
        self._proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1
        )
        self._thread = threading.Thread(target=self._read, name="tegrastats-reader", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        for line in proc.stdout:
            arrived = time.monotonic()
            sample = parse_tegrastats_line(line)
            if sample is None:
                continue
            with self._lock:
                self._samples.append((arrived, sample))

    def stop(self, timeout_s: float = 2.0) -> PowerSummary:
        """Terminate the subprocess (kill after ``timeout_s`` seconds), join the reader, summarize."""
        if self._summary is not None:
            return self._summary
        proc = self._proc
        if proc is None:
            raise RuntimeError("sampler was not started")
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tegrastats did not exit within %.1f s; killing it", timeout_s)
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        if proc.stdout is not None:
            proc.stdout.close()
        samples = self.samples
        if not samples:
            log.warning("tegrastats produced no parsable line")
        self._summary = summarize(samples)
        return self._summary

    def __enter__(self) -> TegrastatsSampler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
