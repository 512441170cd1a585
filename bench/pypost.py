"""The Python baseline: RetinaNet decoding and class-wise NMS in numpy, after the ONNX heads.

What people write when the graph ends at the heads. Semantics are torchvision's
``RetinaNet.postprocess_detections`` (docs/architecture.md, contracts), per image and per FPN level:

    sigmoid -> keep scores > score_thresh -> top ``topk_candidates`` -> decode with BoxCoder weights and
    the ``bbox_xform_clip`` clamp on dw/dh -> clip to the image; then over all levels class-wise greedy
    NMS (IoU > ``nms_iou`` suppresses) and the best ``detections_per_img`` by score.

Anchors come from the manifest's :class:`~retinaedge.runtime.manifest.AnchorSpec` the way torchvision's
``AnchorGenerator`` makes them (float32, cell anchors rounded, shifted by stride over the feature grid).
NMS is :func:`retinaedge.runtime.boxes.batched_nms` on the float32 boxes (IoU in float32, as torchvision).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from retinaedge.runtime.boxes import batched_nms
from retinaedge.runtime.detections import ImageDetections
from retinaedge.runtime.manifest import AnchorSpec, Manifest, PostprocessSpec


def cell_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> np.ndarray:
    """Zero-centred anchors of one level, ``(len(ratios) * len(sizes), 4)`` float32, ratio-major."""
    scales = np.asarray(sizes, dtype=np.float32)
    ratios = np.asarray(aspect_ratios, dtype=np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1.0) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2.0)
    return np.round(base).astype(np.float32)  # half to even, like torch.round


def make_anchors(spec: AnchorSpec) -> np.ndarray:
    """All anchors ``(A, 4)`` float32 x1, y1, x2, y2, levels concatenated, location-major within a level."""
    levels = []
    for sizes, ratios, (gh, gw), (sh, sw) in zip(
        spec.sizes, spec.aspect_ratios, spec.feature_map_sizes, spec.strides, strict=True
    ):
        base = cell_anchors(sizes, ratios)  # (a, 4)
        shift_y, shift_x = np.meshgrid(np.arange(gh) * sh, np.arange(gw) * sw, indexing="ij")
        sx, sy = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = np.stack([sx, sy, sx, sy], axis=1).astype(np.float32)  # (gh*gw, 4)
        levels.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))  # (gh*gw*a, 4)
    anchors = np.concatenate(levels).astype(np.float32)
    if anchors.shape[0] != sum(spec.anchors_per_level):
        raise ValueError(f"{anchors.shape[0]} anchors made, the manifest says {sum(spec.anchors_per_level)}")
    return anchors


@dataclass(frozen=True)
class PostPlan:
    """What post-processing needs: anchors ``(A, 4)``, anchors per level, classes, thresholds, image size."""

    anchors: np.ndarray
    anchors_per_level: tuple[int, ...]
    num_classes: int
    spec: PostprocessSpec
    image_hw: tuple[int, int]

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> PostPlan:
        return cls(
            anchors=make_anchors(manifest.anchors),
            anchors_per_level=tuple(manifest.anchors.anchors_per_level),
            num_classes=manifest.num_classes,
            spec=manifest.postprocess,
            image_hw=(manifest.input.height, manifest.input.width),
        )


def decode(deltas: np.ndarray, anchors: np.ndarray, weights: tuple[float, ...], clip: float) -> np.ndarray:
    """torchvision ``BoxCoder.decode_single``: deltas ``(M, 4)`` dx, dy, dw, dh + anchors ``(M, 4)`` ->
    boxes ``(M, 4)`` x1, y1, x2, y2 (float32, same operations in the same order)."""
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    ctr_x = anchors[:, 0] + np.float32(0.5) * widths
    ctr_y = anchors[:, 1] + np.float32(0.5) * heights
    wx, wy, ww, wh = (np.float32(w) for w in weights)
    dx = deltas[:, 0] / wx
    dy = deltas[:, 1] / wy
    dw = np.minimum(deltas[:, 2] / ww, np.float32(clip))
    dh = np.minimum(deltas[:, 3] / wh, np.float32(clip))
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = np.float32(0.5) * (np.exp(dw) * widths)
    half_h = np.float32(0.5) * (np.exp(dh) * heights)
    return np.stack(
        [pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h], axis=1
    ).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function in float32 (exp overflow to inf gives the correct limit 0)."""
    with np.errstate(over="ignore"):
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(-x))).astype(np.float32)


def postprocess_image(cls_logits: np.ndarray, bbox_regression: np.ndarray, plan: PostPlan) -> ImageDetections:
    """One image: logits ``(A, C)`` and deltas ``(A, 4)`` -> its detections (at most K, by score)."""
    spec = plan.spec
    c = plan.num_classes
    height, width = plan.image_hw
    all_boxes, all_scores, all_labels = [], [], []
    start = 0
    for count in plan.anchors_per_level:
        probs = sigmoid(cls_logits[start : start + count]).reshape(-1)  # (A_l * C,)
        candidates = np.flatnonzero(probs > spec.score_thresh)
        k = min(spec.topk_candidates, candidates.size)
        top = np.argsort(-probs[candidates], kind="stable")[:k]
        flat = candidates[top]  # index = anchor * C + class
        anchor_idx = start + flat // c
        boxes = decode(
            bbox_regression[anchor_idx],
            plan.anchors[anchor_idx],
            spec.box_coder_weights,
            spec.bbox_xform_clip,
        )
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
        all_boxes.append(boxes)
        all_scores.append(probs[flat])
        all_labels.append(flat % c)
        start += count
    boxes = np.concatenate(all_boxes)
    scores = np.concatenate(all_scores)
    labels = np.concatenate(all_labels)
    keep = batched_nms(boxes, scores, labels, spec.nms_iou)[: spec.detections_per_img]
    return ImageDetections.from_arrays(boxes[keep], scores[keep], labels[keep])


def postprocess(cls_logits: np.ndarray, bbox_regression: np.ndarray, plan: PostPlan) -> list[ImageDetections]:
    """A batch: ``(N, A, C)`` logits and ``(N, A, 4)`` deltas -> one :class:`ImageDetections` per image."""
    return [postprocess_image(cls_logits[i], bbox_regression[i], plan) for i in range(cls_logits.shape[0])]
