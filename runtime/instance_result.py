"""What detection returns: boxes per frame in the frame's own pixel grid, and the instance around them.

:func:`frame_result` turns one image's model outputs (:class:`~.detections.ImageDetections`, model-input
pixels) into a :class:`FrameResult` (frame pixels); :func:`instance_result` puts the frames of one
instance together. The sequential :class:`~.detector.Detector` and the service's batching pipeline both
build their results here, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from retinaedge.runtime.detections import ImageDetections
from retinaedge.runtime.dicomio import ImageInfo
from retinaedge.runtime.geometry import Letterbox
from retinaedge.runtime.manifest import Manifest
from retinaedge.runtime.operating_point import OperatingPoint, findings_flags


@dataclass(frozen=True)
class Detection:
    """One box in the original frame's pixel grid: x1, y1, x2, y2 (column, row), edges in pixels.

    ``finding``: the score is at or above the model's operating point for the class
    (:mod:`retinaedge.runtime.operating_point`); every detection is one when the bundle has none."""

    label: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]
    finding: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "class_id": self.class_id,
            "score": round(self.score, 6),
            "box": [round(v, 3) for v in self.box],
            "finding": self.finding,
        }


@dataclass(frozen=True)
class FrameResult:
    """Detections of frame ``index`` (0-based, in the instance's frame order). ``precision``: set only when
    this frame's detections were computed at another precision than the instance's (``"fp32"``: re-run
    by a reduced-precision backend's re-check); None: the instance's ``precision``."""

    index: int
    detections: list[Detection]
    voi: str = ""
    precision: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "detections": [d.to_json() for d in self.detections]}
        if self.precision is not None:
            out["precision"] = self.precision
        return out


@dataclass(frozen=True)
class InstanceResult:
    """The ``/v1/detect`` response body (docs/integration.md)."""

    sop_instance_uid: str
    model_name: str
    model_sha256: str
    frames: list[FrameResult]
    timings_ms: dict[str, float]
    image: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "model": {"name": self.model_name, "sha256": self.model_sha256},
            "image": self.image,
            "frames": [f.to_json() for f in self.frames],
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }


def frame_result(
    classes: Sequence[str],
    index: int,
    rule: str,
    letterbox: Letterbox,
    dets: ImageDetections,
    point: OperatingPoint | None = None,
) -> FrameResult:
    """One image's detections (model-input pixels) -> :class:`FrameResult` in the frame's pixels, each
    marked a finding or not by the operating point ``point`` (None: every detection is one)."""
    frame_boxes = letterbox.to_frame(dets.boxes)
    labels = [classes[int(c)] if 0 <= int(c) < len(classes) else str(int(c)) for c in dets.labels.tolist()]
    scores = [float(s) for s in dets.scores.tolist()]
    flags = findings_flags(labels, scores, point)
    return FrameResult(
        index=index,
        voi=rule,
        precision="fp32" if dets.rechecked else None,
        detections=[
            Detection(
                label=label,
                class_id=int(c),
                score=score,
                box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
                finding=flag,
            )
            for b, label, score, c, flag in zip(
                frame_boxes.tolist(), labels, scores, dets.labels.tolist(), flags, strict=True
            )
        ],
    )


def instance_result(
    manifest: Manifest, info: ImageInfo, frames: list[FrameResult], timings_ms: dict[str, float]
) -> InstanceResult:
    """The result of one instance: its frames (in frame order) and the header facts clients see."""
    return InstanceResult(
        sop_instance_uid=info.sop_instance_uid,
        model_name=manifest.name,
        model_sha256=str(manifest.model_sha256),
        frames=frames,
        timings_ms=timings_ms,
        image={
            "rows": info.rows,
            "columns": info.columns,
            "frames": info.frames,
            "photometric_interpretation": info.photometric,
            "transfer_syntax": info.transfer_syntax,
        },
    )
