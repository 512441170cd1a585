"""numpy class-wise NMS (:mod:`retinaedge.runtime.boxes`), used to emulate TensorRT's EfficientNMS_TRT on the graph's own pre-NMS candidates.

The plugin cannot run without TensorRT; this emulation measures what its documented semantics
(threshold, sort, keep the best 4096, class-wise NMS, best K) change against torchvision.
"""

from __future__ import annotations

import numpy as np
from retinaedge.runtime.boxes import batched_nms
from retinaedge.runtime.detections import ImageDetections


def emulate_efficient_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    score_threshold: float,
    iou_threshold: float,
    max_output_boxes: int,
    max_candidates: int = 4096,
) -> ImageDetections:
    """One image's candidates ``(M, 4)``, ``(M,)``, ``(M,)`` -> the plugin's output per its README."""
    passing = np.flatnonzero(scores > score_threshold)
    passing = passing[np.argsort(-scores[passing], kind="stable")][:max_candidates]
    # IoU in float64, as this emulation has always measured it (the candidates are float32).
    kept = passing[
        batched_nms(boxes[passing].astype(np.float64), scores[passing], labels[passing], iou_threshold)
    ]
    if not kept.size:
        return ImageDetections.empty()
    kept = kept[:max_output_boxes]
    return ImageDetections.from_arrays(boxes[kept], scores[kept], labels[kept])
