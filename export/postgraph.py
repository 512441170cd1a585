"""RetinaNet post-processing as plain ONNX: torchvision's ``postprocess_detections``, batched.

Inputs (produced by the exported backbone + heads):
    ``cls_logits``       float32 ``(N, A, C)``  raw class logits, anchors of all levels concatenated
    ``bbox_regression``  float32 ``(N, A, 4)``  box deltas (dx, dy, dw, dh) per anchor

Semantics, per image and per FPN level (torchvision ``RetinaNet.postprocess_detections``):
    sigmoid -> keep scores > score_thresh -> top ``topk_candidates`` -> decode with BoxCoder weights and
    the ``bbox_xform_clip`` clamp on dw/dh -> clip to the image; then over all levels class-wise NMS at
    ``nms_iou`` and the best ``detections_per_img`` (K) by score.

The threshold is applied by ``NonMaxSuppression``'s ``score_threshold`` (strictly greater, like
torchvision) after a top-k over all of the level's scores, which selects the same set. Class-wise
NMS uses the op's class axis: each candidate's score sits in its own class row, -1 elsewhere.
Everything is batch-independent: image i's result never depends on the other images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto
from retinaedge.export.graphbuilder import GraphBuilder
from retinaedge.runtime.manifest import PostprocessSpec

PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_OP = "EfficientNMS_TRT"
# EfficientNMS_TRT sorts the thresholded scores and runs NMS on the best 4096 only (plugin README).
PLUGIN_MAX_CANDIDATES = 4096


@dataclass(frozen=True)
class Candidates:
    """Tensor names of the pre-NMS candidates: boxes ``(N, M, 4)``, scores ``(N, M)``, labels int64 ``(N, M)``."""

    boxes: str
    scores: str
    labels: str
    count: int  # M, the static number of candidates per image


def anchor_geometry(anchors: np.ndarray) -> np.ndarray:
    """Anchors ``(A, 4)`` x1, y1, x2, y2 -> ``(A, 4)`` widths, heights, ctr_x, ctr_y in float32.

    Same float32 operations, in the same order, as torchvision ``BoxCoder.decode_single``.
    """
    a = anchors.astype(np.float32)
    widths = a[:, 2] - a[:, 0]
    heights = a[:, 3] - a[:, 1]
    ctr_x = a[:, 0] + np.float32(0.5) * widths
    ctr_y = a[:, 1] + np.float32(0.5) * heights
    return np.stack([widths, heights, ctr_x, ctr_y], axis=1).astype(np.float32)


def level_topk(anchors_per_level: tuple[int, ...], num_classes: int, topk: int) -> list[int]:
    """Static k per level: ``min(topk, A_l * C)`` (torchvision's ``_topk_min`` before thresholding)."""
    return [min(topk, n * num_classes) for n in anchors_per_level]


def build_candidates(
    b: GraphBuilder,
    cls_logits: str,
    bbox_regression: str,
    anchors: np.ndarray,
    anchors_per_level: tuple[int, ...],
    num_classes: int,
    spec: PostprocessSpec,
    image_hw: tuple[int, int],
) -> Candidates:
    """Per-level top-k, box decoding and clipping; see the module docstring.

    Cheaper than a literal transcription, with the same result (see ``masked``): scores at or below the
    threshold are replaced by -1 before the per-level top-k (ONNX Runtime's top-k then rejects them in one
    comparison instead of ranking them), the level offsets are added to the flat ``anchor * C + class``
    index before one division and one modulo for all levels, and the decode works on (x, y) pairs.
    """
    if anchors.shape != (sum(anchors_per_level), 4):
        raise ValueError(f"anchors {anchors.shape} do not match levels {anchors_per_level}")
    ks = level_topk(anchors_per_level, num_classes, spec.topk_candidates)
    c = num_classes
    probs = b.op("Sigmoid", [cls_logits], "probs")  # (N, A, C)
    # Scores <= score_thresh can never be kept (NonMaxSuppression's score_threshold drops them, and -1 is
    # below any threshold >= 0); as -1 they still fill a level's k slots when fewer pass, so shapes stay
    # static, and every score above the threshold keeps its value and its index, hence its rank and ties.
    above = b.op("Greater", [probs, b.const(np.float32(spec.score_thresh))], "above")
    masked = b.op("Where", [above, probs, b.const(np.float32(-1.0))], "masked")
    flat = b.op("Reshape", [masked, b.const([0, -1], dtype=np.int64)], "flat")  # (N, A*C)
    level_scores, level_index = [], []
    start = 0
    for level, (count, k) in enumerate(zip(anchors_per_level, ks, strict=True)):
        lo, hi = start * c, (start + count) * c
        sl = b.op(
            "Slice",
            [
                flat,
                b.const([lo], dtype=np.int64),
                b.const([hi], dtype=np.int64),
                b.const([1], dtype=np.int64),
            ],
            f"l{level}_flat",
        )  # (N, A_l*C)
        vals, idx = b.op(
            "TopK", [sl, b.const([k], dtype=np.int64)], outputs=2, axis=1, largest=1, sorted=1
        )  # (N, k_l), (N, k_l) int64; index = local anchor * C + class
        if lo:
            idx = b.op("Add", [idx, b.const(np.array(lo, np.int64))], f"l{level}_index")  # global flat index
        level_scores.append(vals)
        level_index.append(idx)
        start += count
    scores = b.op("Concat", level_scores, "cand_scores", axis=1)  # (N, M)
    index = b.op("Concat", level_index, "cand_index", axis=1)  # (N, M) int64, global anchor * C + class
    c_const = b.const(np.array(c, np.int64), "num_classes")
    anchor_idx = b.op("Div", [index, c_const], "cand_anchor")  # (N, M) int64
    labels = b.op("Mod", [index, c_const], "cand_labels", fmod=0)  # (N, M) int64

    # Regression deltas of the selected anchors, image by image (batch_dims=1): (N, M, 4).
    idx3 = b.op("Unsqueeze", [anchor_idx, b.const([2], dtype=np.int64)], "cand_anchor3")  # (N, M, 1)
    deltas = b.op("GatherND", [bbox_regression, idx3], "cand_deltas", batch_dims=1)  # (N, M, 4)
    geom = b.op("Gather", [b.const(anchor_geometry(anchors), "anchor_geom"), anchor_idx], "cand_geom", axis=0)

    # torchvision's BoxCoder.decode_single on (x, y) pairs: the same float32 operations per element.
    d_xy, d_wh = b.op("Split", [deltas], outputs=2, axis=2, num_outputs=2)  # (N, M, 2) each
    a_wh, a_ctr = b.op("Split", [geom], outputs=2, axis=2, num_outputs=2)  # widths/heights, centres
    wx, wy, ww, wh = (float(w) for w in spec.box_coder_weights)
    if (wx, wy) != (1.0, 1.0):  # x / 1.0 is x exactly: the division is left out then
        d_xy = b.op("Div", [d_xy, b.const(np.array([wx, wy], np.float32))], "d_xy")
    if (ww, wh) != (1.0, 1.0):
        d_wh = b.op("Div", [d_wh, b.const(np.array([ww, wh], np.float32))], "d_wh")
    d_wh = b.op("Min", [d_wh, b.const(np.float32(spec.bbox_xform_clip), "xform_clip")], "d_wh_clamped")
    ctr = b.op("Add", [b.op("Mul", [d_xy, a_wh]), a_ctr], "pred_ctr")  # (N, M, 2)
    size = b.op("Mul", [b.op("Exp", [d_wh]), a_wh], "pred_wh")
    half = b.op("Mul", [b.const(np.float32(0.5), "half"), size], "c_to_c")
    lo_xy = b.op("Sub", [ctr, half], "pred_lo")
    hi_xy = b.op("Add", [ctr, half], "pred_hi")
    boxes = b.op("Concat", [lo_xy, hi_xy], "cand_boxes_raw", axis=2)  # (N, M, 4) x1, y1, x2, y2
    height, width = image_hw
    boxes = b.op("Max", [boxes, b.const(np.float32(0.0))], "cand_boxes_lo")
    boxes = b.op("Min", [boxes, b.const(np.array([width, height, width, height], np.float32))], "cand_boxes")
    return Candidates(boxes=boxes, scores=scores, labels=labels, count=sum(ks))


def _class_rows(b: GraphBuilder, cand: Candidates, num_classes: int, fill: float) -> str:
    """``(N, C, M)``: each candidate's score in its own class row, ``fill`` elsewhere."""
    classes = b.const(np.arange(num_classes, dtype=np.int64).reshape(1, num_classes, 1), "class_ids")
    labels = b.op("Unsqueeze", [cand.labels, b.const([1], dtype=np.int64)], "labels_n1m")  # (N, 1, M)
    onehot = b.op("Equal", [labels, classes], "onehot")  # (N, C, M) bool
    scores = b.op("Unsqueeze", [cand.scores, b.const([1], dtype=np.int64)], "scores_n1m")
    return b.op("Where", [onehot, scores, b.const(np.float32(fill))], "class_scores")


def build_onnx_nms(
    b: GraphBuilder,
    cand: Candidates,
    num_classes: int,
    spec: PostprocessSpec,
    output_names: tuple[str, str, str, str] = ("num_detections", "boxes", "scores", "labels"),
) -> None:
    """Class-wise ``NonMaxSuppression`` and the best K per image, padded to K. Writes the contract outputs."""
    k_out = spec.detections_per_img
    class_scores = _class_rows(b, cand, num_classes, -1.0)  # (N, C, M)
    selected = b.op(
        "NonMaxSuppression",
        [
            cand.boxes,
            class_scores,
            b.const([k_out], dtype=np.int64),
            b.const([spec.nms_iou], dtype=np.float32),
            b.const([spec.score_thresh], dtype=np.float32),
        ],
        "nms_selected",
        center_point_box=0,
    )  # (S, 3): batch, class, box
    pairs = b.op("Gather", [selected, b.const([0, 2], dtype=np.int64)], "nms_pairs", axis=1)  # (S, 2)
    # The kept candidates' scores scattered onto -1 everywhere else: (N, M).
    kept_scores = b.op("GatherND", [cand.scores, pairs], "kept_scores")  # (S,)
    minus_ones = b.op(
        "ConstantOfShape", [b.op("Shape", [cand.scores])], "minus_ones", value=_scalar_tensor(-1.0)
    )
    final = b.op("ScatterND", [minus_ones, pairs, kept_scores], "final_scores")

    k_eff = min(k_out, cand.count)
    top_scores, top_idx = b.op(
        "TopK", [final, b.const([k_eff], dtype=np.int64)], outputs=2, axis=1, largest=1, sorted=1
    )  # (N, K')
    valid = b.op("Greater", [top_scores, b.const(np.float32(-0.5))], "valid")  # (N, K') bool
    idx4 = b.op(
        "Expand",
        [b.op("Unsqueeze", [top_idx, b.const([2], dtype=np.int64)]), b.const([1, 1, 4], dtype=np.int64)],
        "top_idx4",
    )
    boxes = b.op("GatherElements", [cand.boxes, idx4], "top_boxes", axis=1)  # (N, K', 4)
    labels = b.op("GatherElements", [cand.labels, top_idx], "top_labels", axis=1)  # (N, K')
    valid3 = b.op("Unsqueeze", [valid, b.const([2], dtype=np.int64)], "valid3")
    boxes = b.op("Where", [valid3, boxes, b.const(np.float32(0.0))], "boxes_masked")
    scores = b.op("Where", [valid, top_scores, b.const(np.float32(0.0))], "scores_masked")
    labels = b.op("Cast", [labels], "labels_i32", to=TensorProto.INT32)
    labels = b.op("Where", [valid, labels, b.const(np.int32(-1))], "labels_masked")
    num = b.op("Cast", [valid], "valid_i32", to=TensorProto.INT32)

    pad = k_out - k_eff
    if pad:
        boxes = b.op("Pad", [boxes, b.const([0, 0, 0, 0, pad, 0], dtype=np.int64), b.const(np.float32(0.0))])
        scores = b.op("Pad", [scores, b.const([0, 0, 0, pad], dtype=np.int64), b.const(np.float32(0.0))])
        labels = b.op("Pad", [labels, b.const([0, 0, 0, pad], dtype=np.int64), b.const(np.int32(-1))])
    n_name, b_name, s_name, l_name = output_names
    b.op("ReduceSum", [num, b.const([1], dtype=np.int64)], outputs=[n_name], keepdims=0)  # (N,)
    b.op("Identity", [boxes], outputs=[b_name])
    b.op("Identity", [scores], outputs=[s_name])
    b.op("Identity", [labels], outputs=[l_name])


def build_plugin_nms(
    b: GraphBuilder,
    cand: Candidates,
    num_classes: int,
    spec: PostprocessSpec,
    output_names: tuple[str, str, str, str] = ("num_detections", "boxes", "scores", "labels"),
) -> None:
    """``EfficientNMS_TRT`` (TensorRT plugin, standard NMS mode) on the same per-level candidates.

    Scores go in as ``(N, M, C)`` with each candidate's score in its own class column and -1 elsewhere,
    so the per-level top-k and the clamp are kept; the differences that remain are the plugin's
    (see :func:`plugin_semantics`).
    """
    rows = _class_rows(b, cand, num_classes, -1.0)  # (N, C, M)
    scores_nmc = b.op("Transpose", [rows], "plugin_scores", perm=[0, 2, 1])  # (N, M, C)
    num, boxes, scores, labels = b.op(
        PLUGIN_OP,
        [cand.boxes, scores_nmc],
        outputs=4,
        domain=PLUGIN_DOMAIN,
        plugin_version="1",
        background_class=-1,
        max_output_boxes=spec.detections_per_img,
        score_threshold=float(spec.score_thresh),
        iou_threshold=float(spec.nms_iou),
        score_activation=0,
        class_agnostic=0,
        box_coding=0,
    )  # (N, 1) int32, (N, K, 4), (N, K), (N, K) int32
    n_name, b_name, s_name, l_name = output_names
    b.op("Reshape", [num, b.const([-1], dtype=np.int64)], outputs=[n_name])  # (N,)
    b.op("Identity", [boxes], outputs=[b_name])
    b.op("Identity", [scores], outputs=[s_name])
    b.op("Identity", [labels], outputs=[l_name])


def plugin_semantics(spec: PostprocessSpec, candidates_per_image: int) -> dict[str, object]:
    """How the EfficientNMS_TRT variant differs from torchvision, stated for ``parity.json``."""
    return {
        "plugin": f"{PLUGIN_DOMAIN}::{PLUGIN_OP} v1 (standard NMS mode, box_coding=0, class_agnostic=0)",
        "kept_from_torchvision": [
            "sigmoid, per-level top-k candidates and box decoding with the bbox_xform_clip clamp run in the "
            "graph before the plugin, exactly as in model.onnx",
            "class-wise NMS (class_agnostic=0) at the same IoU threshold and the same K",
        ],
        "differences": [
            f"the plugin sorts the thresholded (candidate, class) scores and runs NMS on the best "
            f"{PLUGIN_MAX_CANDIDATES} only; this model has up to {candidates_per_image} candidates per image, "
            + (
                "so candidates ranked below 4096 can be lost when more than 4096 pass the score threshold"
                if candidates_per_image > PLUGIN_MAX_CANDIDATES
                else "so the cap never binds"
            ),
            "the plugin's sort and NMS run in CUDA; ties in score may be ordered differently",
            "the plugin outputs num_detections as [N, 1]; a Reshape restores the [N] contract",
        ],
        "not_runnable_here": "TensorRT plugins do not run in ONNX Runtime; the structure is validated and "
        "the semantics above are emulated in numpy on the graph's own pre-NMS candidates",
        "score_threshold": spec.score_thresh,
    }


def _scalar_tensor(value: float) -> TensorProto:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array([value], np.float32))
