"""The precision gate: a reduced-precision model may serve only if it finds what FP32 finds, here.

Pure comparison of detections (no OpenVINO import). The reference is this bundle's FP32 outputs on this
device; the candidate the same frames (the bundle's golden frames, plus annotated DICOM frames when
given) at the reduced precision. The gate passes when:

- every FP32 *finding* is found again: a candidate finding of the same label with IoU >= 0.5. A finding is
  a detection at or above its class's threshold in the bundle's operating point
  (:mod:`retinaedge.runtime.operating_point`), or at or above :data:`DEFAULT_FINDING_SCORE` when the
  bundle has none;
- no new finding appears (a candidate finding matching no FP32 finding);
- where annotated DICOM was evaluated, the mean AP50 drops by at most :data:`MAX_AP50_DROP`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from retinaedge.runtime.detections import ImageDetections
from retinaedge.runtime.matching import match_detections
from retinaedge.runtime.operating_point import OperatingPoint

GATE_IOU_MIN = 0.5
MAX_AP50_DROP = 0.01
#: The score threshold of a finding for a bundle without an operating point.
DEFAULT_FINDING_SCORE = 0.5


def findings_only(
    det: ImageDetections, class_names: Sequence[str], point: OperatingPoint | None
) -> ImageDetections:
    """The detections of ``det`` that are findings (see the module docstring), in the same order."""
    if point is None:
        keep = det.scores >= DEFAULT_FINDING_SCORE
    else:
        thresholds = np.array(
            [point.score_thresholds.get(name, np.inf) for name in class_names] + [np.inf], np.float64
        )
        labels = np.clip(det.labels, 0, len(class_names))  # an unknown label is never a finding
        keep = det.scores.astype(np.float64) >= thresholds[labels]
    return ImageDetections(det.boxes[keep], det.scores[keep], det.labels[keep])


@dataclass
class GateResult:
    """The gate's figures for one precision. ``frames``: images compared; ``reference_findings``: FP32
    findings on them; ``kept``: found again; ``lost``/``new``: those not (label, score, box, frame);
    ``max_score_delta``: largest score change of a kept finding; ``map50``: ``{fp32, candidate, drop}``
    when annotated DICOM was evaluated; ``ms_per_frame``: measured on the golden frames (noisy);
    ``reasons``: why it failed (empty when it passed)."""

    precision: str
    frames: int = 0
    reference_findings: int = 0
    kept: int = 0
    lost: list[dict[str, Any]] = field(default_factory=list)
    new: list[dict[str, Any]] = field(default_factory=list)
    max_score_delta: float = 0.0
    map50: dict[str, float | None] | None = None
    ms_per_frame: float | None = None
    reasons: list[str] = field(default_factory=list)
    #: Fingerprint of what was compared (:func:`~.gating.gate_inputs`); ``reused``: the figures are those
    #: recorded in the cache entry for the same inputs, not measured again at this start.
    inputs: str = ""
    reused: bool = False
    #: The FP32 re-check (:mod:`.recheck`): its band (0: none) and the share of the gate's frames it
    #: re-ran; with a re-check, ``ms_per_frame`` is the reduced precision's plus that share of FP32's.
    recheck_band: float = 0.0
    recheck_rate: float | None = None
    reduced_ms_per_frame: float | None = None

    @property
    def passed(self) -> bool:
        return not self.reasons

    def summary(self) -> str:
        """One line: ``int8: 7 of 8 FP32 findings kept, 1 new; AP50 drop 0.02``."""
        text = f"{self.precision}: {self.kept} of {self.reference_findings} FP32 findings kept, {len(self.new)} new"
        if self.recheck_band > 0:
            rate = "" if self.recheck_rate is None else f", {100 * self.recheck_rate:.1f} % of frames"
            text += f", fp32 re-check within {self.recheck_band} of a threshold{rate}"
        if self.map50 is not None:
            text += f", AP50 drop {self.map50['drop']}"
        return text + (f" (failed: {'; '.join(self.reasons)})" if self.reasons else " (passed)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "passed": self.passed,
            "frames": self.frames,
            "reference_findings": self.reference_findings,
            "kept": self.kept,
            "lost_count": len(self.lost),
            "new_count": len(self.new),
            "lost": self.lost[:20],
            "new": self.new[:20],
            "max_score_delta_kept": round(self.max_score_delta, 6),
            "map50": self.map50,
            "ms_per_frame": self.ms_per_frame,
            "reasons": list(self.reasons),
            "criteria": {"iou_min": GATE_IOU_MIN, "max_ap50_drop": MAX_AP50_DROP},
            "inputs": self.inputs,
            "reused": self.reused,
            "recheck_band": self.recheck_band,
            "recheck_rate": None if self.recheck_rate is None else round(self.recheck_rate, 4),
            "reduced_ms_per_frame": self.reduced_ms_per_frame,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> GateResult:
        """Inverse of :meth:`to_dict` (``lost``/``new`` keep their recorded counts; at most 20 listed)."""
        lost, new = list(doc["lost"]), list(doc["new"])
        lost += [{}] * (int(doc.get("lost_count", len(lost))) - len(lost))
        new += [{}] * (int(doc.get("new_count", len(new))) - len(new))
        return cls(
            str(doc["precision"]),
            frames=int(doc["frames"]),
            reference_findings=int(doc["reference_findings"]),
            kept=int(doc["kept"]),
            lost=lost,
            new=new,
            max_score_delta=float(doc.get("max_score_delta_kept", 0.0)),
            map50=doc.get("map50"),
            ms_per_frame=doc.get("ms_per_frame"),
            reasons=[str(r) for r in doc["reasons"]],
            inputs=str(doc.get("inputs", "")),
            recheck_band=float(doc.get("recheck_band") or 0.0),
            recheck_rate=doc.get("recheck_rate"),
            reduced_ms_per_frame=doc.get("reduced_ms_per_frame"),
        )


def compare_findings(
    precision: str,
    reference: Sequence[ImageDetections],
    candidate: Sequence[ImageDetections],
    class_names: Sequence[str],
    point: OperatingPoint | None,
) -> GateResult:
    """Match FP32 findings with candidate findings frame by frame (same label, IoU >= 0.5, greedy in
    decreasing FP32 score); a lost or new finding fails the gate."""
    result = GateResult(precision, frames=len(reference))
    for frame, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        ref_f = findings_only(ref, class_names, point)
        cand_f = findings_only(cand, class_names, point)
        report = match_detections(ref_f, cand_f, iou_min=GATE_IOU_MIN, score_tol=1.0)
        result.reference_findings += report.reference
        result.kept += report.matched
        if report.matched:
            result.max_score_delta = max(result.max_score_delta, report.max_score_delta)
        result.lost += [{**d, "frame": frame} for d in report.unmatched_reference]
        result.new += [{**d, "frame": frame} for d in report.unmatched_candidate]
    if result.lost:
        result.reasons.append(f"{len(result.lost)} of {result.reference_findings} FP32 findings lost")
    if result.new:
        result.reasons.append(f"{len(result.new)} new finding(s)")
    return result


def add_ap50(result: GateResult, fp32_map50: float | None, candidate_map50: float | None) -> None:
    """Record the AP50 figures on annotated DICOM; a drop above :data:`MAX_AP50_DROP` fails the gate."""
    drop = None if fp32_map50 is None or candidate_map50 is None else round(fp32_map50 - candidate_map50, 4)
    result.map50 = {"fp32": fp32_map50, "candidate": candidate_map50, "drop": drop}
    if drop is not None and drop > MAX_AP50_DROP:
        result.reasons.append(f"mean AP50 dropped by {drop} (limit {MAX_AP50_DROP})")
