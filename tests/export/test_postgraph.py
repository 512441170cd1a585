"""The hand-written ONNX post-processing against an independent numpy transcription of torchvision's
``RetinaNet.postprocess_detections`` (no torch needed)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from retinaedge.export.assemble import check, postprocess_only
from retinaedge.runtime.detections import ImageDetections, split_outputs
from retinaedge.runtime.manifest import PostprocessSpec
from retinaedge.runtime.matching import match_detections

HW = (64, 96)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def _nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        rest = []
        for j in order:
            lt = np.maximum(boxes[i, :2], boxes[j, :2])
            rb = np.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = np.prod(np.clip(rb - lt, 0, None))
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            union = area(boxes[i]) + area(boxes[j]) - inter
            if not (union > 0 and inter / union > thr):
                rest.append(j)
        order = rest
    return keep


def torchvision_like(cls, reg, anchors, per_level, spec: PostprocessSpec, hw) -> ImageDetections:
    """One image: cls (A, C), reg (A, 4), anchors (A, 4) -> detections, following torchvision's code."""
    c = cls.shape[1]
    all_b, all_s, all_l = [], [], []
    start = 0
    for n in per_level:
        scores = _sigmoid(cls[start : start + n]).reshape(-1)
        idxs = np.flatnonzero(scores > spec.score_thresh)
        s = scores[idxs]
        order = np.argsort(-s, kind="stable")[: min(spec.topk_candidates, idxs.size)]
        s, idxs = s[order], idxs[order]
        anchor_idx = idxs // c + start
        a = anchors[anchor_idx]
        d = reg[anchor_idx]
        w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
        cx, cy = a[:, 0] + 0.5 * w, a[:, 1] + 0.5 * h
        dw = np.minimum(d[:, 2], spec.bbox_xform_clip)
        dh = np.minimum(d[:, 3], spec.bbox_xform_clip)
        pcx, pcy = d[:, 0] * w + cx, d[:, 1] * h + cy
        pw, ph = np.exp(dw) * w, np.exp(dh) * h
        boxes = np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=1)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, hw[1])
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, hw[0])
        all_b.append(boxes)
        all_s.append(s)
        all_l.append(idxs % c)
        start += n
    boxes, scores, labels = np.concatenate(all_b), np.concatenate(all_s), np.concatenate(all_l)
    keep = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        keep += [int(idx[k]) for k in _nms(boxes[idx], scores[idx], spec.nms_iou)]
    keep = np.asarray(sorted(keep, key=lambda i: -scores[i]), dtype=np.int64)[: spec.detections_per_img]
    return ImageDetections.from_arrays(boxes[keep], scores[keep], labels[keep])


def _problem(seed: int, num_classes: int, per_level=(96 * 3, 24 * 3, 6 * 3)):
    rng = np.random.default_rng(seed)
    total = sum(per_level)
    ctr = rng.uniform([0, 0], [HW[1], HW[0]], size=(total, 2))
    size = rng.uniform(4, 40, size=(total, 2))
    anchors = np.concatenate([ctr - size / 2, ctr + size / 2], axis=1).astype(np.float32)
    return anchors, per_level, rng


def _run(model: onnx.ModelProto, cls: np.ndarray, reg: np.ndarray) -> list[ImageDetections]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(None, {"cls_logits": cls, "bbox_regression": reg})
    return split_outputs(dict(zip(names, outs, strict=True)))


@pytest.mark.parametrize(
    ("num_classes", "spec"),
    [
        (3, PostprocessSpec()),
        (1, PostprocessSpec(score_thresh=0.2, nms_iou=0.3, topk_candidates=50, detections_per_img=40)),
        (5, PostprocessSpec(topk_candidates=100, detections_per_img=500)),  # K > candidates: padding path
    ],
)
def test_postprocess_matches_torchvision_semantics(num_classes: int, spec: PostprocessSpec) -> None:
    anchors, per_level, rng = _problem(1, num_classes)
    n = 3
    cls = rng.normal(-1.5, 1.2, size=(n, anchors.shape[0], num_classes)).astype(np.float32)
    reg = rng.normal(0, 0.3, size=(n, anchors.shape[0], 4)).astype(np.float32)
    reg[:, ::7, 2:] = 6.0  # beyond log(1000/16): exercises the clamp
    model = check(postprocess_only(anchors, per_level, num_classes, spec, HW, 18))
    got = _run(model, cls, reg)
    for i in range(n):
        want = torchvision_like(cls[i], reg[i], anchors, per_level, spec, HW)
        assert len(want) >= 10, "the test problem must produce detections"
        rep = match_detections(want, got[i])
        assert rep.matched == rep.reference == rep.candidate, rep.to_dict()
        assert np.all(np.diff(got[i].scores) <= 0), "detections must be sorted by score"


def test_padding_rows_and_dtypes() -> None:
    anchors, per_level, rng = _problem(2, 2)
    spec = PostprocessSpec(score_thresh=0.5, detections_per_img=300)
    cls = rng.normal(-3, 1.0, size=(2, anchors.shape[0], 2)).astype(np.float32)
    reg = np.zeros((2, anchors.shape[0], 4), np.float32)
    sess = ort.InferenceSession(
        postprocess_only(anchors, per_level, 2, spec, HW, 18).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    num, boxes, scores, labels = sess.run(None, {"cls_logits": cls, "bbox_regression": reg})
    assert num.dtype == np.int32 and num.shape == (2,)
    assert boxes.shape == (2, 300, 4) and scores.shape == (2, 300) and labels.dtype == np.int32
    for i in range(2):
        k = int(num[i])
        assert 0 < k < 300
        assert np.all(labels[i, k:] == -1) and np.all(scores[i, k:] == 0) and np.all(boxes[i, k:] == 0)
        assert np.all(scores[i, :k] > 0.5)


def test_batch_independence() -> None:
    anchors, per_level, rng = _problem(3, 3)
    spec = PostprocessSpec()
    cls = rng.normal(-1.5, 1.2, size=(4, anchors.shape[0], 3)).astype(np.float32)
    reg = rng.normal(0, 0.3, size=(4, anchors.shape[0], 4)).astype(np.float32)
    model = postprocess_only(anchors, per_level, 3, spec, HW, 18)
    batched = _run(model, cls, reg)
    for i in range(4):
        single = _run(model, cls[i : i + 1], reg[i : i + 1])[0]
        np.testing.assert_array_equal(single.boxes, batched[i].boxes)
        np.testing.assert_array_equal(single.labels, batched[i].labels)


def test_graph_uses_standard_ops_only() -> None:
    anchors, per_level, _ = _problem(4, 2)
    model = postprocess_only(anchors, per_level, 2, PostprocessSpec(), HW, 18)
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert "NonMaxSuppression" in {n.op_type for n in model.graph.node}
    assert math.isclose(PostprocessSpec().bbox_xform_clip, math.log(1000 / 16))
