"""The one box module: IoU (pairwise, single, degenerate boxes, dtype) and greedy class-wise NMS."""

from __future__ import annotations

import numpy as np
import pytest
from retinaedge.runtime.boxes import batched_nms, box_areas, box_iou, nms, pairwise_iou


def test_pairwise_iou_shapes_values_and_dtype() -> None:
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]], dtype=np.float32)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]], dtype=np.float32)
    iou = pairwise_iou(a, b)
    assert iou.shape == (2, 3) and iou.dtype == np.float32
    assert iou[0].tolist() == pytest.approx([1 / 7, 1.0, 0.0])
    assert iou[1].tolist() == pytest.approx([0.0, 0.25, 0.0])
    assert pairwise_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3]])).dtype == np.float64
    assert pairwise_iou(np.zeros((0, 4)), b).shape == (0, 3)


def test_empty_boxes_have_iou_zero_unless_matched_within_tolerance() -> None:
    flat = np.array([[5.0, 0.0, 5.0, 9.0]])
    near = np.array([[5.004, 0.0, 5.004, 9.0]])
    assert pairwise_iou(flat, near)[0, 0] == 0.0
    assert pairwise_iou(flat, near, degenerate_tol=0.01)[0, 0] == 1.0
    assert box_areas(np.array([[3.0, 3.0, 1.0, 5.0]])).tolist() == [0.0]  # inverted side: area 0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert box_iou((10, 10, 40, 40), (23, 23, 27, 27)) == pytest.approx(16 / 900)


def test_nms_is_greedy_by_score_and_classwise() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float32)
    scores = np.array([0.6, 0.9, 0.8, 0.5], dtype=np.float32)
    # 1 keeps; 0 (IoU 9/11 with 1) and 2 (same box as 0) suppressed; 3 far away.
    assert nms(boxes, scores, 0.5).tolist() == [1, 3]
    assert nms(boxes, scores, 0.95).tolist() == [1, 2, 3]  # 0 == 2: IoU 1 > 0.95
    labels = np.array([0, 1, 0, 1])
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [1, 2, 3]
    assert batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), 0.5).tolist() == []
