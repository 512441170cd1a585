"""2D detections on the slices of a consistent :class:`~.slices.Stack` -> 3D findings in patient space.

Linking rule (per class, slice by slice in stack order): a detection scoring at least ``min_score`` joins
a finding whose last detection is at most ``max_gap`` slices before it (``max_gap`` slices skipped;
slices the stack records as missing count as skipped) when the two boxes overlap: IoU >= ``link_iou``,
or the centre of the smaller box lies inside the larger one (so a lesion's small pole still links to
its large neighbouring cross-section). Boxes are compared in pixels, which a consistent stack makes
one grid for all slices (same orientation, spacing, matrix and in-plane position). Candidate pairs are
taken greedily by decreasing IoU, one detection per finding per slice; an unlinked detection starts a
new finding. Findings with fewer than ``min_slices`` detected slices are dropped.

Quantities (LPS mm; a box is extruded along the normal into a slab of the stack's median spacing,
:attr:`~.slices.Stack.slab_mm`):

- ``bbox_lps_mm``: the axis-aligned patient-space box around all corners of all slabs;
- ``centroid_lps_mm``: the box centres in patient space, weighted by box area;
- ``volume_mm3``: box-based, ``integral of area(z) dz``: box areas linearly interpolated between the
  finding's slices along the normal (across bridged gaps too) plus half a slab beyond the first and last
  slice. For contiguous, evenly spaced slices this is ``sum(box area in mm^2) * spacing``. It is the
  volume of the boxes, an upper bound for the lesion's; ``volume_ellipse_mm3 = pi/4 * volume_mm3`` uses
  the ellipse inscribed in each box instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from retinaedge.runtime.boxes import box_iou, pairwise_iou
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.slices import DEFAULT_TOLERANCES, FrameRef, Stack, Tolerances, group_series

log = logging.getLogger(__name__)


class DetectionLike(Protocol):
    """What linking needs of a 2D detection (:class:`~.detector.Detection` is one)."""

    @property
    def label(self) -> str: ...

    @property
    def class_id(self) -> int: ...

    @property
    def score(self) -> float: ...

    @property
    def box(self) -> tuple[float, float, float, float]: ...


DetectionMap = Mapping[tuple[str, int], Sequence[DetectionLike]]


#: ``min_score`` of a bundle without an operating point, whose detections are all findings down to the
#: model's own score threshold (0.05 for torchvision's RetinaNet): what series linking used before bundles
#: had an operating point.
FALLBACK_MIN_SCORE = 0.5


def default_min_score(has_operating_point: bool) -> float:
    """The ``min_score`` where none is given: 0 for a bundle with an operating point (the callers link its
    findings only, so the operating point is the floor), :data:`FALLBACK_MIN_SCORE` for one without."""
    return 0.0 if has_operating_point else FALLBACK_MIN_SCORE


@dataclass(frozen=True)
class LinkParams:
    """``min_score``: detections below are ignored (callers pass findings only, the detections at or above
    the model's operating point, so this is a further floor; :func:`default_min_score`); ``min_slices``: fewest detected slices a finding
    needs; ``link_iou``: IoU that links boxes on neighbouring slices; ``max_gap``: most slices a finding
    may skip between two detections."""

    min_score: float = FALLBACK_MIN_SCORE
    min_slices: int = 2
    link_iou: float = 0.2
    max_gap: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(f"min score must be in [0, 1], got {self.min_score}")
        if self.min_slices < 1:
            raise ConfigError(f"min slices must be >= 1, got {self.min_slices}")
        if not 0.0 < self.link_iou <= 1.0:
            raise ConfigError(f"link IoU must be in (0, 1], got {self.link_iou}")
        if self.max_gap < 0:
            raise ConfigError(f"max gap must be >= 0, got {self.max_gap}")

    def to_json(self) -> dict[str, Any]:
        return {
            "min_score": self.min_score,
            "min_slices": self.min_slices,
            "link_iou": self.link_iou,
            "max_gap": self.max_gap,
        }


@dataclass(frozen=True)
class DetectionRef:
    """A 2D detection a finding came from: frame ``frame_index`` of ``sop_instance_uid``, stack slice
    ``slice`` at ``position_mm`` along the normal; ``box`` in that frame's pixel-edge coordinates."""

    sop_instance_uid: str
    frame_index: int
    slice: int
    position_mm: float
    box: tuple[float, float, float, float]
    score: float

    def to_json(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "frame": self.frame_index,
            "slice": self.slice,
            "position_mm": round(self.position_mm, 4),
            "box": [round(float(v), 3) for v in self.box],
            "score": round(self.score, 6),
        }


@dataclass(frozen=True)
class Finding:
    """One lesion candidate across slices (see the module docstring for every quantity).

    ``slices``: slices with a detection; ``extent_slices``: ``last_slice - first_slice + 1`` (stack
    indices; bridged gaps included); ``extent_mm``: length along the normal including half a slab at
    each end. Vectors are LPS mm ``(3,)``.
    """

    label: str
    class_id: int
    detections: list[DetectionRef]
    first_slice: int
    last_slice: int
    first_position_mm: float
    last_position_mm: float
    extent_mm: float
    bbox_min_mm: tuple[float, float, float]
    bbox_max_mm: tuple[float, float, float]
    centroid_mm: tuple[float, float, float]
    volume_mm3: float
    max_score: float
    mean_score: float

    @property
    def slices(self) -> int:
        return len(self.detections)

    @property
    def extent_slices(self) -> int:
        return self.last_slice - self.first_slice + 1

    @property
    def volume_ellipse_mm3(self) -> float:
        return math.pi / 4.0 * self.volume_mm3

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "class_id": self.class_id,
            "slices": self.slices,
            "extent_slices": self.extent_slices,
            "first_slice": self.first_slice,
            "last_slice": self.last_slice,
            "first_position_mm": round(self.first_position_mm, 4),
            "last_position_mm": round(self.last_position_mm, 4),
            "extent_mm": round(self.extent_mm, 4),
            "bbox_lps_mm": {"min": _round(self.bbox_min_mm), "max": _round(self.bbox_max_mm)},
            "centroid_lps_mm": _round(self.centroid_mm),
            "volume_mm3": round(self.volume_mm3, 3),
            "volume_ellipse_mm3": round(self.volume_ellipse_mm3, 3),
            "max_score": round(self.max_score, 6),
            "mean_score": round(self.mean_score, 6),
            "detections": [d.to_json() for d in self.detections],
        }


def _round(values: Sequence[float], digits: int = 4) -> list[float]:
    return [round(float(v), digits) + 0.0 for v in values]


def _centre_inside(small: Sequence[float], large: Sequence[float]) -> bool:
    cx, cy = (small[0] + small[2]) / 2.0, (small[1] + small[3]) / 2.0
    return large[0] <= cx <= large[2] and large[1] <= cy <= large[3]


def linkable(a: Sequence[float], b: Sequence[float], link_iou: float) -> tuple[bool, float]:
    """Whether boxes ``a`` and ``b`` on neighbouring slices link, and their IoU (the greedy order)."""
    iou = box_iou(a, b)
    if iou >= link_iou:
        return True, iou
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    small, large = (a, b) if area_a <= area_b else (b, a)
    return (iou > 0.0 and _centre_inside(small, large)), iou


def linkable_pairs(
    last: Sequence[Sequence[float]], boxes: Sequence[Sequence[float]], link_iou: float
) -> list[tuple[float, int, int]]:
    """:func:`linkable` for every (track's last box, new box) at once -> ``(-iou, track, box)`` of each
    pair that links (all pairs in one IoU matrix, float64 as :func:`linkable`; same results)."""
    if not len(last) or not len(boxes):
        return []
    a = np.asarray(last, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    iou = pairwise_iou(a, b)
    links = iou >= link_iou
    maybe = ~links & (iou > 0.0)  # the fallback: the smaller box's centre inside the larger one
    if maybe.any():
        ti, di = np.nonzero(maybe)
        pa, pb = a[ti], b[di]
        area_a = (pa[:, 2] - pa[:, 0]) * (pa[:, 3] - pa[:, 1])
        area_b = (pb[:, 2] - pb[:, 0]) * (pb[:, 3] - pb[:, 1])
        a_small = (area_a <= area_b)[:, None]
        small, large = np.where(a_small, pa, pb), np.where(a_small, pb, pa)
        cx, cy = (small[:, 0] + small[:, 2]) / 2.0, (small[:, 1] + small[:, 3]) / 2.0
        inside = (large[:, 0] <= cx) & (cx <= large[:, 2]) & (large[:, 1] <= cy) & (cy <= large[:, 3])
        links[ti[inside], di[inside]] = True
    return [(-float(iou[t, d]), int(t), int(d)) for t, d in zip(*np.nonzero(links), strict=True)]


@dataclass
class _Track:
    class_id: int
    label: str
    members: list[tuple[int, DetectionLike]] = field(default_factory=list)  # (slice, detection)

    @property
    def last(self) -> tuple[int, DetectionLike]:
        return self.members[-1]


def link_findings(stack: Stack, detections: DetectionMap, params: LinkParams | None = None) -> list[Finding]:
    """Findings of one stack. ``detections`` maps ``(sop_instance_uid, frame_index)`` to that frame's
    detections; frames without an entry have none. An inconsistent stack has no findings.

    Sorted by decreasing ``max_score``, then first slice.
    """
    params = params or LinkParams()
    if not stack.consistent:
        log.info("stack inconsistent: no findings linked")
        return []
    virtual = stack.virtual_indices()
    tracks: list[_Track] = []
    for k, frame in enumerate(stack.frames):
        kept = sorted(
            (d for d in detections.get(frame.key, ()) if d.score >= params.min_score),
            key=lambda d: (-d.score, d.class_id, tuple(d.box)),
        )
        for class_id in sorted({d.class_id for d in kept}):
            dets = [d for d in kept if d.class_id == class_id]
            open_tracks = [
                t
                for t in tracks
                if t.class_id == class_id and virtual[k] - virtual[t.last[0]] - 1 <= params.max_gap
            ]
            pairs = linkable_pairs(
                [t.last[1].box for t in open_tracks], [d.box for d in dets], params.link_iou
            )
            used_t, used_d = set(), set()
            for _, ti, di in sorted(pairs):
                if ti in used_t or di in used_d:
                    continue
                open_tracks[ti].members.append((k, dets[di]))
                used_t.add(ti)
                used_d.add(di)
            for di, d in enumerate(dets):
                if di not in used_d:
                    tracks.append(_Track(class_id, d.label, [(k, d)]))
    findings = [_finding(stack, t) for t in tracks if len(t.members) >= params.min_slices]
    log.info(
        "linked %d track(s) into %d finding(s) (%d below %d slices)",
        len(tracks),
        len(findings),
        len(tracks) - len(findings),
        params.min_slices,
    )
    return sorted(findings, key=lambda f: (-f.max_score, f.first_slice, f.class_id))


def _finding(stack: Stack, track: _Track) -> Finding:
    """Geometry and scores of one linked track (module docstring)."""
    n = np.asarray(stack.normal)
    half = stack.slab_mm / 2.0
    corners, centres, areas, positions, refs = [], [], [], [], []
    for k, d in track.members:
        frame: FrameRef = stack.frames[k]
        g = frame.geometry
        assert g is not None and frame.position_mm is not None  # a consistent stack has every plane
        x1, y1, x2, y2 = (float(v) for v in d.box)
        quad = g.edge_to_patient(np.array([[x1, y1], [x2, y1], [x1, y2], [x2, y2]]))  # (4, 3)
        corners += [quad - half * n, quad + half * n]
        centres.append(g.edge_to_patient(np.array([(x1 + x2) / 2.0, (y1 + y2) / 2.0])))
        areas.append(g.box_area_mm2(d.box))
        positions.append(frame.position_mm)
        refs.append(
            DetectionRef(
                frame.sop_instance_uid,
                frame.frame_index,
                k,
                frame.position_mm,
                (x1, y1, x2, y2),
                float(d.score),
            )
        )
    pts = np.concatenate(corners)  # (8 * D, 3)
    a = np.asarray(areas)  # (D,) mm^2
    z = np.asarray(positions)  # (D,) mm along the normal, ascending
    volume = float(np.sum((a[1:] + a[:-1]) / 2.0 * np.diff(z))) + half * float(a[0] + a[-1])
    weights = a if a.sum() > 0 else np.ones_like(a)
    centroid = (np.asarray(centres) * weights[:, None]).sum(axis=0) / weights.sum()
    scores = [r.score for r in refs]
    lo, hi, c = pts.min(axis=0), pts.max(axis=0), centroid
    return Finding(
        label=track.label,
        class_id=track.class_id,
        detections=refs,
        first_slice=refs[0].slice,
        last_slice=refs[-1].slice,
        first_position_mm=refs[0].position_mm,
        last_position_mm=refs[-1].position_mm,
        extent_mm=refs[-1].position_mm - refs[0].position_mm + 2.0 * half,
        bbox_min_mm=(float(lo[0]), float(lo[1]), float(lo[2])),
        bbox_max_mm=(float(hi[0]), float(hi[1]), float(hi[2])),
        centroid_mm=(float(c[0]), float(c[1]), float(c[2])),
        volume_mm3=volume,
        max_score=max(scores),
        mean_score=float(np.mean(scores)),
    )


@dataclass(frozen=True)
class SeriesResult:
    """One series: its stack, findings, and how much went in (instances, frames, detections used)."""

    stack: Stack
    findings: list[Finding]
    instances: int
    detections_considered: int
    params: LinkParams

    def to_json(self) -> dict[str, Any]:
        """The object ``retinaedge detect --series`` prints per series."""
        return {
            "series_instance_uid": self.stack.series_uid,
            "frame_of_reference_uid": self.stack.frame_of_reference_uid,
            "instances": self.instances,
            "frames": len(self.stack.frames),
            "detections_considered": self.detections_considered,
            "parameters": self.params.to_json(),
            "stack": self.stack.to_json(),
            "findings": [{"id": i + 1, **f.to_json()} for i, f in enumerate(self.findings)],
        }


def analyse_series(
    frames: Sequence[FrameRef],
    detections: DetectionMap,
    params: LinkParams | None = None,
    tolerances: Tolerances = DEFAULT_TOLERANCES,
) -> list[SeriesResult]:
    """Group ``frames`` into series (:func:`~.slices.group_series`) and link each one's detections."""
    params = params or LinkParams()
    out = []
    for stack in group_series(frames, tolerances):
        findings = link_findings(stack, detections, params)
        considered = sum(
            1 for f in stack.frames for d in detections.get(f.key, ()) if d.score >= params.min_score
        )
        out.append(
            SeriesResult(
                stack=stack,
                findings=findings,
                instances=len({f.sop_instance_uid for f in stack.frames}),
                detections_considered=considered,
                params=params,
            )
        )
    return out
