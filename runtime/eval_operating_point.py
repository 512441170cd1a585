"""``retinaedge eval``'s operating point: the sensitivity and precision per class at the bundle's
thresholds, or at thresholds chosen on the evaluated files, optionally written into the bundle.

The counting and the choice are :mod:`retinaedge.runtime.operating_point`; this module adapts the
evaluation's frames and annotations to them, builds the report section and writes ``manifest.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retinaedge.runtime.evaluate import Annotation, EvalFrame
from retinaedge.runtime.manifest import Manifest
from retinaedge.runtime.manifest_file import write_manifest
from retinaedge.runtime.operating_point import (
    OperatingPoint,
    Outcomes,
    ScoredBox,
    TruthBox,
    choose,
    counts_at,
    outcomes,
)


def evaluation_outcomes(
    frames: Sequence[EvalFrame], annotations: Sequence[Annotation], class_names: Sequence[str]
) -> Outcomes:
    """Every detection's outcome (true or false positive, or ignored) per class, at IoU 0.5."""
    dets = [
        ScoredBox(
            (f.sop_instance_uid, f.index),
            class_names[d.class_id] if 0 <= d.class_id < len(class_names) else str(d.class_id),
            float(d.score),
            (float(d.box[0]), float(d.box[1]), float(d.box[2]), float(d.box[3])),
        )
        for f in frames
        if f.sop_instance_uid
        for d in f.detections
    ]
    truths = [TruthBox((a.sop_instance_uid, a.frame), a.label, a.box, a.difficult) for a in annotations]
    return outcomes(dets, truths, class_names)


def operating_point_report(
    manifest: Manifest,
    frames: Sequence[EvalFrame],
    annotations: Sequence[Annotation],
    classes: Sequence[str],
    *,
    rule: str | None,
    files: int,
) -> tuple[dict[str, Any] | None, OperatingPoint | None]:
    """The report's ``operating_point`` section and, with ``rule``, the operating point chosen by it
    on these files (thresholds for the evaluated ``classes``; the others keep the bundle's own, or the
    model's score threshold). Without ``rule`` and without a bundle operating point: ``(None, None)``."""
    result = evaluation_outcomes(frames, annotations, manifest.class_names)
    current = manifest.operating_point
    if rule is None:
        if current is None:
            return None, None
        section = {
            "source": "bundle",
            "method": current.method,
            "classes": {c: counts_at(result, c, current.score_thresholds[c]) for c in classes},
        }
        return section, None
    floor = manifest.postprocess.score_thresh
    chosen = choose(result, classes, rule, floor)
    thresholds = {
        c: chosen.get(c, current.score_thresholds[c] if current is not None else floor)
        for c in manifest.class_names
    }
    boxes = sum(result.positives[c] for c in classes)
    method = (
        f"{rule} per class at IoU 0.5 on {len(frames)} frame(s) of {files} file(s) with {boxes} "
        f"annotated box(es) (retinaedge eval)"
    )
    measured = {c: counts_at(result, c, thresholds[c]) for c in classes}
    point = OperatingPoint(thresholds, method, measured)
    point.validate(manifest.class_names)
    return {"source": "chosen", "rule": rule, "method": method, "classes": measured}, point


def write_operating_point(bundle_dir: Path, manifest: Manifest, point: OperatingPoint) -> Path:
    """Write ``point`` into the bundle's ``manifest.json`` (:func:`~.manifest_file.write_manifest`:
    ``model.onnx`` and its sha256 are unchanged). Returns the file written."""
    return write_manifest(bundle_dir, manifest.with_operating_point(point), "operating point")
