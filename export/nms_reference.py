"""numpy NMS, used to emulate TensorRT's EfficientNMS_TRT on the graph's own pre-NMS candidates.

The plugin cannot run without TensorRT; this emulation measures what its documented semantics
(threshold, sort, keep the best 4096, class-wise NMS, best K) change against torchvision.
"""

from __future__ import annotations

import numpy as np
from retinaedge.runtime.detections import ImageDetections
from retinaedge.runtime.matching import iou_matrix


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS (IoU > threshold suppresses), in decreasing score."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(order), dtype=bool)
    ious = iou_matrix(boxes[order], boxes[order], identical_degenerate=False)
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(int(order[i]))
        suppressed |= ious[i] > iou_threshold
    return np.asarray(keep, dtype=np.int64)


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
    kept: list[np.ndarray] = []
    for label in np.unique(labels[passing]):
        idx = passing[labels[passing] == label]
        kept.append(idx[greedy_nms(boxes[idx], scores[idx], iou_threshold)])
    if not kept:
        return ImageDetections.empty()
    allk = np.concatenate(kept)
    allk = allk[np.argsort(-scores[allk], kind="stable")][:max_output_boxes]
    return ImageDetections.from_arrays(boxes[allk], scores[allk], labels[allk])
