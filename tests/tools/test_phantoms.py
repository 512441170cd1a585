"""The synthetic brain MR generator (tools/phantom) and its DICOM writer (tools/phantom/dicomwrite.py,
tools/make_phantoms.py): determinism, geometry, boxes, DICOM round trips, ground truth, runtime reading."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from support.paths import REPO_ROOT

pytest.importorskip("nilearn")
pytest.importorskip("highdicom")

sys.path.insert(0, str(REPO_ROOT / "tools"))

from phantom import dicomwrite as dw  # noqa: E402
from phantom.study import SyntheticSeries, make_series  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.uid import JPEG2000Lossless, MRImageStorage  # noqa: E402
from retinaedge.runtime.dicomio import iter_frames, open_dicom, validate  # noqa: E402
from retinaedge.runtime.evaluate import parse_ground_truth  # noqa: E402

SMALL = {"rows": 128, "cols": 128, "thickness_mm": 5.0}


@pytest.fixture(scope="module")
def series() -> SyntheticSeries:
    """A small whole-head series with at least one non-difficult box."""
    for seed in range(1001, 1011):
        s = make_series(seed, **SMALL)
        if any(not b.difficult for row in s.boxes for b in row):
            return s
    pytest.fail("no seed in 1001-1010 gave a series with a tumour")


@pytest.fixture(scope="module")
def written(series: SyntheticSeries, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The series written as single frames, one multi-frame instance (both frame orders) and one J2K copy."""
    root = tmp_path_factory.mktemp("phantoms")
    context = dw.study_context(series.seed)
    paths = dw.write_single_frame_series(series, root / "single", context=context, series_number=1)
    mf_path, order = dw.write_multiframe(
        paths,
        root / "multi" / "MF0001.dcm",
        series_instance_uid=dw.phantom_uid(context.study_uid, "series", 101),
        series_number=101,
        sop_instance_uid=dw.phantom_uid(context.study_uid, "multiframe", 101),
    )
    mf_kept, kept_order = dw.write_multiframe(
        paths,
        root / "multi_kept" / "MF0001.dcm",
        series_instance_uid=dw.phantom_uid(context.study_uid, "series", 102),
        series_number=102,
        sop_instance_uid=dw.phantom_uid(context.study_uid, "multiframe", 102),
        include_dimension_index=False,
    )
    s = next(i for i, row in enumerate(series.boxes) if any(not b.difficult for b in row))
    j2k = dw.compress_instance(paths[s], root / "compressed" / "C0001.dcm", JPEG2000Lossless)
    records = [
        dw.record_files(series, paths),
        dw.record_files(series, [mf_path], [order]),
        dw.record_files(series, [mf_kept], [kept_order]),
        dw.record_files(series, [j2k], [[s]]),
    ]
    return {
        "root": root,
        "context": context,
        "paths": paths,
        "multiframe": (mf_path, order),
        "multiframe_kept": (mf_kept, kept_order),
        "compressed": (j2k, s),
        "records": records,
    }


def test_make_series_is_deterministic(series: SyntheticSeries) -> None:
    again = make_series(series.seed, **SMALL)
    assert np.array_equal(again.pixels, series.pixels)
    assert np.array_equal(again.positions, series.positions)
    assert again.boxes == series.boxes
    assert again.lesion_truth() == series.lesion_truth()
    assert series.pixels.dtype == np.uint16 and int(series.pixels.max()) <= 4095


def test_geometry_steps_along_the_normal(series: SyntheticSeries) -> None:
    row, col = series.orientation[:3], series.orientation[3:]
    assert np.isclose(np.dot(row, col), 0.0) and np.isclose(np.linalg.norm(row), 1.0)
    steps = np.diff(series.positions, axis=0)
    assert np.allclose(steps, series.spacing_between_slices * series.normal[None, :], atol=1e-9)
    assert series.spacing_between_slices > 0


def test_boxes_lie_on_their_lesions(series: SyntheticSeries) -> None:
    truth = series.lesion_truth()
    rows, cols = series.pixels.shape[1:]
    dr, dc = series.pixel_spacing
    for s, boxes in enumerate(series.boxes):
        for box in boxes:
            assert 0 <= box.x1 < box.x2 <= cols and 0 <= box.y1 < box.y2 <= rows
            lesion = series.lesions[box.lesion]
            assert box.label == lesion.kind
            assert s in truth[box.lesion]["slices"]
            # The box centre (LPS mm) lies within the lesion's reach (radii, glioma bumps, pose scale).
            cx, cy = (box.x1 + box.x2) / 2 - 0.5, (box.y1 + box.y2) / 2 - 0.5
            centre = series.positions[s] + cx * dc * series.orientation[:3] + cy * dr * series.orientation[3:]
            reach = 1.35 * 1.1 * float(lesion.radii.max()) + series.slice_thickness + 2 * max(dr, dc)
            assert np.linalg.norm(centre - np.array(truth[box.lesion]["center_lps_mm"])) < reach
            if not box.difficult:  # a visible cross-section: the tumour's pixels differ from the background
                patch = series.pixels[s, int(box.y1) : int(box.y2), int(box.x1) : int(box.x2)]
                assert patch.max() > np.median(series.pixels[s])


def test_synthetic_patient_is_synthetic() -> None:
    p = dw.synthetic_patient(1234)
    assert p == dw.synthetic_patient(1234)
    assert p.name.startswith("PHANTOM^") and p.patient_id == "SYN-001234"
    assert p.sex in ("F", "M") and len(p.birth_date) == 8


def test_single_frame_series_reads_back(series: SyntheticSeries, written: dict) -> None:
    paths = written["paths"]
    assert [p.name for p in paths] == [f"IM{i + 1:04d}.dcm" for i in range(len(series.pixels))]
    sop_uids = set()
    for s, path in enumerate(paths):
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert ds.SOPClassUID == MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert np.array_equal(ds.pixel_array, series.pixels[s])
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], series.positions[s], atol=1e-6)
        assert np.allclose([float(v) for v in ds.ImageOrientationPatient], series.orientation)
        assert np.allclose([float(v) for v in ds.PixelSpacing], series.pixel_spacing)
        assert np.isclose(float(ds.SpacingBetweenSlices), series.spacing_between_slices)
        assert np.isclose(float(ds.SliceLocation), np.dot(series.positions[s], series.normal), atol=1e-6)
        assert int(ds.InstanceNumber) == s + 1
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert ds.Modality == "MR" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert "SYNTHETIC" in ds.SeriesDescription and "not a patient" in ds.ImageComments
        assert str(ds.PatientName).startswith("PHANTOM^")
        assert ds.StudyInstanceUID == written["context"].study_uid
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == len(paths)


def test_single_frame_series_is_deterministic(series: SyntheticSeries, written: dict, tmp_path: Path) -> None:
    again = dw.write_single_frame_series(
        series, tmp_path, context=dw.study_context(series.seed), series_number=1
    )
    for a, b in zip(written["paths"], again, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_multiframe_frames_and_positions(series: SyntheticSeries, written: dict) -> None:
    singles = [dcmread(p) for p in written["paths"]]
    for key, expected_order in (
        ("multiframe", list(range(len(singles)))[::-1]),  # highdicom's volume order: superior to inferior
        ("multiframe_kept", list(range(len(singles)))),  # no dimension index: the order given
    ):
        path, order = written[key]
        assert order == expected_order
        mf = dcmread(path)
        assert mf.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.4"  # Legacy Converted Enhanced MR
        assert int(mf.NumberOfFrames) == len(singles)
        assert np.array_equal(mf.pixel_array, series.pixels[order])
        for frame, (item, s) in enumerate(zip(mf.PerFrameFunctionalGroupsSequence, order, strict=True)):
            pos = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
            assert pos == [float(v) for v in singles[s].ImagePositionPatient], frame
            ref = item.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID
            assert ref == singles[s].SOPInstanceUID
        shared = mf.SharedFunctionalGroupsSequence[0]
        assert np.allclose(
            [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], series.pixel_spacing
        )
    assert "DimensionIndexSequence" in dcmread(written["multiframe"][0], stop_before_pixels=True)


def test_compressed_instance_is_lossless(series: SyntheticSeries, written: dict) -> None:
    path, s = written["compressed"]
    ds = dcmread(path)
    original = dcmread(written["paths"][s])
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(ds.pixel_array, series.pixels[s])
    assert ds.SOPInstanceUID != original.SOPInstanceUID
    assert ds.SeriesInstanceUID != original.SeriesInstanceUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.StudyInstanceUID == original.StudyInstanceUID


def _all_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.dcm"))


def test_ground_truth_refers_to_written_frames(series: SyntheticSeries, written: dict) -> None:
    gt = dw.ground_truth(written["records"])
    parsed = parse_ground_truth(json.loads(json.dumps(gt)))  # what `retinaedge eval` accepts
    assert parsed.classes == ("glioma", "meningioma", "pituitary")
    frames = {}
    for path in _all_files(written["root"]):
        ds = dcmread(path, stop_before_pixels=True)
        frames[str(ds.SOPInstanceUID)] = int(ds.get("NumberOfFrames", 1) or 1)
    assert all(
        a.sop_instance_uid in frames and a.frame < frames[a.sop_instance_uid] for a in parsed.annotations
    )
    boxes = sum(len(row) for row in series.boxes)
    _, s = written["compressed"]
    assert len(parsed.annotations) == 3 * boxes + len(series.boxes[s])
    # Every frame of the multi-frame instance carries the boxes of the slice it holds.
    mf_path, order = written["multiframe"]
    mf_uid = str(dcmread(mf_path, stop_before_pixels=True).SOPInstanceUID)
    for frame, s in enumerate(order):
        mine = [a for a in parsed.annotations if a.sop_instance_uid == mf_uid and a.frame == frame]
        assert sorted(a.box for a in mine) == sorted((b.x1, b.y1, b.x2, b.y2) for b in series.boxes[s])
    truth = dw.lesion_truth(written["records"], root=written["root"])
    assert "NOTICE-MNI-ICBM152.txt" in truth["notice"]
    for entry in truth["series"]:
        for lesion in entry["lesions"]:
            assert all(ref["sop_instance_uid"] in frames for ref in lesion["appears_on"])
        for inst in entry["instances"]:
            assert (written["root"] / inst["file"]).is_file()


def test_runtime_reads_every_file(series: SyntheticSeries, written: dict) -> None:
    files = _all_files(written["root"])
    assert len(files) == len(series.pixels) + 3
    for path in files:
        with open_dicom(path) as src:
            info = validate(src)
            decoded = [arr for arr, _ in iter_frames(src, info)]
        assert len(decoded) == info.frames
        assert all(arr.shape == series.pixels.shape[1:] for arr in decoded)


def test_cli_output_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import make_phantoms

    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        argv = [str(out), "--seed", "2000", "--studies", "1", "--multiframe", "1", "--compressed", "1"]
        assert make_phantoms.main([*argv, "--rows", "96", "--cols", "96"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["studies"][0]["dir"] == "study_01" and summary["studies"][0]["seed"] == 2001
        files = sorted(p for p in out.rglob("*") if p.is_file())
        digests.append(
            {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
        )
    assert digests[0] == digests[1]
    names = set(digests[0])
    assert {
        "ground_truth.json",
        "lesions.json",
        "NOTICE-MNI-ICBM152.txt",
        "study_01_multiframe/MF0001.dcm",
    } <= names
    assert any(n.startswith("compressed/") for n in names)
    gt = parse_ground_truth(json.loads((tmp_path / "a" / "ground_truth.json").read_text()))
    uids = {
        str(dcmread(tmp_path / "a" / n, stop_before_pixels=True).SOPInstanceUID)
        for n in names
        if n.endswith(".dcm")
    }
    assert {a.sop_instance_uid for a in gt.annotations} <= uids
