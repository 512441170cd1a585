"""Overlay PNGs: a frame as the model saw it (after windowing), with boxes, labels and scores drawn.

:func:`render` and :func:`write_png` draw the command line's ``detect --overlay`` PNGs (BGR, every
detection). :func:`burn_in` draws the service's secondary captures and overlay PNGs (RGB, the findings it
is given, and a notice), in exactly known places so that tests can check every pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.runtime.instance_result import Detection, FrameResult

# Distinct BGR colours per class id (cycled).
_PALETTE = [(0, 200, 255), (255, 120, 0), (80, 220, 80), (230, 60, 230), (0, 90, 255), (255, 255, 0)]


def render(unit_chw: np.ndarray, frame: FrameResult) -> np.ndarray:
    """``(C, h, w)`` float 0..1 and the frame's detections -> ``(h, w, 3)`` uint8 BGR image."""
    import cv2

    img = np.clip(np.rint(unit_chw * 255.0), 0, 255).astype(np.uint8)
    bgr = (
        cv2.cvtColor(img[0], cv2.COLOR_GRAY2BGR)
        if img.shape[0] == 1
        else np.ascontiguousarray(img.transpose(1, 2, 0)[..., ::-1])
    )
    h, w = bgr.shape[:2]
    thickness = max(1, round(min(h, w) / 300))
    scale = max(0.35, min(h, w) / 900)
    for det in sorted(frame.detections, key=lambda d: d.score):
        colour = _PALETTE[det.class_id % len(_PALETTE)]
        x1, y1, x2, y2 = (int(round(v)) for v in det.box)
        cv2.rectangle(bgr, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), colour, thickness)
        text = f"{det.label} {det.score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - 3 if y1 - th - 3 >= 0 else min(h - 1, y2 + th + 3)
        cv2.rectangle(bgr, (x1, ty - th - base), (x1 + tw, ty + base // 2), colour, -1)
        cv2.putText(
            bgr, text, (x1, ty - base // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA
        )
    return bgr


def write_png(path: Path, unit_chw: np.ndarray, frame: FrameResult) -> None:
    """Render and write one overlay PNG (parent directories created)."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), render(unit_chw, frame)):
        raise OSError(f"could not write {path}")


# -- burned-in annotations (the service's secondary captures and overlay PNGs) ------------------------------

#: The colours of :func:`burn_in`, RGB per class id (cycled): :data:`_PALETTE` in RGB order. None is grey
#: (no two of R, G, B are all equal), so an annotated pixel never looks like one of the image's.
COLOURS = [(r, g, b) for b, g, r in _PALETTE]
#: Black text on the coloured labels; white on the black notice.
_INK, _NOTICE_INK, _NOTICE_BACK = (0, 0, 0), (255, 255, 255), (0, 0, 0)
_PAD = 2  # pixels between a label's text and its rectangle's edge


@dataclass(frozen=True)
class BurnedIn:
    """A frame with its boxes, labels and notice burned in: ``image`` (h, w, 3) uint8 RGB; ``labels`` the
    rectangle of each label and ``notice`` the notice's, as (x0, y0, x1, y1) pixel bounds (x1, y1
    exclusive), clipped to the image. Every pixel outside the boxes' outlines and these rectangles is the
    frame's own (:func:`to_rgb8`)."""

    image: np.ndarray
    labels: list[tuple[int, int, int, int]]
    notice: tuple[int, int, int, int]


def to_rgb8(unit_chw: np.ndarray) -> np.ndarray:
    """``(C, h, w)`` float in 0..1 (C 1 or 3) -> ``(h, w, 3)`` uint8 RGB, each value ``rint(v * 255)``
    (grey repeated in the three channels)."""
    img = np.clip(np.rint(unit_chw * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(
        np.repeat(img, 3, axis=0).transpose(1, 2, 0) if img.shape[0] == 1 else img.transpose(1, 2, 0)
    )


def box_edges(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """A box's edges (x1, y1, x2, y2 in pixels, PS3.3 C.18.6.1.1: (0, 0) the top-left corner of the
    top-left pixel) -> the pixel bounds its outline is drawn on: columns ``x1..x2-1`` and rows
    ``y1..y2-1`` after rounding, clipped to the image, at least one pixel wide and high."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
    return x1, y1, min(max(x2, x1 + 1), width), min(max(y2, y1 + 1), height)


def outline_width(height: int, width: int) -> int:
    """The outline's width in pixels: 1 up to 449 pixels on the short side, 1 more per 300 beyond."""
    return max(1, round(min(height, width) / 300))


def _text_size(text: str, scale: float) -> tuple[int, int, int]:
    """(width, height above the baseline, depth below it) of ``text`` in pixels."""
    import cv2

    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    return tw, th, base


def _label(
    img: np.ndarray, text: str, at: tuple[int, int], scale: float, back: Any, ink: Any
) -> tuple[int, int, int, int]:
    """Fill a rectangle with ``back`` at ``at`` (x0, y0; moved to fit the image) and write ``text`` in it;
    the rectangle's bounds."""
    import cv2

    h, w = img.shape[:2]
    tw, th, base = _text_size(text, scale)
    rw, rh = min(tw + 2 * _PAD, w), min(th + base + 2 * _PAD, h)
    x0, y0 = min(max(at[0], 0), w - rw), min(max(at[1], 0), h - rh)
    img[y0 : y0 + rh, x0 : x0 + rw] = back
    region = img[y0 : y0 + rh, x0 : x0 + rw]  # a view: text drawn outside the rectangle is cut off
    cv2.putText(region, text, (_PAD, _PAD + th), cv2.FONT_HERSHEY_SIMPLEX, scale, ink, 1, cv2.LINE_AA)
    return x0, y0, x0 + rw, y0 + rh


def burn_in(unit_chw: np.ndarray, detections: Sequence[Detection], notice: str) -> BurnedIn:
    """Draw ``detections`` and ``notice`` into the frame ``unit_chw`` ((C, h, w) float 0..1, as the model
    saw it) -> :class:`BurnedIn`.

    Each box is an outline of :func:`outline_width` pixels on the inside of its :func:`box_edges`, in its
    class's colour (:data:`COLOURS`), the lowest score first so the highest is on top; then each label
    (``"<class> <score to 2 decimals>"``, black on the box's colour) just above its box, or below it
    when there is no room above, or inside its top edge; then ``notice`` in white on black in the
    bottom-left corner, its font shrunk to fit the width."""
    img = to_rgb8(unit_chw)
    h, w = img.shape[:2]
    t = outline_width(h, w)
    scale = max(0.35, min(h, w) / 900)
    ordered = sorted(detections, key=lambda d: d.score)
    for det in ordered:
        colour = COLOURS[det.class_id % len(COLOURS)]
        x1, y1, x2, y2 = box_edges(det.box, h, w)
        img[y1 : min(y1 + t, y2), x1:x2] = colour
        img[max(y2 - t, y1) : y2, x1:x2] = colour
        img[y1:y2, x1 : min(x1 + t, x2)] = colour
        img[y1:y2, max(x2 - t, x1) : x2] = colour
    labels = []
    for det in ordered:
        colour = COLOURS[det.class_id % len(COLOURS)]
        x1, y1, x2, y2 = box_edges(det.box, h, w)
        text = f"{det.label} {det.score:.2f}"
        _tw, th, base = _text_size(text, scale)
        rh = th + base + 2 * _PAD
        y0 = y1 - rh if y1 - rh >= 0 else (y2 if y2 + rh <= h else y1)
        labels.append(_label(img, text, (x1, y0), scale, colour, _INK))
    size = scale
    while size > 0.25 and _text_size(notice, size)[0] + 2 * _PAD > w:
        size -= 0.05
    _tw, th, base = _text_size(notice, size)
    placed = _label(img, notice, (0, h - (th + base + 2 * _PAD)), size, _NOTICE_BACK, _NOTICE_INK)
    return BurnedIn(img, labels, placed)


def png_bytes(rgb: np.ndarray) -> bytes:
    """``(h, w, 3)`` uint8 RGB -> a PNG file's bytes (lossless: decoding it gives ``rgb`` back)."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError("the PNG could not be encoded")
    return bytes(buf.tobytes())
