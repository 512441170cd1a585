"""Detections of one image, and conversion from the padded ONNX outputs.

ONNX contract (docs/architecture.md): ``num_detections`` int32 ``[N]``, ``boxes`` float32 ``[N, K, 4]``
(x1, y1, x2, y2 in model-input pixels), ``scores`` float32 ``[N, K]``, ``labels`` int32 ``[N, K]``;
rows past ``num_detections`` are padding.

A backend may add ``rechecked`` bool ``[N]`` (:data:`RECHECKED_OUTPUT`): the images whose detections were
computed again at FP32 by a reduced-precision backend's re-check (``backends/openvino/recheck.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

OUTPUT_NAMES = ("num_detections", "boxes", "scores", "labels")
#: Optional backend output, bool ``[N]``: the images re-run at FP32 (their detections are FP32's).
RECHECKED_OUTPUT = "rechecked"


@dataclass(frozen=True)
class ImageDetections:
    """``boxes`` float32 ``(D, 4)`` x1, y1, x2, y2; ``scores`` float32 ``(D,)``; ``labels`` int64 ``(D,)``.

    Sorted by decreasing score, as torchvision returns them. ``rechecked``: computed again at FP32 by a
    reduced-precision backend's re-check (the frame's result then says ``"precision": "fp32"``).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    rechecked: bool = False

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls) -> ImageDetections:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64))

    @classmethod
    def from_arrays(cls, boxes: Any, scores: Any, labels: Any) -> ImageDetections:
        return cls(
            np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(scores, dtype=np.float32).reshape(-1),
            np.asarray(labels, dtype=np.int64).reshape(-1),
        )

    def to_json(self) -> dict[str, list[Any]]:
        return {
            "boxes": self.boxes.astype(float).tolist(),
            "scores": self.scores.astype(float).tolist(),
            "labels": self.labels.astype(int).tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, list[Any]]) -> ImageDetections:
        return cls.from_arrays(data["boxes"], data["scores"], data["labels"])


def split_outputs(outputs: dict[str, np.ndarray]) -> list[ImageDetections]:
    """Padded batch outputs (dict keyed by :data:`OUTPUT_NAMES`) -> one :class:`ImageDetections` per image."""
    num = np.asarray(outputs["num_detections"]).reshape(-1)
    again = outputs.get(RECHECKED_OUTPUT)
    rechecked = np.zeros(num.shape[0], bool) if again is None else np.asarray(again, bool).reshape(-1)
    result = []
    for i, n in enumerate(num.astype(int)):
        dets = ImageDetections.from_arrays(
            outputs["boxes"][i, :n], outputs["scores"][i, :n], outputs["labels"][i, :n]
        )
        result.append(dataclasses.replace(dets, rechecked=True) if rechecked[i] else dets)
    return result
