"""Latency statistics: percentiles (numpy's linear interpolation) and ratios with goals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: The percentiles every latency summary reports.
PERCENTILES: tuple[int, ...] = (50, 90, 95, 99)


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples``, linear interpolation between order statistics."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    return float(np.percentile(a, q))


def summarize(samples: Sequence[float], digits: int = 3) -> dict[str, float | int]:
    """``{p50, p90, p95, p99, mean, min, max, n}`` of ``samples`` (same unit as the samples, usually ms)."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no samples")
    out: dict[str, float | int] = {f"p{q}": round(float(np.percentile(a, q)), digits) for q in PERCENTILES}
    out.update(
        mean=round(float(a.mean()), digits),
        min=round(float(a.min()), digits),
        max=round(float(a.max()), digits),
        n=int(a.size),
    )
    return out


def per_frame_samples(per_instance_ms: Sequence[float], frames: Sequence[int]) -> list[float]:
    """Per-frame samples from per-instance stage times: an instance of ``f`` frames that took ``t`` ms
    contributes ``f`` samples of ``t / f`` ms (the detector times stages per instance, not per frame)."""
    if len(per_instance_ms) != len(frames):
        raise ValueError(f"{len(per_instance_ms)} instance times but {len(frames)} frame counts")
    out: list[float] = []
    for t, f in zip(per_instance_ms, frames, strict=True):
        if f < 1:
            raise ValueError(f"an instance has {f} frames")
        out.extend([t / f] * f)
    return out


def ratio(
    value: float | None,
    *,
    goal: float,
    higher_is_better: bool,
    definition: str,
    reason: str | None = None,
) -> dict[str, Any]:
    """A headline ratio with its goal: ``{value, goal, met, definition}`` (``met`` None without a value).

    ``goal`` reads ``">= 2.0"`` when higher is better and ``"<= 0.1"`` otherwise.
    """
    if value is not None and not math.isfinite(value):
        value = None
    met: bool | None = None
    if value is not None:
        met = value >= goal if higher_is_better else value <= goal
    out: dict[str, Any] = {
        "value": None if value is None else round(value, 4),
        "goal": f"{'>=' if higher_is_better else '<='} {goal:g}",
        "met": met,
        "definition": definition,
    }
    if reason is not None:
        out["reason"] = reason
    return out


def safe_div(num: float | None, den: float | None) -> float | None:
    """``num / den``, or None when either is missing or ``den`` is not positive."""
    if num is None or den is None or den <= 0:
        return None
    return num / den
