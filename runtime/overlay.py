"""Overlay PNGs: a frame as the model saw it (after windowing), with boxes, labels and scores drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from retinaedge.runtime.detector import FrameResult

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
