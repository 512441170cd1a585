"""Axis-aligned boxes in numpy: area, IoU and greedy (class-wise) NMS. The one implementation of each.

Boxes are ``(x1, y1, x2, y2)`` in pixels (any unit works; IoU has none), as arrays ``(N, 4)``. IoU of two
boxes is ``intersection / union``; where the union is not positive (both boxes empty) it is 0 (or, for
matching two detectors' outputs, 1 for two empty boxes at the same place: :func:`pairwise_iou`'s
``degenerate_tol``). A box with ``x2 < x1`` or ``y2 < y1`` has area 0.

IoU is computed in the boxes' floating dtype (float32 boxes: float32 arithmetic, as torchvision's CPU
``nms``; integer boxes: float64), so that what mirrors torchvision stays bit-exact and what wants float64
casts first. NMS is greedy in decreasing score (ties in input order): a kept box suppresses every later
box whose IoU with it is *greater* than the threshold.

Used by detection matching (:mod:`.matching`), series linking (:mod:`.findings`), the EfficientNMS
emulation (``export/nms_reference.py``), the benchmark's Python post-processing baseline
(``bench/pypost.py``) and the development tools.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _float(boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """``boxes`` as a floating ``(N, 4)`` array (floating dtypes kept, anything else float64)."""
    arr = np.asarray(boxes)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    return arr.reshape(-1, 4)


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """Areas ``(N,)`` of boxes ``(N, 4)``, in the boxes' unit squared; inverted sides count as 0."""
    b = _float(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def pairwise_iou(
    a: np.ndarray | Sequence[Sequence[float]],
    b: np.ndarray | Sequence[Sequence[float]],
    *,
    degenerate_tol: float | None = None,
) -> np.ndarray:
    """IoU of every box in ``a`` ``(A, 4)`` with every box in ``b`` ``(B, 4)`` -> ``(A, B)``.

    The result has the boxes' common floating dtype. Where the union is not positive the IoU is 0,
    except with ``degenerate_tol`` (pixels): two such boxes whose corners all agree within it count as
    IoU 1 (a box clipped flat against the image border has a position but no area).
    """
    a, b = _float(a), _float(b)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_areas(a)[:, None] + box_areas(b)[None, :] - inter
    if degenerate_tol is None:
        fill = np.zeros_like(union)
    else:
        fill = np.all(np.abs(a[:, None, :] - b[None, :, :]) <= degenerate_tol, axis=-1).astype(union.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, fill)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two single boxes ``(x1, y1, x2, y2)`` (0 when either is empty), in float64."""
    return float(pairwise_iou(np.asarray([a], dtype=np.float64), np.asarray([b], dtype=np.float64))[0, 0])


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS of one class: boxes ``(N, 4)``, scores ``(N,)`` -> indices kept ``(K,)`` int64, in
    decreasing score; IoU > ``iou_threshold`` suppresses (computed in the boxes' dtype)."""
    b = _float(boxes)
    order = np.argsort(-scores, kind="stable")
    areas = box_areas(b)
    keep: list[int] = []
    with np.errstate(invalid="ignore", divide="ignore"):
        while order.size:
            i = int(order[0])
            keep.append(i)
            rest = order[1:]
            w = np.clip(np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]), 0, None)
            h = np.clip(np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]), 0, None)
            inter = w * h
            union = areas[i] + areas[rest] - inter
            iou = np.where(union > 0, inter / union, 0)
            order = rest[~(iou > iou_threshold)]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """Class-wise NMS (:func:`nms` within each label): boxes ``(N, 4)``, scores ``(N,)``, labels ``(N,)``
    -> indices kept over all classes ``(K,)`` int64, in decreasing score (ties: class order)."""
    kept = [
        np.flatnonzero(labels == c)[nms(boxes[labels == c], scores[labels == c], iou_threshold)]
        for c in np.unique(labels)
    ]
    if not kept:
        return np.zeros((0,), np.int64)
    allk = np.concatenate(kept)
    return allk[np.argsort(-scores[allk], kind="stable")]
