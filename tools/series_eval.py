"""Lesion-level accuracy of 3D series findings against the raw per-slice detections (development tooling).

Runs a bundle over phantom studies written by ``tools/make_phantoms.py`` (their ``lesions.json`` gives
every tumour's kind, centre in patient coordinates, radii and the frames it appears on;
``ground_truth.json`` its box on each frame), then compares, at each ``--min-score`` (a number, or
``operating-point``: the detections the bundle's operating point makes findings, what the service links
by default):

- **raw per-slice detections** (what a client sees without series linking): a detection is a *hit* when
  its box overlaps a truth box of its class on its frame with IoU >= 0.5 (difficult boxes included: a cut
  through a tumour's pole is not a false alarm), else a *false detection*. A lesion is *found* when at
  least one hit lies on one of its frames (on a frame that two tumours of one kind share, the hit goes
  to the tumour whose centre is nearer the box centre in patient space);
- **3D findings** (``retinaedge.runtime.findings`` with that ``min_score``, the other linking parameters
  at their defaults): a finding *matches* a lesion of its class when its centroid lies within the
  lesion's largest radius + ``--margin-mm`` of the lesion's centre. Findings are taken by decreasing
  maximum score; each takes the nearest unmatched lesion it matches; one that only matches lesions
  already taken is a *duplicate*; one that matches none is a *false finding*. Duplicates are reported
  and also counted as false findings.

Reports per-lesion recall and false findings (or false detections) per series for both, overall and per
class, as JSON (``--out``) and as a Markdown table on stdout. Usage::

    .venv/bin/python tools/make_phantoms.py /tmp/heldout --seed 100000 --studies 20
    .venv/bin/python tools/series_eval.py --model models/demo --phantoms /tmp/heldout \
        --min-score operating-point 0.3 0.5
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.runtime.boxes import box_iou

log = logging.getLogger("series_eval")

HIT_IOU = 0.5


@dataclass(frozen=True)
class Lesion:
    """One true tumour: ``kind``, centre (LPS mm), largest radius (mm), frames ``(sop uid, frame)``."""

    kind: str
    center: tuple[float, float, float]
    radius: float
    frames: frozenset[tuple[str, int]]


@dataclass(frozen=True)
class FindingMatch:
    """Outcome of matching one series' findings: lesion indices found, duplicates, false findings."""

    found: set[int]
    duplicates: int
    false: int


def lesions_of(series: dict[str, Any]) -> list[Lesion]:
    """The :class:`Lesion` list of one ``lesions.json`` series entry."""
    return [
        Lesion(
            kind=str(lesion["kind"]),
            center=tuple(float(v) for v in lesion["center_lps_mm"]),  # type: ignore[arg-type]
            radius=float(max(lesion["radii_mm"])),
            frames=frozenset((a["sop_instance_uid"], int(a["frame"])) for a in lesion["appears_on"]),
        )
        for lesion in series["lesions"]
    ]


def match_findings(
    findings: Sequence[dict[str, Any]], lesions: Sequence[Lesion], margin_mm: float
) -> FindingMatch:
    """Match one series' findings (the JSON of :class:`~retinaedge.runtime.findings.Finding`) to its
    lesions (module docstring)."""
    found: set[int] = set()
    duplicates = false = 0
    for f in sorted(findings, key=lambda f: -float(f["max_score"])):
        centroid = np.asarray(f["centroid_lps_mm"], dtype=np.float64)
        near = [
            (float(np.linalg.norm(centroid - np.asarray(lesion.center))), i)
            for i, lesion in enumerate(lesions)
            if lesion.kind == f["label"]
            and np.linalg.norm(centroid - np.asarray(lesion.center)) <= lesion.radius + margin_mm
        ]
        free = sorted(d for d in near if d[1] not in found)
        if free:
            found.add(free[0][1])
        elif near:
            duplicates += 1
        else:
            false += 1
    return FindingMatch(found=found, duplicates=duplicates, false=false + duplicates)


def match_detections(
    detections: dict[tuple[str, int], list[tuple[str, float, tuple[float, float, float, float], np.ndarray]]],
    truth: dict[tuple[str, int], list[tuple[str, tuple[float, float, float, float]]]],
    lesions: Sequence[Lesion],
) -> tuple[set[int], int]:
    """Raw per-slice matching of one series (module docstring).

    ``detections``: frame -> ``(label, score, box, box centre in LPS mm (3,))`` already above the
    threshold; ``truth``: frame -> ``(label, box)``. Returns the lesion indices found and the number of
    false detections.
    """
    found: set[int] = set()
    false = 0
    for frame, dets in detections.items():
        boxes = truth.get(frame, [])
        for label, _score, box, centre in dets:
            if not any(t_label == label and box_iou(box, t_box) >= HIT_IOU for t_label, t_box in boxes):
                false += 1
                continue
            owners = [
                i for i, lesion in enumerate(lesions) if lesion.kind == label and frame in lesion.frames
            ]
            if owners:
                found.add(
                    min(owners, key=lambda i: float(np.linalg.norm(centre - np.asarray(lesions[i].center))))
                )
    return found, false


#: ``--min-score`` value that stands for the bundle's operating point.
OPERATING_POINT = "operating-point"


def _kept(d: Any, t: float | str) -> bool:
    """Whether detection ``d`` counts at threshold ``t`` (a score, or :data:`OPERATING_POINT`)."""
    return bool(d.finding) if t == OPERATING_POINT else bool(d.score >= float(t))


def evaluate(model: Path, phantoms: Path, scores: Sequence[float | str], margin_mm: float) -> dict[str, Any]:
    """Run ``model`` over every series of ``phantoms`` once and match at each threshold in ``scores``."""
    from retinaedge.runtime.detector import Detector
    from retinaedge.runtime.findings import LinkParams, analyse_series
    from retinaedge.runtime.slices import read_frames

    doc = json.loads((phantoms / "lesions.json").read_text())
    truth_doc = json.loads((phantoms / "ground_truth.json").read_text())
    truth: dict[tuple[str, int], list[tuple[str, tuple[float, float, float, float]]]] = {}
    for a in truth_doc["annotations"]:
        truth.setdefault((a["sop_instance_uid"], int(a["frame"])), []).append((a["label"], tuple(a["box"])))
    per_series = []
    with Detector.open(model) as det:
        for series in doc["series"]:
            files = [phantoms / inst["file"] for inst in series["instances"]]
            frames = [f for p in files for f in read_frames(p)]
            geometry = {f.key: f.geometry for f in frames}
            results = [det.detect(p) for p in files]
            detections = {(r.sop_instance_uid, fr.index): fr.detections for r in results for fr in r.frames}
            per_series.append((series, frames, detections, geometry))
        model_name = det.bundle.manifest.name
    classes = sorted({str(lesion["kind"]) for s in doc["series"] for lesion in s["lesions"]})
    report: dict[str, Any] = {
        "model": model_name,
        "phantoms": str(phantoms),
        "series": len(per_series),
        "lesions": sum(len(s["lesions"]) for s in doc["series"]),
        "margin_mm": margin_mm,
        "hit_iou": HIT_IOU,
        "thresholds": [],
    }
    for t in scores:
        params = LinkParams(min_score=0.0 if t == OPERATING_POINT else float(t))
        tally = {c: {"lesions": 0, "found_raw": 0, "found_3d": 0} for c in classes}
        false_raw = false_3d = duplicates = findings_total = 0
        for series, frames, detections, geometry in per_series:
            lesions = lesions_of(series)
            kept = {key: [d for d in dets if _kept(d, t)] for key, dets in detections.items()}
            (linked,) = analyse_series(frames, kept, params)
            findings = [f.to_json() for f in linked.findings]
            findings_total += len(findings)
            m3 = match_findings(findings, lesions, margin_mm)
            raw = {
                key: [(d.label, d.score, d.box, _centre(geometry[key], d.box)) for d in dets]
                for key, dets in kept.items()
            }
            found_raw, false = match_detections(raw, truth, lesions)
            false_raw += false
            false_3d += m3.false
            duplicates += m3.duplicates
            for i, lesion in enumerate(lesions):
                tally[lesion.kind]["lesions"] += 1
                tally[lesion.kind]["found_raw"] += i in found_raw
                tally[lesion.kind]["found_3d"] += i in m3.found
        n = len(per_series)
        total = {k: sum(c[k] for c in tally.values()) for k in ("lesions", "found_raw", "found_3d")}
        report["thresholds"].append(
            {
                "min_score": t,
                "raw": {
                    "recall": _ratio(total["found_raw"], total["lesions"]),
                    "false_per_series": round(false_raw / n, 3),
                    "false": false_raw,
                },
                "findings_3d": {
                    "recall": _ratio(total["found_3d"], total["lesions"]),
                    "false_per_series": round(false_3d / n, 3),
                    "false": false_3d,
                    "duplicates": duplicates,
                    "findings": findings_total,
                },
                "per_class": {
                    c: {
                        "lesions": v["lesions"],
                        "recall_raw": _ratio(v["found_raw"], v["lesions"]),
                        "recall_3d": _ratio(v["found_3d"], v["lesions"]),
                    }
                    for c, v in tally.items()
                },
            }
        )
    return report


def _centre(geometry: Any, box: Sequence[float]) -> np.ndarray:
    """Box centre in LPS mm ``(3,)`` (zeros when the frame has no geometry)."""
    if geometry is None:
        return np.zeros(3)
    return np.asarray(geometry.edge_to_patient(np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])))


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 3) if b else None


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (one row per threshold)."""
    lines = [
        f"{report['series']} series, {report['lesions']} lesions ({report['model']})",
        "",
        "| min score | raw recall | raw false / series | 3D recall | 3D false / series | 3D duplicates |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["thresholds"]:
        raw, f3 = row["raw"], row["findings_3d"]
        lines.append(
            f"| {row['min_score']} | {raw['recall']} | {raw['false_per_series']} | {f3['recall']} | "
            f"{f3['false_per_series']} | {f3['duplicates']} |"
        )
    return "\n".join(lines)


def _threshold(text: str) -> float | str:
    if text == OPERATING_POINT:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a score or {OPERATING_POINT}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="model bundle directory")
    p.add_argument("--phantoms", type=Path, required=True, help="output directory of make_phantoms.py")
    p.add_argument(
        "--min-score",
        type=_threshold,
        nargs="+",
        default=[OPERATING_POINT, 0.3, 0.5],
        help=f"thresholds to report: scores, or {OPERATING_POINT} (the bundle's findings)",
    )
    p.add_argument("--margin-mm", type=float, default=5.0, help="matching margin beyond the lesion radius")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lesions.json", "ground_truth.json"):
        if not (args.phantoms / name).is_file():
            p.error(f"{args.phantoms / name} does not exist: is --phantoms a make_phantoms.py output?")
    report = evaluate(args.model, args.phantoms, args.min_score, args.margin_mm)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    sys.stdout.write(markdown(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
