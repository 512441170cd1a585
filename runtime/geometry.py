"""Letterbox geometry: frame pixels <-> model-input pixels, exactly invertible.

Coordinates are continuous pixel-edge coordinates (column x, row y): pixel (r, c) covers
[c, c+1) x [r, r+1). The frame is resized by ``scale_x``/``scale_y`` (equal up to rounding of the resized
size) and placed at the top-left of the model input; the rest is padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Letterbox:
    """Maps a ``frame_h x frame_w`` frame into a ``input_h x input_w`` model input."""

    frame_h: int
    frame_w: int
    input_h: int
    input_w: int
    resized_h: int
    resized_w: int

    @classmethod
    def fit(cls, frame_h: int, frame_w: int, input_h: int, input_w: int) -> Letterbox:
        scale = min(input_h / frame_h, input_w / frame_w)
        rh = min(input_h, max(1, round(frame_h * scale)))
        rw = min(input_w, max(1, round(frame_w * scale)))
        return cls(frame_h, frame_w, input_h, input_w, rh, rw)

    @property
    def scale_x(self) -> float:
        return self.resized_w / self.frame_w

    @property
    def scale_y(self) -> float:
        return self.resized_h / self.frame_h

    def to_frame(self, boxes: np.ndarray) -> np.ndarray:
        """Model-input boxes ``(D, 4)`` x1, y1, x2, y2 -> frame pixels, clipped to the frame."""
        out = boxes.astype(np.float64).copy()
        out[:, 0::2] = np.clip(out[:, 0::2] / self.scale_x, 0.0, self.frame_w)
        out[:, 1::2] = np.clip(out[:, 1::2] / self.scale_y, 0.0, self.frame_h)
        return out

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Frame boxes ``(D, 4)`` -> model-input pixels."""
        out = boxes.astype(np.float64).copy()
        out[:, 0::2] *= self.scale_x
        out[:, 1::2] *= self.scale_y
        return out

    def apply(self, image: np.ndarray, pad_value: float) -> np.ndarray:
        """``(C, frame_h, frame_w)`` float32 -> ``(C, input_h, input_w)`` float32 (OpenCV resize)."""
        import cv2

        if (self.resized_h, self.resized_w) == (self.frame_h, self.frame_w) == (self.input_h, self.input_w):
            return np.array(image, dtype=np.float32, order="C")  # nothing to resize nor pad: one copy
        shrinking = self.resized_w < self.frame_w or self.resized_h < self.frame_h
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        out = np.full((image.shape[0], self.input_h, self.input_w), pad_value, dtype=np.float32)
        for c in range(image.shape[0]):
            if (self.resized_h, self.resized_w) == (self.frame_h, self.frame_w):
                out[c, : self.frame_h, : self.frame_w] = image[c]
            else:
                out[c, : self.resized_h, : self.resized_w] = cv2.resize(
                    image[c], (self.resized_w, self.resized_h), interpolation=interp
                )
        return out
