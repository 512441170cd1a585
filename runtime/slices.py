"""Frames -> series -> slice stacks ordered along the slice normal, from DICOM plane geometry alone.

Pure functions over pydicom header datasets (no pixel data is touched). Every frame's plane comes from
the top-level Image Plane module of a single-frame instance (PS3.3 C.7.6.2) or from the per-frame /
shared functional groups of an enhanced or legacy-converted multi-frame instance (Plane Position,
Plane Orientation and Pixel Measures Sequences, PS3.3 C.7.6.16.2.3 / .4 / .1).

Coordinates are the patient coordinate system (LPS, mm). Per PS3.3 C.7.6.2.1.1, the centre of pixel
(row r, column c) is ``IPP + c * col_spacing * row_dir + r * row_spacing * col_dir`` where ``row_dir``
(Image Orientation (Patient) values 1-3) is the direction of increasing column index, ``col_dir``
(values 4-6) the direction of increasing row index and Pixel Spacing is ``[row spacing, column spacing]``
(``row spacing`` = distance between rows, along ``col_dir``). Detection boxes use continuous pixel-edge
coordinates (pixel (r, c) covers ``[c, c+1) x [r, r+1)``), so the edge coordinate ``x`` is the
continuous column index ``x - 0.5``: :meth:`PlaneGeometry.edge_to_patient`.

Frames are ordered by ``dot(IPP, n)``, ``n = row_dir x col_dir``, never by Instance Number. A group of
frames that is not one regular stack (mixed orientations, pixel spacing or matrix, positions off the
normal line, two frames at one position, no geometry) is reported as inconsistent with its reasons,
never forced into an order; uneven spacing and missing slices are recorded but allowed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.multival import MultiValue
from retinaedge.runtime.dicomio import DEFAULT_LIMITS, Limits, open_dicom
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.preprocess import _group_item

log = logging.getLogger(__name__)

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class Tolerances:
    """When frames still form one stack.

    ``orientation``: largest difference of any direction cosine between frames (unitless; 1e-3 is about
    0.06 degrees); ``pixel_spacing_mm``: largest Pixel Spacing difference; ``in_plane_mm``: largest offset
    of a frame's IPP from the line through the reference IPP along the normal; ``duplicate_mm``: two
    frames closer than this along the normal share a position; ``uneven_rel``/``uneven_abs_mm``: a spacing
    further than ``max(uneven_abs_mm, uneven_rel * median)`` from the median is uneven; ``missing_factor``:
    a gap above ``missing_factor * median`` spacing means missing slices.
    """

    orientation: float = 1e-3
    pixel_spacing_mm: float = 1e-3
    in_plane_mm: float = 0.1
    duplicate_mm: float = 0.01
    uneven_rel: float = 0.01
    uneven_abs_mm: float = 0.01
    missing_factor: float = 1.5


DEFAULT_TOLERANCES = Tolerances()


@dataclass(frozen=True)
class PlaneGeometry:
    """One frame's plane in patient space (LPS mm).

    ``position``: Image Position (Patient), the centre of pixel (0, 0); ``row_dir``/``col_dir``: unit
    direction cosines of increasing column / row index; ``pixel_spacing``: (row spacing, column
    spacing) in mm, as in Pixel Spacing.
    """

    position: Vec3
    row_dir: Vec3
    col_dir: Vec3
    pixel_spacing: tuple[float, float]

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal ``row_dir x col_dir``, shape ``(3,)``."""
        n = np.cross(np.asarray(self.row_dir), np.asarray(self.col_dir))
        return np.asarray(n / np.linalg.norm(n), dtype=np.float64)

    def pixel_to_patient(self, rc: np.ndarray) -> np.ndarray:
        """Continuous pixel-centre indices ``(..., 2)`` as (row, column) -> LPS mm ``(..., 3)``.

        PS3.3 C.7.6.2.1.1: ``IPP + c * col_spacing * row_dir + r * row_spacing * col_dir``.
        """
        rc = np.asarray(rc, dtype=np.float64)
        row_spacing, col_spacing = self.pixel_spacing
        return (
            np.asarray(self.position)
            + rc[..., 1:2] * col_spacing * np.asarray(self.row_dir)
            + rc[..., 0:1] * row_spacing * np.asarray(self.col_dir)
        )

    def edge_to_patient(self, xy: np.ndarray) -> np.ndarray:
        """Pixel-edge coordinates ``(..., 2)`` as (x = column, y = row) -> LPS mm ``(..., 3)``.

        The edge point ``(x, y)`` is the continuous pixel-centre index ``(row y - 0.5, column x - 0.5)``:
        a box ``[x1, x2)`` spans the centres of columns ``x1 + 0.5 .. x2 - 0.5`` and its edges lie half a
        pixel outside them, so mapping its corners gives the physical extent the box covers.
        """
        xy = np.asarray(xy, dtype=np.float64)
        return self.pixel_to_patient(np.stack([xy[..., 1] - 0.5, xy[..., 0] - 0.5], axis=-1))

    def box_area_mm2(self, box: Sequence[float]) -> float:
        """Area in mm^2 of a pixel-edge box (x1, y1, x2, y2) (row and column directions orthogonal)."""
        x1, y1, x2, y2 = (float(v) for v in box)
        return max(0.0, x2 - x1) * self.pixel_spacing[1] * max(0.0, y2 - y1) * self.pixel_spacing[0]


@dataclass(frozen=True)
class FrameRef:
    """One frame of one instance (``frame_index`` 0-based, in the instance's frame order).

    ``geometry`` is None when the plane cannot be read (``problem`` says why). ``position_mm``: the
    frame's coordinate along the slice normal, ``dot(IPP, n)`` (along the stack's normal once in a
    :class:`Stack`). ``slice_thickness_mm``: Slice Thickness when present.
    """

    sop_instance_uid: str
    frame_index: int
    series_uid: str
    frame_of_reference_uid: str
    rows: int
    columns: int
    geometry: PlaneGeometry | None
    position_mm: float | None = None
    slice_thickness_mm: float | None = None
    problem: str = ""

    @property
    def key(self) -> tuple[str, int]:
        """``(sop_instance_uid, frame_index)``: how detections are matched to this frame."""
        return (self.sop_instance_uid, self.frame_index)


@dataclass(frozen=True)
class Gap:
    """A gap between stack slices ``after_slice`` and ``after_slice + 1`` of ``gap_mm``, wider than the
    missing-slice threshold: about ``missing`` slices (``round(gap / median) - 1``, at least 1) absent."""

    after_slice: int
    gap_mm: float
    missing: int


@dataclass(frozen=True)
class Stack:
    """The frames of one series in order along ``normal`` (ascending ``position_mm``).

    ``spacings_mm``: the ``len(frames) - 1`` distances between neighbouring positions. ``consistent``
    is False when the frames do not form one stack (``problems`` say why; findings are then not
    computed). ``uneven_spacing`` and ``gaps`` (missing slices) are allowed and described in ``notes``.
    Vectors are LPS unit vectors; ``pixel_spacing`` is (row spacing, column spacing) in mm.
    """

    series_uid: str
    frame_of_reference_uid: str
    frames: list[FrameRef]
    normal: Vec3
    row_dir: Vec3
    col_dir: Vec3
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    spacings_mm: list[float]
    consistent: bool
    problems: list[str] = field(default_factory=list)
    uneven_spacing: bool = False
    gaps: list[Gap] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    slice_thickness_mm: float | None = None

    @property
    def median_spacing_mm(self) -> float | None:
        return float(np.median(self.spacings_mm)) if self.spacings_mm else None

    @property
    def slab_mm(self) -> float:
        """Thickness each slice stands for along the normal: the median spacing, else (one slice) the
        Slice Thickness, else 0."""
        median = self.median_spacing_mm
        if median is not None:
            return median
        return self.slice_thickness_mm or 0.0

    def virtual_indices(self) -> list[int]:
        """Slice indices counting the estimated missing slices of :attr:`gaps` (for gap rules)."""
        missing_after = {g.after_slice: g.missing for g in self.gaps}
        out, offset = [], 0
        for k in range(len(self.frames)):
            out.append(k + offset)
            offset += missing_after.get(k, 0)
        return out

    def to_json(self) -> dict[str, Any]:
        """The ``stack`` object of a series result (vectors rounded to 1e-6, mm to 1e-4)."""
        spacing = self.spacings_mm
        return {
            "consistent": self.consistent,
            "problems": list(self.problems),
            "notes": list(self.notes),
            "slices": len(self.frames),
            "normal": _round(self.normal, 6),
            "row_direction": _round(self.row_dir, 6),
            "column_direction": _round(self.col_dir, 6),
            "pixel_spacing_mm": _round(self.pixel_spacing, 6),
            "rows": self.rows,
            "columns": self.columns,
            "slice_thickness_mm": self.slice_thickness_mm,
            "spacing_mm": {
                "median": _r(self.median_spacing_mm),
                "min": _r(min(spacing)) if spacing else None,
                "max": _r(max(spacing)) if spacing else None,
            },
            "uneven_spacing": self.uneven_spacing,
            "missing_slices": [
                {"after_slice": g.after_slice, "gap_mm": _r(g.gap_mm), "missing": g.missing}
                for g in self.gaps
            ],
            "order": [
                {
                    "slice": k,
                    "sop_instance_uid": f.sop_instance_uid,
                    "frame": f.frame_index,
                    "position_mm": _r(f.position_mm),
                }
                for k, f in enumerate(self.frames)
            ],
        }


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def _round(values: Iterable[float], digits: int = 4) -> list[float]:
    return [round(float(v), digits) + 0.0 for v in values]  # + 0.0: no "-0.0" in the JSON


def ds_floats(value: Any, count: int) -> tuple[float, ...] | None:
    """A multi-valued DS as ``count`` finite floats, else None."""
    if value is None:
        return None
    try:
        items = value if isinstance(value, (list, tuple, MultiValue)) else [value]
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    if len(out) != count or not all(np.isfinite(out)):
        return None
    return out


def frame_attribute(ds: Any, frame: int, sequence: str, keyword: str) -> Any:
    """``keyword`` for ``frame`` from the per-frame, else shared functional group ``sequence``, else the
    top level of ``ds``."""
    item = _group_item(ds, frame, sequence)
    if item is not None and keyword in item:
        return item.get(keyword)
    return ds.get(keyword)


def _geometry(ds: Any, frame: int) -> tuple[PlaneGeometry | None, float | None, str]:
    """Plane geometry, slice thickness and (when the geometry is None) why, for ``frame`` of ``ds``."""
    ipp = ds_floats(frame_attribute(ds, frame, "PlanePositionSequence", "ImagePositionPatient"), 3)
    iop = ds_floats(frame_attribute(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    spacing = ds_floats(frame_attribute(ds, frame, "PixelMeasuresSequence", "PixelSpacing"), 2)
    thickness = ds_floats(frame_attribute(ds, frame, "PixelMeasuresSequence", "SliceThickness"), 1)
    thick = thickness[0] if thickness and thickness[0] > 0 else None
    missing = [
        name
        for name, value in (
            ("Image Position (Patient)", ipp),
            ("Image Orientation (Patient)", iop),
            ("Pixel Spacing", spacing),
        )
        if value is None
    ]
    if missing:
        return None, thick, "no valid " + ", ".join(missing)
    assert ipp is not None and iop is not None and spacing is not None
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if not (0.99 < nr < 1.01 and 0.99 < nc < 1.01) or abs(float(row @ col)) > 0.01:
        return None, thick, "Image Orientation (Patient) is not two orthogonal unit vectors"
    if spacing[0] <= 0 or spacing[1] <= 0:
        return None, thick, "Pixel Spacing is not positive"
    row, col = row / nr, col / nc
    geometry = PlaneGeometry(
        position=(ipp[0], ipp[1], ipp[2]),
        row_dir=(float(row[0]), float(row[1]), float(row[2])),
        col_dir=(float(col[0]), float(col[1]), float(col[2])),
        pixel_spacing=(spacing[0], spacing[1]),
    )
    return geometry, thick, ""


def frames_from_dataset(ds: Any) -> list[FrameRef]:
    """Every frame of one instance's header dataset (``stop_before_pixels`` is enough), in frame order."""
    try:
        count = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        count = 1
    sop = str(ds.get("SOPInstanceUID", ""))
    series = str(ds.get("SeriesInstanceUID", ""))
    for_uid = str(ds.get("FrameOfReferenceUID", ""))
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    out = []
    for i in range(max(count, 1)):
        geometry, thickness, problem = _geometry(ds, i)
        out.append(
            FrameRef(
                sop_instance_uid=sop,
                frame_index=i,
                series_uid=series,
                frame_of_reference_uid=for_uid,
                rows=rows,
                columns=cols,
                geometry=geometry,
                position_mm=float(np.asarray(geometry.position) @ geometry.normal) if geometry else None,
                slice_thickness_mm=thickness,
                problem=problem,
            )
        )
    return out


def read_frames(source: bytes | str | Path, limits: Limits = DEFAULT_LIMITS) -> list[FrameRef]:
    """:func:`frames_from_dataset` of one file or byte string, parsed strictly by :func:`open_dicom`
    (large values such as Pixel Data stay unread)."""
    with open_dicom(source, limits) as src:
        return frames_from_dataset(src.ds)


def group_series(frames: Iterable[FrameRef], tolerances: Tolerances = DEFAULT_TOLERANCES) -> list[Stack]:
    """Frames grouped by Series Instance UID (in order of first appearance), one :class:`Stack` each.

    A series whose frames lie in more than one Frame of Reference is one inconsistent stack.
    """
    groups: dict[str, list[FrameRef]] = {}
    for f in frames:
        groups.setdefault(f.series_uid, []).append(f)
    return [build_stack(group, tolerances) for group in groups.values()]


def build_stack(frames: Sequence[FrameRef], tolerances: Tolerances = DEFAULT_TOLERANCES) -> Stack:
    """Order ``frames`` (one series) along the slice normal and check that they form one stack.

    The reference plane is that of the first frame in (SOP Instance UID, frame index) order, so the
    result does not depend on the order frames arrive in.
    """
    if not frames:
        raise ConfigError("a stack needs at least one frame")
    tol = tolerances
    problems: list[str] = []
    series_uids = {f.series_uid for f in frames}
    if len(series_uids) > 1:
        problems.append(f"frames of {len(series_uids)} series")
    if "" in series_uids:
        problems.append("frames without a Series Instance UID")
    for_uids = {f.frame_of_reference_uid for f in frames} - {""}
    if len(for_uids) > 1:
        problems.append(f"frames in {len(for_uids)} frames of reference")
    placed = sorted((f for f in frames if f.geometry is not None), key=lambda f: f.key)
    unplaced = [f for f in frames if f.geometry is None]
    if unplaced:
        reasons = sorted({f.problem for f in unplaced})
        problems.append(
            f"{len(unplaced)} of {len(frames)} frames have no plane geometry: {'; '.join(reasons)}"
        )
    keys = [f.key for f in frames]
    if len(set(keys)) != len(keys):
        problems.append(f"{len(keys) - len(set(keys))} frames received more than once")
    thicknesses = sorted({f.slice_thickness_mm for f in frames if f.slice_thickness_mm is not None})
    thickness = thicknesses[len(thicknesses) // 2] if thicknesses else None
    series_uid = frames[0].series_uid
    for_uid = sorted(for_uids)[0] if for_uids else ""
    if not placed:
        log.info("stack of %d frames: no frame has plane geometry", len(frames))
        return Stack(
            series_uid=series_uid,
            frame_of_reference_uid=for_uid,
            slice_thickness_mm=thickness,
            frames=list(frames),
            normal=(0.0, 0.0, 0.0),
            row_dir=(0.0, 0.0, 0.0),
            col_dir=(0.0, 0.0, 0.0),
            pixel_spacing=(0.0, 0.0),
            rows=frames[0].rows,
            columns=frames[0].columns,
            spacings_mm=[],
            consistent=False,
            problems=problems,
        )
    ref = placed[0]
    g0 = ref.geometry
    assert g0 is not None
    n = g0.normal
    geos = [f.geometry for f in placed if f.geometry is not None]
    rows_dirs, col_dirs = np.array([g.row_dir for g in geos]), np.array([g.col_dir for g in geos])
    dev = max(
        float(np.abs(rows_dirs - np.asarray(g0.row_dir)).max()),
        float(np.abs(col_dirs - np.asarray(g0.col_dir)).max()),
    )
    if dev > tol.orientation:
        distinct = len({tuple(np.round(np.concatenate([g.row_dir, g.col_dir]), 3)) for g in geos})
        problems.append(
            f"orientations differ: {distinct} distinct, direction cosines up to {dev:.4g} apart "
            f"(tolerance {tol.orientation:g})"
        )
    spacings = np.array([g.pixel_spacing for g in geos])
    ps_dev = float(np.abs(spacings - np.asarray(g0.pixel_spacing)).max())
    if ps_dev > tol.pixel_spacing_mm:
        problems.append(f"pixel spacing differs by up to {ps_dev:.4g} mm")
    sizes = {(f.rows, f.columns) for f in placed}
    if len(sizes) > 1:
        problems.append(f"{len(sizes)} different matrix sizes (rows x columns)")
    ipp = np.array([g.position for g in geos])  # (F, 3)
    along = ipp @ n  # (F,)
    offsets = (ipp - np.asarray(g0.position)) - np.outer(along - along[0], n)  # (F, 3) in-plane part
    in_plane = float(np.linalg.norm(offsets, axis=1).max())
    if in_plane > tol.in_plane_mm:
        problems.append(
            f"positions are not on one line along the slice normal: in-plane offsets up to "
            f"{in_plane:.3f} mm (tolerance {tol.in_plane_mm:g} mm)"
        )
    order = np.argsort(along, kind="stable")
    ordered = [replace(placed[i], position_mm=float(along[i])) for i in order]
    positions = along[order]
    steps = np.diff(positions)  # (F - 1,)
    shared = steps <= tol.duplicate_mm  # (F - 1,) neighbour pairs at one position
    if shared.any():
        at = sorted({round(float(positions[k]), 3) for k in np.flatnonzero(shared)})
        problems.append(
            f"{int(np.count_nonzero(shared)) + len(at)} frames share {len(at)} position(s) along the normal "
            f"(within {tol.duplicate_mm:g} mm), first at {at[0]:g} mm"
        )
    uneven, gaps, notes = _spacing_properties(steps, tol)
    consistent = not problems
    log.info(
        "stack of %d frames: %s%s",
        len(frames),
        "consistent" if consistent else f"inconsistent ({len(problems)} problem(s))",
        f", {len(notes)} note(s)" if notes else "",
    )
    return Stack(
        series_uid=series_uid,
        frame_of_reference_uid=for_uid,
        slice_thickness_mm=thickness,
        frames=ordered + unplaced,
        normal=(float(n[0]), float(n[1]), float(n[2])),
        row_dir=g0.row_dir,
        col_dir=g0.col_dir,
        pixel_spacing=g0.pixel_spacing,
        rows=ref.rows,
        columns=ref.columns,
        spacings_mm=[float(s) for s in steps],
        consistent=consistent,
        problems=problems,
        uneven_spacing=uneven,
        gaps=gaps,
        notes=notes,
    )


def _spacing_properties(steps: np.ndarray, tol: Tolerances) -> tuple[bool, list[Gap], list[str]]:
    """Uneven spacing, missing-slice gaps and their notes, from the ``(F - 1,)`` sorted position steps.

    A step above ``missing_factor * median`` is a gap (missing slices), not uneven spacing; the other
    steps are uneven when one is further than ``max(uneven_abs_mm, uneven_rel * median)`` from the median.
    """
    if not len(steps):
        return False, [], []
    median = float(np.median(steps))
    if median <= tol.duplicate_mm:  # mostly duplicates: already a problem, nothing to say about spacing
        return False, [], []
    gaps = [
        Gap(k, float(s), max(1, round(float(s) / median) - 1))
        for k, s in enumerate(steps)
        if s > tol.missing_factor * median
    ]
    in_gap = {g.after_slice for g in gaps}
    regular = np.array([s for k, s in enumerate(steps) if k not in in_gap])  # at least the median's half
    uneven = bool(np.abs(regular - median).max() > max(tol.uneven_abs_mm, tol.uneven_rel * median))
    notes = []
    if uneven:
        notes.append(
            f"uneven spacing: {float(regular.min()):.3f} to {float(regular.max()):.3f} mm "
            f"(median {median:.3f} mm)"
        )
    for g in gaps:
        notes.append(
            f"about {g.missing} slice(s) missing between slices {g.after_slice} and {g.after_slice + 1} "
            f"(gap {g.gap_mm:.3f} mm, median spacing {median:.3f} mm)"
        )
    return uneven, gaps, notes
