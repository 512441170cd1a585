"""The model's operating point: a score threshold per class above which a detection is a *finding*.

A detector returns every box down to its score threshold (0.05 for torchvision's RetinaNet): up to
``detections_per_img`` boxes per frame, most of them below anything a radiologist should see. The
operating point is the threshold per class, chosen on annotated images, at which the model is meant to
be read. The JSON result keeps every detection and marks each with ``"finding": true|false``; the
documents (SR, GSPS, SC, KOS) show findings only. A bundle without an operating point marks every
detection a finding, as before there was one.

It lives in the manifest (``operating_point``): set at export (``retinaedge export --operating-point
FILE``) or by ``retinaedge eval --choose-operating-point RULE --write-operating-point``, which also
reports the sensitivity and precision at it. This module holds the type, the per-class counts at a
threshold (:func:`counts_at`) and the choice (:func:`choose`): pure functions over frames and
annotations, no I/O.

Counting follows the evaluation's matching (:mod:`retinaedge.runtime.evaluate`) at IoU 0.5: per frame
and class, detections in descending score order take the unmatched regular box of highest IoU >= 0.5
(a true positive) or, failing that, are ignored when they overlap a ``difficult`` box by that much, and
are false positives otherwise. A regular box that no detection takes is a false negative. Because the
matching is greedy in score order, a detection's outcome is the same at every threshold at or below its
score, so one pass gives the counts at every threshold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from retinaedge.runtime.boxes import pairwise_iou
from retinaedge.runtime.errors import ConfigError

#: IoU at which a detection matches a ground-truth box (the AP50 criterion).
MATCH_IOU = 0.5
#: ``max-f1`` or ``sensitivity>=X`` (0 < X <= 1): how :func:`choose` picks a threshold per class.
RULE = re.compile(r"^(max-f1|sensitivity>=(0\.\d*[1-9]\d*|1(\.0+)?))$")


@dataclass(frozen=True)
class OperatingPoint:
    """Score thresholds per class name (0..1): a detection of class ``c`` is a finding when its score is
    at least ``score_thresholds[c]``. ``method`` says how they were chosen (for people and audits);
    ``measured`` holds the counts, sensitivity and precision per class where they were chosen."""

    score_thresholds: dict[str, float]
    method: str = ""
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self, class_names: Sequence[str]) -> None:
        """Raise :class:`ConfigError` unless every class has exactly one threshold in 0..1."""
        missing = [c for c in class_names if c not in self.score_thresholds]
        foreign = [c for c in self.score_thresholds if c not in class_names]
        if missing or foreign:
            raise ConfigError(
                f"the operating point must give a score threshold for each class {list(class_names)}"
                + (f"; missing: {missing}" if missing else "")
                + (f"; not classes of the model: {foreign}" if foreign else "")
            )
        bad = {c: t for c, t in self.score_thresholds.items() if not (0.0 <= t <= 1.0 and math.isfinite(t))}
        if bad:
            raise ConfigError(f"operating point thresholds must be within 0..1, got {bad}")

    def is_finding(self, label: str, score: float) -> bool:
        """Whether a detection of class ``label`` with ``score`` is a finding (an unknown label is not)."""
        threshold = self.score_thresholds.get(label)
        return threshold is not None and score >= threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "score_thresholds": dict(self.score_thresholds),
            "method": self.method,
            "measured": dict(self.measured),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OperatingPoint:
        """From the manifest's ``operating_point`` object (or a file holding one); raises ConfigError."""
        if not isinstance(data, Mapping) or not isinstance(data.get("score_thresholds"), Mapping):
            raise ConfigError('an operating point is an object with "score_thresholds": {class: threshold}')
        unknown = set(data) - {"score_thresholds", "method", "measured"}
        if unknown:
            raise ConfigError(f"unknown operating point key(s) {sorted(unknown)}")
        try:
            thresholds = {str(k): float(v) for k, v in data["score_thresholds"].items()}
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"operating point thresholds must be numbers: {exc}") from exc
        measured = data.get("measured") or {}
        if not isinstance(measured, Mapping):
            raise ConfigError('the operating point\'s "measured" must be an object')
        return cls(thresholds, str(data.get("method", "")), {str(k): dict(v) for k, v in measured.items()})


@dataclass(frozen=True)
class ScoredBox:
    """A detection for counting: frame key, class label, score and box (x1, y1, x2, y2, frame pixels)."""

    frame: tuple[str, int]
    label: str
    score: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class TruthBox:
    """A ground-truth box for counting; ``difficult`` boxes are neither found nor missed."""

    frame: tuple[str, int]
    label: str
    box: tuple[float, float, float, float]
    difficult: bool = False


@dataclass(frozen=True)
class Outcomes:
    """Per class: the scores of true-positive and false-positive detections (descending) and the number
    of regular ground-truth boxes. Ignored detections (on difficult boxes) are in neither list."""

    tp_scores: dict[str, np.ndarray]
    fp_scores: dict[str, np.ndarray]
    positives: dict[str, int]


def outcomes(detections: Iterable[ScoredBox], truths: Iterable[TruthBox], classes: Sequence[str]) -> Outcomes:
    """Match detections to ground truth per frame and class (module docstring) at every threshold."""
    dets: dict[tuple[tuple[str, int], str], list[ScoredBox]] = {}
    for d in detections:
        if d.label in classes:
            dets.setdefault((d.frame, d.label), []).append(d)
    gts: dict[tuple[tuple[str, int], str], list[TruthBox]] = {}
    for t in truths:
        if t.label in classes:
            gts.setdefault((t.frame, t.label), []).append(t)
    tp: dict[str, list[float]] = {c: [] for c in classes}
    fp: dict[str, list[float]] = {c: [] for c in classes}
    positives = {c: 0 for c in classes}
    for t in (t for group in gts.values() for t in group if not t.difficult):
        positives[t.label] += 1
    for key, group in dets.items():
        label = key[1]
        group = sorted(group, key=lambda d: -d.score)
        regular = [t.box for t in gts.get(key, []) if not t.difficult]
        difficult = [t.box for t in gts.get(key, []) if t.difficult]
        iou = _iou(group, regular)
        iou_difficult = _iou(group, difficult)
        taken = np.zeros(len(regular), dtype=bool)
        for i, d in enumerate(group):
            if regular:
                candidates = np.where(~taken & (iou[i] >= MATCH_IOU), iou[i], -1.0)
                j = int(np.argmax(candidates))
                if candidates[j] >= MATCH_IOU:
                    taken[j] = True
                    tp[label].append(d.score)
                    continue
            if difficult and float(iou_difficult[i].max()) >= MATCH_IOU:
                continue
            fp[label].append(d.score)
    return Outcomes(
        {c: np.sort(np.asarray(v, dtype=np.float64))[::-1] for c, v in tp.items()},
        {c: np.sort(np.asarray(v, dtype=np.float64))[::-1] for c, v in fp.items()},
        positives,
    )


def _iou(dets: Sequence[ScoredBox], boxes: Sequence[tuple[float, float, float, float]]) -> np.ndarray:
    """IoU matrix ``(len(dets), len(boxes))``."""
    if not dets or not boxes:
        return np.zeros((len(dets), len(boxes)), dtype=np.float64)
    return pairwise_iou(
        np.asarray([d.box for d in dets], dtype=np.float64), np.asarray(boxes, dtype=np.float64)
    )


def counts_at(result: Outcomes, label: str, threshold: float) -> dict[str, Any]:
    """True and false positives, false negatives, sensitivity and precision of ``label`` at
    ``threshold`` (sensitivity None without ground truth, precision None without detections)."""
    tps = int(np.count_nonzero(result.tp_scores[label] >= threshold))
    fps = int(np.count_nonzero(result.fp_scores[label] >= threshold))
    pos = result.positives[label]
    return {
        "threshold": round(float(threshold), 6),
        "true_positives": tps,
        "false_positives": fps,
        "false_negatives": pos - tps,
        "sensitivity": round(tps / pos, 4) if pos else None,
        "precision": round(tps / (tps + fps), 4) if tps + fps else None,
    }


def choose(result: Outcomes, classes: Sequence[str], rule: str, floor: float) -> dict[str, float]:
    """A threshold per class by ``rule``: ``max-f1`` (the score that maximises F1; ties: the higher
    threshold) or ``sensitivity>=X`` (the highest score whose sensitivity reaches X). Candidates are the
    detections' own scores; a class without ground truth or without true positives keeps ``floor`` (the
    model's score threshold: every detection a finding) and says so in the method."""
    if not RULE.match(rule):
        raise ConfigError(f"operating point rule {rule!r}: use max-f1 or sensitivity>=X with 0 < X <= 1")
    chosen: dict[str, float] = {}
    for label in classes:
        tps, fps, pos = result.tp_scores[label], result.fp_scores[label], result.positives[label]
        if pos == 0 or tps.size == 0:
            chosen[label] = floor
            continue
        candidates = np.unique(tps)[::-1]  # descending: a threshold at a true positive's score
        tp_at = np.searchsorted(-tps, -candidates, side="right")
        fp_at = np.searchsorted(-fps, -candidates, side="right")
        sensitivity = tp_at / pos
        if rule == "max-f1":
            f1 = 2 * tp_at / (tp_at + fp_at + pos)
            best = int(np.argmax(f1))  # the first maximum: the highest threshold among ties
        else:
            target = float(rule.split(">=", 1)[1])
            reached = np.nonzero(sensitivity >= target - 1e-12)[0]
            best = int(reached[0]) if reached.size else len(candidates) - 1
        chosen[label] = float(candidates[best])
    return chosen


def findings_flags(
    labels: Sequence[str], scores: Sequence[float], point: OperatingPoint | None
) -> list[bool]:
    """``finding`` for each detection: at or above the class's threshold; all True without a point."""
    if point is None:
        return [True] * len(labels)
    return [point.is_finding(label, score) for label, score in zip(labels, scores, strict=True)]
