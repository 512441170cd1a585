"""Issue #9 (runtime part): series grouping and slice-stack geometry (runtime/slices.py), 2D -> 3D
linking into findings (runtime/findings.py) and ``retinaedge detect --series``.

Geometry is checked on constructed header datasets (no pixel data) against an independent computation
of PS3.3 C.7.6.2.1.1 (the 4x4 matrix form); the enhanced multi-frame path on a highdicom Legacy
Converted Enhanced MR instance and on the examples (single-frame and multi-frame of one volume).
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from retinaedge.runtime.cli import main
from retinaedge.runtime.findings import LinkParams, analyse_series, box_iou, link_findings
from retinaedge.runtime.slices import (
    Gap,
    Stack,
    build_stack,
    frames_from_dataset,
    group_series,
    read_frames,
)
from support.paths import DEMO, EXAMPLES, REPO_ROOT

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _oblique() -> tuple[float, ...]:
    """Axial rotated 20 degrees about x, then 35 about z (row and column still orthonormal)."""
    a, b = math.radians(20.0), math.radians(35.0)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    rot = rz @ rx
    return (*(rot @ [1.0, 0.0, 0.0]), *(rot @ [0.0, 1.0, 0.0]))


OBLIQUE = _oblique()
ORIENTATIONS = {"axial": AXIAL, "sagittal": SAGITTAL, "coronal": CORONAL, "oblique": OBLIQUE}
ORIGIN = np.array([-80.25, -96.5, 31.75])  # IPP of slice 0
PIXEL_SPACING = (0.8, 0.6)  # row spacing (between rows), column spacing: unequal on purpose
ROWS, COLS = 48, 64  # unequal on purpose


def plane_ds(
    ipp: np.ndarray | tuple[float, ...],
    iop: tuple[float, ...] = AXIAL,
    *,
    series_uid: str,
    sop_uid: str | None = None,
    for_uid: str = "1.2.3.4",
    pixel_spacing: tuple[float, float] = PIXEL_SPACING,
    rows: int = ROWS,
    cols: int = COLS,
    instance_number: int = 1,
) -> Dataset:
    """A single-frame MR header with an Image Plane module (no pixel data)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = "MR"
    ds.Rows, ds.Columns = rows, cols
    ds.ImagePositionPatient = [f"{float(v):.10g}" for v in ipp]
    ds.ImageOrientationPatient = [f"{float(v):.10g}" for v in iop]
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.SliceThickness = "2.5"
    ds.InstanceNumber = instance_number
    return ds


def normal_of(iop: tuple[float, ...]) -> np.ndarray:
    return np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))


def make_series(
    offsets_mm: list[float], iop: tuple[float, ...] = AXIAL, *, series_uid: str | None = None
) -> list[Dataset]:
    """Slices at ``ORIGIN + offset * normal``; Instance Numbers run backwards (so ordering by them would
    be wrong)."""
    series_uid = series_uid or generate_uid()
    n = normal_of(iop)
    return [
        plane_ds(
            ORIGIN + off * n,
            iop,
            series_uid=series_uid,
            instance_number=len(offsets_mm) - k,
        )
        for k, off in enumerate(offsets_mm)
    ]


def stack_of(datasets: list[Dataset]) -> Stack:
    return build_stack([f for ds in datasets for f in frames_from_dataset(ds)])


def patient_point(ds: Dataset, column: float, row: float) -> np.ndarray:
    """PS3.3 C.7.6.2.1.1 in its matrix form: ``P = M @ [i, j, 0, 1]`` with ``i`` the column and ``j`` the
    row index (pixel centres); ``M`` columns: X * delta_i, Y * delta_j, 0, S."""
    iop = [float(v) for v in ds.ImageOrientationPatient]
    di, dj = float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])  # column spacing, row spacing
    m = np.zeros((4, 4))
    m[:3, 0] = np.asarray(iop[:3]) * di
    m[:3, 1] = np.asarray(iop[3:]) * dj
    m[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
    m[3, 3] = 1.0
    return (m @ np.array([column, row, 0.0, 1.0]))[:3]


# --- geometry -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arrival", ["in order", "reversed", "shuffled"])
@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_stack_orders_along_the_normal(name: str, arrival: str) -> None:
    iop = ORIENTATIONS[name]
    spacing = 3.3
    datasets = make_series([k * spacing for k in range(7)], iop)
    received = list(datasets)
    if arrival == "reversed":
        received.reverse()
    elif arrival == "shuffled":
        random.Random(7).shuffle(received)
    stack = stack_of(received)
    assert stack.consistent, stack.problems
    assert stack.problems == [] and stack.notes == [] and stack.gaps == []
    assert not stack.uneven_spacing
    # Slice k is the k-th dataset (positions ascending along n), whatever the arrival order.
    assert [f.sop_instance_uid for f in stack.frames] == [ds.SOPInstanceUID for ds in datasets]
    n = normal_of(iop)
    np.testing.assert_allclose(stack.normal, n, atol=1e-9)
    np.testing.assert_allclose(stack.row_dir, iop[:3], atol=1e-9)
    np.testing.assert_allclose(stack.col_dir, iop[3:], atol=1e-9)
    expected = [float(ORIGIN @ n) + k * spacing for k in range(7)]
    np.testing.assert_allclose([f.position_mm for f in stack.frames], expected, atol=1e-6)
    np.testing.assert_allclose(stack.spacings_mm, [spacing] * 6, atol=1e-6)
    assert stack.pixel_spacing == PIXEL_SPACING
    assert (stack.rows, stack.columns) == (ROWS, COLS)
    assert stack.slab_mm == pytest.approx(spacing)


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_box_corners_in_mm_match_the_dicom_geometry(name: str) -> None:
    """A finding's patient-space box equals the box's pixel edges mapped by the DICOM matrix formula."""
    iop = ORIENTATIONS[name]
    spacing = 4.0
    datasets = make_series([k * spacing for k in range(5)], iop)
    stack = stack_of(datasets[::-1])
    box = (10.0, 6.0, 30.0, 20.0)  # x1, y1, x2, y2: columns 10..29, rows 6..19
    dets = {(datasets[2].SOPInstanceUID, 0): [Det("glioma", 0, 0.9, box)]}
    (finding,) = link_findings(stack, dets, LinkParams(min_slices=1))
    # Box edges are half a pixel outside the centres of its first and last columns / rows.
    corners = np.array(
        [
            patient_point(datasets[2], c, r)
            for c in (box[0] - 0.5, box[2] - 0.5)
            for r in (box[1] - 0.5, box[3] - 0.5)
        ]
    )
    n = normal_of(iop)
    slab = np.concatenate([corners - spacing / 2 * n, corners + spacing / 2 * n])
    np.testing.assert_allclose(finding.bbox_min_mm, slab.min(axis=0), atol=1e-9)
    np.testing.assert_allclose(finding.bbox_max_mm, slab.max(axis=0), atol=1e-9)
    centre = patient_point(datasets[2], (box[0] + box[2]) / 2 - 0.5, (box[1] + box[3]) / 2 - 0.5)
    np.testing.assert_allclose(finding.centroid_mm, centre, atol=1e-9)
    # Width along the rows: 20 columns x 0.6 mm; height: 14 rows x 0.8 mm.
    assert finding.volume_mm3 == pytest.approx(20 * 0.6 * 14 * 0.8 * spacing)
    # Pixel centre check by hand for the axial case.
    if name == "axial":
        g = stack.frames[2].geometry
        assert g is not None
        np.testing.assert_allclose(
            g.edge_to_patient(np.array([10.0, 6.0])), ORIGIN + [10 * 0.6 - 0.3, 6 * 0.8 - 0.4, 8.0]
        )
        np.testing.assert_allclose(
            g.pixel_to_patient(np.array([6.0, 10.0])), ORIGIN + [10 * 0.6, 6 * 0.8, 8.0]
        )


def test_uneven_spacing_is_recorded_not_refused() -> None:
    stack = stack_of(make_series([0.0, 5.0, 10.0, 14.0, 19.0, 24.0]))
    assert stack.consistent, stack.problems
    assert stack.uneven_spacing
    assert stack.gaps == []
    assert any("uneven spacing" in note for note in stack.notes)
    np.testing.assert_allclose(stack.spacings_mm, [5, 5, 4, 5, 5], atol=1e-6)


def test_missing_slice_is_recorded_not_refused() -> None:
    stack = stack_of(make_series([0.0, 5.0, 10.0, 20.0, 25.0, 30.0])[::-1])
    assert stack.consistent, stack.problems
    assert not stack.uneven_spacing
    assert stack.gaps == [Gap(after_slice=2, gap_mm=pytest.approx(10.0), missing=1)]
    assert stack.virtual_indices() == [0, 1, 2, 4, 5, 6]
    data = stack.to_json()
    assert data["missing_slices"] == [{"after_slice": 2, "gap_mm": 10.0, "missing": 1}]
    assert any("missing" in note for note in stack.notes)


def test_mixed_orientation_is_inconsistent() -> None:
    datasets = make_series([0.0, 3.0, 6.0, 9.0])
    datasets[2].ImageOrientationPatient = list(SAGITTAL)
    stack = stack_of(datasets)
    assert not stack.consistent
    assert any("orientations differ" in p for p in stack.problems)
    dets = {(ds.SOPInstanceUID, 0): [Det("glioma", 0, 0.9, (1, 1, 9, 9))] for ds in datasets}
    assert link_findings(stack, dets, LinkParams()) == []


def test_slightly_different_orientation_within_tolerance_is_one_stack() -> None:
    datasets = make_series([0.0, 3.0, 6.0])
    datasets[1].ImageOrientationPatient = ["1", "0.0002", "0", "-0.0002", "1", "0"]
    assert stack_of(datasets).consistent


def test_duplicate_position_is_inconsistent() -> None:
    datasets = make_series([0.0, 3.0, 6.0, 9.0])
    datasets[3].ImagePositionPatient = datasets[1].ImagePositionPatient
    stack = stack_of(datasets)
    assert not stack.consistent
    assert any("share" in p for p in stack.problems), stack.problems


def test_positions_off_the_normal_are_inconsistent() -> None:
    """A gantry tilt (IPP moving in-plane from slice to slice) is not a stack along the normal."""
    datasets = make_series([0.0, 3.0, 6.0, 9.0])
    for k, ds in enumerate(datasets):
        ipp = np.array([float(v) for v in ds.ImagePositionPatient]) + [0.0, 0.9 * k, 0.0]
        ds.ImagePositionPatient = [f"{v:.10g}" for v in ipp]
    stack = stack_of(datasets)
    assert not stack.consistent
    assert any("not on one line" in p for p in stack.problems), stack.problems


@pytest.mark.parametrize("change", ["pixel spacing", "matrix", "frame of reference", "no position"])
def test_other_inconsistencies(change: str) -> None:
    datasets = make_series([0.0, 3.0, 6.0])
    if change == "pixel spacing":
        datasets[1].PixelSpacing = ["0.9", "0.6"]
    elif change == "matrix":
        datasets[1].Rows = ROWS + 2
    elif change == "frame of reference":
        datasets[1].FrameOfReferenceUID = "1.2.3.5"
    else:
        del datasets[1].ImagePositionPatient
    stack = stack_of(datasets)
    assert not stack.consistent
    word = {
        "pixel spacing": "pixel spacing",
        "matrix": "matrix",
        "frame of reference": "frames of reference",
        "no position": "Image Position",
    }[change]
    assert any(word in p for p in stack.problems), stack.problems


def test_group_series_splits_by_series_uid_in_arrival_order() -> None:
    a = make_series([0.0, 3.0, 6.0])
    b = make_series([0.0, 5.0], SAGITTAL)
    frames = [f for ds in (b[1], a[2], a[0], b[0], a[1]) for f in frames_from_dataset(ds)]
    stacks = group_series(frames)
    assert [s.series_uid for s in stacks] == [b[0].SeriesInstanceUID, a[0].SeriesInstanceUID]
    assert [len(s.frames) for s in stacks] == [2, 3]
    assert all(s.consistent for s in stacks)


def test_instance_number_is_not_the_order() -> None:
    datasets = make_series([0.0, 3.0, 6.0, 9.0])
    assert [int(ds.InstanceNumber) for ds in datasets] == [4, 3, 2, 1]
    stack = stack_of(datasets)
    assert [f.sop_instance_uid for f in stack.frames] == [ds.SOPInstanceUID for ds in datasets]


def test_examples_multiframe_matches_the_single_frame_series() -> None:
    """examples/study_01 (27 single-frame) and study_01_multiframe (one legacy-converted instance whose
    frames run superior to inferior) are the same volume: same stack positions and geometry."""
    single = group_series([f for p in sorted((EXAMPLES / "study_01").glob("*.dcm")) for f in read_frames(p)])
    multi = group_series(read_frames(EXAMPLES / "study_01_multiframe" / "MF0001.dcm"))
    assert len(single) == len(multi) == 1
    s, m = single[0], multi[0]
    assert s.consistent and m.consistent, (s.problems, m.problems)
    assert len(s.frames) == len(m.frames) == 27
    np.testing.assert_allclose(
        [f.position_mm for f in s.frames], [f.position_mm for f in m.frames], atol=1e-6
    )
    np.testing.assert_allclose(s.normal, m.normal, atol=1e-9)
    assert s.pixel_spacing == m.pixel_spacing and (s.rows, s.columns) == (m.rows, m.columns)
    assert s.slice_thickness_mm == m.slice_thickness_mm == 5.0
    # Frame 0 of the multi-frame instance is the most superior slice: the last of the stack.
    assert [f.frame_index for f in m.frames] == list(range(26, -1, -1))
    assert {f.sop_instance_uid for f in m.frames} == {m.frames[0].sop_instance_uid}
    for fs, fm in zip(s.frames, m.frames, strict=True):
        assert fs.geometry is not None and fm.geometry is not None
        np.testing.assert_allclose(fs.geometry.position, fm.geometry.position, atol=1e-6)


def test_enhanced_multiframe_from_shuffled_oblique_slices(tmp_path: Path) -> None:
    """highdicom Legacy Converted Enhanced MR of an oblique series with frames in shuffled order (no
    Dimension Index): the per-frame Plane Position / shared Plane Orientation and Pixel Measures give
    the same stack as the single-frame instances."""
    pytest.importorskip("highdicom")
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from phantom import dicomwrite as dw
    from phantom.study import Pose, SyntheticSeries

    n = normal_of(OBLIQUE)
    positions = np.array([ORIGIN + k * 3.5 * n for k in range(6)])
    rng = np.random.default_rng(3)
    series = SyntheticSeries(
        seed=4242,
        pixels=rng.integers(0, 4096, (6, 16, 20), dtype=np.uint16),
        positions=positions,
        orientation=np.asarray(OBLIQUE),
        pixel_spacing=(0.8, 0.6),
        slice_thickness=3.0,
        spacing_between_slices=3.5,
        lesions=[],
        boxes=[[] for _ in range(6)],
        window=(2000.0, 4000.0),
        pose=Pose(0.0, 1.0, np.zeros(3)),
    )
    singles = dw.single_frame_datasets(series)
    shuffled = [singles[i] for i in (3, 0, 5, 1, 4, 2)]
    path, order = dw.write_multiframe(
        shuffled,
        tmp_path / "MF.dcm",
        series_instance_uid=generate_uid(),
        series_number=101,
        sop_instance_uid=generate_uid(),
        include_dimension_index=False,
    )
    assert order == [0, 1, 2, 3, 4, 5]  # frames kept the shuffled order
    (multi,) = group_series(read_frames(path))
    single = stack_of(singles[::-1])
    assert multi.consistent and single.consistent, (multi.problems, single.problems)
    np.testing.assert_allclose(
        [f.position_mm for f in multi.frames], [f.position_mm for f in single.frames], atol=1e-6
    )
    assert [f.frame_index for f in multi.frames] == [1, 3, 5, 0, 4, 2]
    np.testing.assert_allclose(multi.normal, n, atol=1e-6)
    assert multi.pixel_spacing == pytest.approx((0.8, 0.6))
    np.testing.assert_allclose(multi.spacings_mm, [3.5] * 5, atol=1e-5)


# --- linking --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Det:
    label: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]


SPACING = 3.0


@pytest.fixture()
def axial() -> tuple[list[Dataset], Stack]:
    datasets = make_series([k * SPACING for k in range(12)])
    shuffled = list(datasets)
    random.Random(1).shuffle(shuffled)
    return datasets, stack_of(shuffled)


def _dets(datasets: list[Dataset], slices: dict[int, list[Det]]) -> dict[tuple[str, int], list[Det]]:
    return {(datasets[k].SOPInstanceUID, 0): dets for k, dets in slices.items()}


def test_lesion_over_five_slices_is_one_finding(axial: tuple[list[Dataset], Stack]) -> None:
    datasets, stack = axial
    box = (10.0, 12.0, 20.0, 32.0)
    scores = [0.6, 0.8, 0.95, 0.85, 0.7]
    dets = _dets(datasets, {3 + i: [Det("glioma", 0, s, box)] for i, s in enumerate(scores)})
    (f,) = link_findings(stack, dets, LinkParams())
    assert (f.label, f.class_id, f.slices, f.extent_slices) == ("glioma", 0, 5, 5)
    assert (f.first_slice, f.last_slice) == (3, 7)
    z0 = float(ORIGIN[2])
    assert f.first_position_mm == pytest.approx(z0 + 3 * SPACING)
    assert f.last_position_mm == pytest.approx(z0 + 7 * SPACING)
    assert f.extent_mm == pytest.approx(5 * SPACING)
    area = 10 * PIXEL_SPACING[1] * 20 * PIXEL_SPACING[0]
    assert f.volume_mm3 == pytest.approx(5 * area * SPACING)
    assert f.volume_ellipse_mm3 == pytest.approx(math.pi / 4 * 5 * area * SPACING)
    np.testing.assert_allclose(
        f.bbox_min_mm, ORIGIN + [9.5 * 0.6, 11.5 * 0.8, 3 * SPACING - SPACING / 2], atol=1e-9
    )
    np.testing.assert_allclose(
        f.bbox_max_mm, ORIGIN + [19.5 * 0.6, 31.5 * 0.8, 7 * SPACING + SPACING / 2], atol=1e-9
    )
    np.testing.assert_allclose(f.centroid_mm, ORIGIN + [14.5 * 0.6, 21.5 * 0.8, 5 * SPACING], atol=1e-9)
    assert f.max_score == pytest.approx(0.95)
    assert f.mean_score == pytest.approx(sum(scores) / 5)
    assert [(d.sop_instance_uid, d.frame_index, d.slice) for d in f.detections] == [
        (datasets[k].SOPInstanceUID, 0, k) for k in range(3, 8)
    ]
    assert [d.box for d in f.detections] == [box] * 5
    data = f.to_json()
    assert data["bbox_lps_mm"]["min"] == pytest.approx(list(f.bbox_min_mm), abs=1e-4)
    assert len(data["detections"]) == 5


def test_tapering_lesion_links_its_small_poles(axial: tuple[list[Dataset], Stack]) -> None:
    """A pole's small box inside the neighbouring large one links even though their IoU is low."""
    datasets, stack = axial
    big, small = (10.0, 10.0, 40.0, 40.0), (23.0, 23.0, 27.0, 27.0)
    assert box_iou(big, small) < 0.2
    dets = _dets(datasets, {4: [Det("meningioma", 1, 0.9, small)], 5: [Det("meningioma", 1, 0.9, big)]})
    (f,) = link_findings(stack, dets, LinkParams())
    assert f.slices == 2
    # Trapezoid between the slices plus half a slab at each end.
    a_small, a_big = 16 * 0.48, 900 * 0.48
    assert f.volume_mm3 == pytest.approx((a_small + a_big) / 2 * SPACING + SPACING / 2 * (a_small + a_big))


def test_two_classes_stay_separate(axial: tuple[list[Dataset], Stack]) -> None:
    datasets, stack = axial
    box = (10.0, 10.0, 30.0, 30.0)
    dets = _dets(
        datasets,
        {k: [Det("glioma", 0, 0.9, box), Det("meningioma", 1, 0.8, box)] for k in range(2, 6)},
    )
    findings = link_findings(stack, dets, LinkParams())
    assert sorted((f.label, f.slices) for f in findings) == [("glioma", 4), ("meningioma", 4)]
    assert findings[0].label == "glioma"  # highest max score first


def test_same_class_lesions_apart_stay_separate(axial: tuple[list[Dataset], Stack]) -> None:
    datasets, stack = axial
    a, b = (5.0, 5.0, 15.0, 15.0), (40.0, 20.0, 50.0, 30.0)
    dets = _dets(datasets, {k: [Det("glioma", 0, 0.9, a), Det("glioma", 0, 0.7, b)] for k in range(2, 5)})
    findings = link_findings(stack, dets, LinkParams())
    assert len(findings) == 2 and all(f.slices == 3 for f in findings)
    assert {f.detections[0].box for f in findings} == {a, b}


def test_single_slice_blip_is_dropped(axial: tuple[list[Dataset], Stack]) -> None:
    datasets, stack = axial
    dets = _dets(
        datasets,
        {
            2: [Det("glioma", 0, 0.9, (10, 10, 30, 30))],
            3: [Det("glioma", 0, 0.9, (10, 10, 30, 30))],
            8: [Det("pituitary", 2, 0.99, (5, 5, 9, 9))],
        },
    )
    assert [f.label for f in link_findings(stack, dets, LinkParams(min_slices=2))] == ["glioma"]
    kept = link_findings(stack, dets, LinkParams(min_slices=1))
    assert sorted(f.label for f in kept) == ["glioma", "pituitary"]


def test_low_scores_are_ignored(axial: tuple[list[Dataset], Stack]) -> None:
    datasets, stack = axial
    dets = _dets(datasets, {k: [Det("glioma", 0, 0.3, (10, 10, 30, 30))] for k in range(2, 6)})
    assert link_findings(stack, dets, LinkParams()) == []
    (f,) = link_findings(stack, dets, LinkParams(min_score=0.25))
    assert f.slices == 4


def test_gap_of_one_slice_is_bridged_only_with_max_gap_1(axial: tuple[list[Dataset], Stack]) -> None:
    datasets, stack = axial
    box = (10.0, 10.0, 30.0, 30.0)
    dets = _dets(datasets, {k: [Det("glioma", 0, 0.9, box)] for k in (3, 4, 6, 7)})
    (f,) = link_findings(stack, dets, LinkParams(max_gap=1))
    assert (f.slices, f.extent_slices, f.first_slice, f.last_slice) == (4, 5, 3, 7)
    # The bridged slice counts in the volume (areas interpolated across it).
    assert f.volume_mm3 == pytest.approx(5 * 20 * 0.6 * 20 * 0.8 * SPACING)
    split = link_findings(stack, dets, LinkParams(max_gap=0))
    assert sorted((f.first_slice, f.slices) for f in split) == [(3, 2), (6, 2)]
    # A gap of two slices is not bridged by max_gap=1.
    dets2 = _dets(datasets, {k: [Det("glioma", 0, 0.9, box)] for k in (2, 3, 6, 7)})
    assert len(link_findings(stack, dets2, LinkParams(max_gap=1))) == 2


def test_missing_slice_of_the_stack_counts_as_a_gap() -> None:
    datasets = make_series([0.0, 3.0, 6.0, 12.0, 15.0])  # a slice missing at 9 mm
    stack = stack_of(datasets)
    box = (10.0, 10.0, 30.0, 30.0)
    dets = _dets(datasets, {k: [Det("glioma", 0, 0.9, box)] for k in range(5)})
    assert len(link_findings(stack, dets, LinkParams(max_gap=0))) == 2
    (f,) = link_findings(stack, dets, LinkParams(max_gap=1))
    assert (f.slices, f.extent_slices) == (5, 5)
    assert f.extent_mm == pytest.approx(15.0 + 3.0)
    assert f.volume_mm3 == pytest.approx(20 * 0.6 * 20 * 0.8 * 18.0)


def test_link_params_are_validated() -> None:
    from retinaedge.runtime.errors import ConfigError

    for bad in ({"min_slices": 0}, {"link_iou": 0.0}, {"max_gap": -1}, {"min_score": 1.5}):
        with pytest.raises(ConfigError):
            LinkParams(**bad)  # type: ignore[arg-type]


def test_series_result_json_shape() -> None:
    datasets = make_series([k * SPACING for k in range(6)])
    other = make_series([0.0, 3.0, 3.0])  # duplicate position: inconsistent
    frames = [f for ds in datasets + other for f in frames_from_dataset(ds)]
    box = (10.0, 10.0, 30.0, 30.0)
    dets = _dets(datasets, {k: [Det("glioma", 0, 0.9, box)] for k in range(1, 4)})
    dets.update(_dets(other, {k: [Det("glioma", 0, 0.9, box)] for k in range(3)}))
    results = [r.to_json() for r in analyse_series(frames, dets, LinkParams())]
    json.dumps(results)
    good, bad = results
    assert set(good) >= {"series_instance_uid", "stack", "findings", "instances", "frames"}
    assert (good["instances"], good["frames"], good["detections_considered"]) == (6, 6, 3)
    assert good["stack"]["consistent"] and good["stack"]["slices"] == 6
    assert [o["slice"] for o in good["stack"]["order"]] == list(range(6))
    (finding,) = good["findings"]
    assert finding["id"] == 1 and finding["slices"] == 3 and len(finding["detections"]) == 3
    assert not bad["stack"]["consistent"] and bad["stack"]["problems"] and bad["findings"] == []


# --- CLI ------------------------------------------------------------------------------------------


def _write_series(out: Path, offsets: list[float], iop: tuple[float, ...], seed: int) -> list[Path]:
    """Real single-frame MR files (64 x 64, a bright square on every slice) of one series."""
    from support.dicomgen import mr_instance, write

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    series_uid, study_uid = generate_uid(), generate_uid()
    paths = []
    for k, ds_geo in enumerate(make_series(offsets, iop, series_uid=series_uid)):
        pixels = rng.integers(200, 400, (64, 64)).astype(np.uint16)
        pixels[20:40, 24:44] += 1500
        ds = mr_instance(pixels, window=(1000, 2000))
        ds.StudyInstanceUID = study_uid
        for keyword in (
            "SeriesInstanceUID",
            "FrameOfReferenceUID",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
            "SliceThickness",
            "InstanceNumber",
        ):
            setattr(ds, keyword, ds_geo.data_element(keyword).value)
        # Files named against the slice order, so neither names nor numbers give it away.
        paths.append(write(ds, out / f"IM{(7 * k) % 11:02d}_{k}.dcm"))
    return paths


def test_cli_series_structure(small_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    axial_dir, sag_dir = tmp_path / "axial", tmp_path / "sagittal"
    _write_series(axial_dir, [k * 4.0 for k in range(5)], AXIAL, 1)
    _write_series(sag_dir, [0.0, 4.0, 8.0], SAGITTAL, 2)
    rc = main(
        [
            "--log-level",
            "WARNING",
            "detect",
            "--series",
            "--model",
            str(small_bundle),
            "--min-score",
            "0.05",
            "--min-slices",
            "1",
            str(axial_dir),
            str(sag_dir),
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0, lines
    assert len(lines) == 2
    for line, slices in zip(lines, (5, 3), strict=True):
        assert set(line) >= {"series_instance_uid", "stack", "findings", "instances", "frames"}
        assert (line["instances"], line["frames"]) == (slices, slices)
        assert len(line["files"]) == slices and set(line["model"]) == {"name", "sha256"}
        stack = line["stack"]
        assert stack["consistent"] and stack["problems"] == [] and stack["slices"] == slices
        assert stack["spacing_mm"]["median"] == pytest.approx(4.0)
        positions = [o["position_mm"] for o in stack["order"]]
        assert positions == sorted(positions)
        assert line["parameters"] == {"min_score": 0.05, "min_slices": 1, "link_iou": 0.2, "max_gap": 1}
        for f in line["findings"]:
            assert set(f) >= {
                "label",
                "class_id",
                "slices",
                "extent_slices",
                "first_position_mm",
                "last_position_mm",
                "bbox_lps_mm",
                "centroid_lps_mm",
                "volume_mm3",
                "max_score",
                "mean_score",
                "detections",
            }
            assert f["label"] in ("glioma", "meningioma", "pituitary")
            assert len(f["detections"]) == f["slices"] >= 1
            lo, hi = f["bbox_lps_mm"]["min"], f["bbox_lps_mm"]["max"]
            assert all(a <= c <= b for a, c, b in zip(lo, f["centroid_lps_mm"], hi, strict=True))
    # The biased test model boxes every slice: there is something to link.
    assert any(line["findings"] for line in lines), lines


def test_cli_series_options_need_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["detect", "--model", str(tmp_path), "--min-slices", "3", str(tmp_path)])
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert rc == 2 and out["error"]["type"] == "invalid-configuration"
    assert "--min-slices" in out["error"]["message"]


def _series_cli(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    rc = main(["--log-level", "WARNING", "detect", "--series", "--model", str(DEMO), str(path)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0, lines
    assert len(lines) == 1
    return lines[0]


@pytest.mark.skipif(not (DEMO / "model.onnx").exists(), reason="models/demo is not trained yet")
def test_demo_single_and_multiframe_give_the_same_findings(capsys: pytest.CaptureFixture[str]) -> None:
    single = _series_cli(EXAMPLES / "study_01", capsys)
    multi = _series_cli(EXAMPLES / "study_01_multiframe", capsys)
    assert (single["instances"], single["frames"]) == (27, 27)
    assert (multi["instances"], multi["frames"]) == (1, 27)

    def key(f: dict) -> tuple:  # type: ignore[type-arg]
        return (f["label"], f["first_slice"], f["last_slice"], f["slices"])

    fs = sorted(single["findings"], key=key)  # type: ignore[arg-type]
    fm = sorted(multi["findings"], key=key)  # type: ignore[arg-type]
    assert [key(f) for f in fs] == [key(f) for f in fm]
    for a, b in zip(fs, fm, strict=True):
        for corner in ("min", "max"):
            np.testing.assert_allclose(a["bbox_lps_mm"][corner], b["bbox_lps_mm"][corner], atol=1e-3)
        np.testing.assert_allclose(a["centroid_lps_mm"], b["centroid_lps_mm"], atol=1e-3)
    truth = json.loads((EXAMPLES / "lesions.json").read_text())
    lesions = next(s for s in truth["series"] if s["series_instance_uid"] == single["series_instance_uid"])
    found = 0
    for lesion in lesions["lesions"]:
        same = [f for f in fs if f["label"] == lesion["kind"]]
        if not same:
            continue
        found += 1
        dist = min(
            float(np.linalg.norm(np.subtract(f["centroid_lps_mm"], lesion["center_lps_mm"]))) for f in same
        )
        assert dist <= 10.0, (lesion["kind"], dist)
    assert found, "no lesion kind of examples/lesions.json was found"


@pytest.mark.skipif(not (DEMO / "model.onnx").exists(), reason="models/demo is not trained yet")
def test_cli_series_links_the_findings_at_the_operating_point(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo bundle has an operating point: --series links exactly the detections it makes findings
    (no further floor), so every linked box is at or above its class's threshold, and a finding below the
    old fixed floor of 0.5 (the demo's meningioma threshold is 0.256) is linked."""
    from retinaedge.runtime.bundle import load_bundle

    thresholds = load_bundle(DEMO).manifest.operating_point.score_thresholds  # type: ignore[union-attr]
    line = _series_cli(EXAMPLES / "study_01", capsys)
    assert line["parameters"]["min_score"] == 0.0  # type: ignore[index]
    linked = [(f["label"], d["score"]) for f in line["findings"] for d in f["detections"]]  # type: ignore[attr-defined]
    assert linked and all(score >= thresholds[label] for label, score in linked)
    assert any(score < 0.5 for _, score in linked)
    raised = main(
        [
            "--log-level",
            "WARNING",
            "detect",
            "--series",
            "--min-score",
            "0.5",
            "--model",
            str(DEMO),
            str(EXAMPLES / "study_01"),
        ]
    )
    (again,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert raised == 0 and again["parameters"]["min_score"] == 0.5
    assert all(d["score"] >= 0.5 for f in again["findings"] for d in f["detections"])


def test_true_boxes_of_the_examples_give_one_finding_per_lesion() -> None:
    """examples/ground_truth.json's boxes as perfect detections: the single-frame and the multi-frame
    instance of study_01 give the same findings, one per tumour, centred near its true centre."""
    truth = json.loads((EXAMPLES / "ground_truth.json").read_text())
    classes = truth["classes"]
    dets: dict[tuple[str, int], list[Det]] = {}
    for a in truth["annotations"]:
        box = tuple(float(v) for v in a["box"])
        dets.setdefault((a["sop_instance_uid"], a["frame"]), []).append(
            Det(a["label"], classes.index(a["label"]), 1.0, box)  # type: ignore[arg-type]
        )
    single_frames = [f for p in sorted((EXAMPLES / "study_01").glob("*.dcm")) for f in read_frames(p)]
    multi_frames = read_frames(EXAMPLES / "study_01_multiframe" / "MF0001.dcm")
    (single,) = analyse_series(single_frames, dets)
    (multi,) = analyse_series(multi_frames, dets)
    lesions = json.loads((EXAMPLES / "lesions.json").read_text())["series"][0]
    assert lesions["series_instance_uid"] == single.stack.series_uid
    assert len(single.findings) == len(multi.findings) == len(lesions["lesions"])
    for a, b in zip(single.findings, multi.findings, strict=True):
        assert (a.label, a.first_slice, a.last_slice, a.slices) == (
            b.label,
            b.first_slice,
            b.last_slice,
            b.slices,
        )
        np.testing.assert_allclose(a.bbox_min_mm, b.bbox_min_mm, atol=1e-3)
        np.testing.assert_allclose(a.bbox_max_mm, b.bbox_max_mm, atol=1e-3)
        assert a.volume_mm3 == pytest.approx(b.volume_mm3)
    for lesion in lesions["lesions"]:
        (f,) = [f for f in single.findings if f.label == lesion["kind"]]
        assert [d.slice for d in f.detections] == lesion["slices"]
        assert np.linalg.norm(np.subtract(f.centroid_mm, lesion["center_lps_mm"])) <= 5.0
        lo, hi = np.asarray(f.bbox_min_mm), np.asarray(f.bbox_max_mm)
        assert np.all(lo <= lesion["center_lps_mm"]) and np.all(lesion["center_lps_mm"] <= hi)


def test_pairs_at_once_link_exactly_as_pair_by_pair() -> None:
    """``linkable_pairs`` (one IoU matrix per slice and class) gives the same links and IoUs as
    ``linkable`` pair by pair, on boxes with ties: equal areas, touching edges, empty boxes."""
    from retinaedge.runtime.findings import linkable, linkable_pairs

    rng = np.random.default_rng(0)
    links = 0
    for _ in range(300):
        boxes = []
        for n in rng.integers(0, 8, 2):
            xy = rng.integers(0, 40, (int(n), 2)) / rng.choice([1, 2, 4])
            wh = rng.integers(0, 20, (int(n), 2)) / rng.choice([1, 2, 4])
            boxes.append([tuple(float(v) for v in (*p, *(p + s))) for p, s in zip(xy, wh, strict=True)])
        last, new = boxes
        threshold = float(rng.choice([0.1, 0.3, 0.5]))
        expected = sorted(
            (-iou, ti, di)
            for ti, a in enumerate(last)
            for di, b in enumerate(new)
            for ok, iou in [linkable(a, b, threshold)]
            if ok
        )
        assert sorted(linkable_pairs(last, new, threshold)) == expected
        links += len(expected)
    assert links > 100  # the cases do link
