"""Detection-aware comparison of two detectors' outputs on the same image.

Used by export parity (PyTorch vs ONNX Runtime), by the golden self-test and by engine validation.
Two detections match when the labels are equal, IoU >= ``iou_min`` and ``|score delta| <= score_tol``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from retinaedge.runtime.boxes import pairwise_iou
from retinaedge.runtime.detections import ImageDetections

DEGENERATE_TOL_PX = 0.01
"""Two zero-area boxes whose corners agree within this many pixels match (IoU 1): a box clipped flat
against the image border has a position but no area."""


@dataclass(frozen=True)
class MatchReport:
    """Outcome of matching ``candidate`` detections against ``reference`` detections of one image."""

    reference: int
    candidate: int
    matched: int
    min_iou: float
    max_score_delta: float
    unmatched_reference: list[dict[str, Any]] = field(default_factory=list)
    unmatched_candidate: list[dict[str, Any]] = field(default_factory=list)

    @property
    def match_rate(self) -> float:
        """Fraction of reference detections matched (1.0 when the reference is empty and so is the candidate)."""
        if self.reference == 0:
            return 1.0 if self.candidate == 0 else 0.0
        return self.matched / self.reference

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "matched": self.matched,
            "match_rate": self.match_rate,
            "min_iou": self.min_iou,
            "max_score_delta": self.max_score_delta,
            "unmatched_reference": self.unmatched_reference,
            "unmatched_candidate": self.unmatched_candidate,
        }


def _describe(det: ImageDetections, i: int) -> dict[str, Any]:
    return {
        "label": int(det.labels[i]),
        "score": float(det.scores[i]),
        "box": [round(float(v), 3) for v in det.boxes[i]],
    }


def match_detections(
    reference: ImageDetections,
    candidate: ImageDetections,
    *,
    iou_min: float = 0.99,
    score_tol: float = 1e-3,
) -> MatchReport:
    """Greedy one-to-one matching in decreasing reference score.

    Each reference detection takes the unmatched candidate of the same label, within ``score_tol``,
    with the highest IoU, if that IoU is at least ``iou_min``.
    """
    iou = pairwise_iou(
        reference.boxes.astype(np.float64),
        candidate.boxes.astype(np.float64),
        degenerate_tol=DEGENERATE_TOL_PX,
    )
    same = reference.labels[:, None] == candidate.labels[None, :]
    close = np.abs(reference.scores[:, None].astype(np.float64) - candidate.scores[None, :]) <= score_tol
    eligible = np.where(same & close, iou, -1.0)
    taken = np.zeros(len(candidate), dtype=bool)
    matched_ref = np.zeros(len(reference), dtype=bool)
    min_iou, max_delta = 1.0, 0.0
    for r in np.argsort(-reference.scores, kind="stable"):
        row = np.where(taken, -1.0, eligible[r])
        if row.size == 0:
            continue
        c = int(np.argmax(row))
        if row[c] >= iou_min:
            taken[c] = True
            matched_ref[r] = True
            min_iou = min(min_iou, float(row[c]))
            max_delta = max(max_delta, abs(float(reference.scores[r]) - float(candidate.scores[c])))
    return MatchReport(
        reference=len(reference),
        candidate=len(candidate),
        matched=int(matched_ref.sum()),
        min_iou=min_iou,
        max_score_delta=max_delta,
        unmatched_reference=[_describe(reference, int(i)) for i in np.flatnonzero(~matched_ref)],
        unmatched_candidate=[_describe(candidate, int(i)) for i in np.flatnonzero(~taken)],
    )


def match_images(
    reference: list[ImageDetections], candidate: list[ImageDetections], criteria: dict[str, float]
) -> tuple[list[MatchReport], float]:
    """:func:`match_detections` image by image with ``criteria`` (``iou_min``, ``score_tol``); returns the
    reports and the worst match rate (to compare with ``criteria["min_match_rate"]``)."""
    reports = [
        match_detections(r, c, iou_min=criteria["iou_min"], score_tol=criteria["score_tol"])
        for r, c in zip(reference, candidate, strict=True)
    ]
    return reports, min((r.match_rate for r in reports), default=1.0)
