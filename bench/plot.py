"""The latency plot (PNG) drawn with OpenCV, which the runtime already depends on.

One row per measured series (pipeline stages, runtimes, post-processing, HTTP): a bar from the left edge to
the p50, a whisker from p50 to p99 with ticks at p90 and p95, on a log10 axis in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX
_BAR = (200, 140, 60)  # BGR
_WHISKER = (40, 40, 40)
_GRID = (220, 220, 220)
_TEXT = (20, 20, 20)


def _ticks(lo: float, hi: float) -> list[float]:
    """Decade ticks (1, 2, 5 per decade) from ``lo`` to ``hi`` milliseconds."""
    out = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if lo <= v <= hi:
                out.append(v)
    return out


def draw_latency_plot(rows: Sequence[tuple[str, dict[str, float]]], title: str, path: Path) -> Path:
    """Write the plot of ``rows`` (``(label, summary with p50/p90/p95/p99 in ms)``) to ``path`` (PNG)."""
    import cv2

    rows = [(label, s) for label, s in rows if s and s.get("p50") is not None]
    if not rows:
        raise ValueError("nothing to plot")
    left, right, top, row_h = 330, 40, 70, 34
    width = 1100
    height = top + row_h * len(rows) + 60
    img = np.full((height, width, 3), 255, np.uint8)
    values = [max(s[k], 1e-3) for _, s in rows for k in ("p50", "p99")]
    lo = 10 ** math.floor(math.log10(min(values)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    span = math.log10(hi) - math.log10(lo)

    def x_of(ms: float) -> int:
        return int(left + (width - left - right) * (math.log10(max(ms, lo)) - math.log10(lo)) / span)

    cv2.putText(img, title, (20, 32), _FONT, 0.7, _TEXT, 2, cv2.LINE_AA)
    axis_y = top + row_h * len(rows) + 5
    for v in _ticks(lo, hi):
        x = x_of(v)
        cv2.line(img, (x, top - 8), (x, axis_y), _GRID, 1)
        cv2.putText(img, f"{v:g}", (x - 10, axis_y + 20), _FONT, 0.45, _TEXT, 1, cv2.LINE_AA)
    cv2.putText(
        img,
        "ms (log scale); bar: p50, whisker: p50-p99, ticks: p90, p95",
        (left, axis_y + 45),
        _FONT,
        0.45,
        _TEXT,
        1,
        cv2.LINE_AA,
    )
    for i, (label, s) in enumerate(rows):
        y = top + i * row_h
        cv2.putText(img, label[:38], (20, y + 18), _FONT, 0.5, _TEXT, 1, cv2.LINE_AA)
        cv2.rectangle(img, (left, y + 4), (x_of(s["p50"]), y + row_h - 8), _BAR, -1)
        mid = y + (row_h - 4) // 2
        cv2.line(img, (x_of(s["p50"]), mid), (x_of(s["p99"]), mid), _WHISKER, 2)
        for k in ("p90", "p95", "p99"):
            x = x_of(s[k])
            cv2.line(img, (x, mid - 6), (x, mid + 6), _WHISKER, 2)
        cv2.putText(img, f"{s['p50']:.3g}", (x_of(s["p99"]) + 8, mid + 5), _FONT, 0.42, _TEXT, 1, cv2.LINE_AA)
    path = Path(path)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")
    return path
