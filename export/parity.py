"""Parity of an exported model against its PyTorch source, recorded in ``parity.json``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from retinaedge.runtime.detections import ImageDetections, split_outputs
from retinaedge.runtime.matching import MatchReport, match_detections

IOU_MIN = 0.99
SCORE_TOL = 1e-3


@dataclass(frozen=True)
class ParityInput:
    """One parity image: float32 ``(C, H, W)`` in 0..1 and where it came from."""

    image: np.ndarray
    source: str


def compare(
    sources: list[str],
    reference: list[ImageDetections],
    candidate: list[ImageDetections],
    pre_cap: list[int] | None = None,
) -> dict[str, Any]:
    """Per-image match reports and totals (match rate = matched reference detections / all)."""
    images = []
    total_ref = total_matched = total_cand = 0
    worst_iou, worst_delta = 1.0, 0.0
    for i, (src, ref, cand) in enumerate(zip(sources, reference, candidate, strict=True)):
        rep: MatchReport = match_detections(ref, cand, iou_min=IOU_MIN, score_tol=SCORE_TOL)
        entry = {"source": src, **rep.to_dict()}
        if pre_cap is not None:
            entry["pre_cap_detections"] = pre_cap[i]
        images.append(entry)
        total_ref += rep.reference
        total_cand += rep.candidate
        total_matched += rep.matched
        worst_iou = min(worst_iou, rep.min_iou)
        worst_delta = max(worst_delta, rep.max_score_delta)
    rate = total_matched / total_ref if total_ref else (1.0 if total_cand == 0 else 0.0)
    return {
        "images": images,
        "totals": {
            "reference": total_ref,
            "candidate": total_cand,
            "matched": total_matched,
            "match_rate": rate,
            "min_iou_matched": worst_iou,
            "max_score_delta_matched": worst_delta,
        },
    }


def batch_consistency(backend: Any, images: np.ndarray) -> dict[str, Any]:
    """Run ``images (N, C, H, W)`` as one batch and one by one; report how far the results differ."""
    batched = split_outputs(backend.infer(images))
    single = [split_outputs(backend.infer(images[i : i + 1]))[0] for i in range(images.shape[0])]
    identical = True
    max_box = max_score = 0.0
    reports = []
    for s, b in zip(single, batched, strict=True):
        rep = match_detections(s, b, iou_min=IOU_MIN, score_tol=SCORE_TOL)
        reports.append(rep.to_dict() | {"unmatched_reference": len(rep.unmatched_reference)})
        if len(s) != len(b) or not np.array_equal(s.labels, b.labels):
            identical = False
        else:
            if len(s):
                max_box = max(max_box, float(np.abs(s.boxes - b.boxes).max()))
                max_score = max(max_score, float(np.abs(s.scores - b.scores).max()))
    return {
        "batch_size": int(images.shape[0]),
        "same_labels_in_same_order": identical,
        "max_abs_box_diff": max_box,
        "max_abs_score_diff": max_score,
        "min_match_rate": min(r["match_rate"] for r in reports) if reports else 1.0,
        "per_image": [
            {k: r[k] for k in ("reference", "candidate", "matched", "match_rate")} for r in reports
        ],
    }
