"""The secondary captures (result document ``sc``), made as the service makes them
(:class:`~retinaedge.service.results.captures.CaptureMaker`) from the demo model's results.

Checked by an independent validator (dicom3tools' ``dciodvfy``: no error), read back by highdicom, and
pixel by pixel: each finding's outline lies exactly on its box in the result JSON (a box moved by 2
pixels fails), findings only (a detection below the operating point is not drawn), and no pixel outside
the outlines, the labels and the notice differs from the frame windowed as the model saw it.
"""

from __future__ import annotations

import copy
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from retinaedge.runtime.bundle import load_bundle
from retinaedge.runtime.detector import Detector
from retinaedge.runtime.frames import seen_frames
from retinaedge.runtime.instance_result import Detection
from retinaedge.runtime.overlay import COLOURS, BurnedIn, burn_in, outline_width
from retinaedge.service.results.captures import CaptureFiles, CaptureMaker
from retinaedge.service.results.evidence import header_from_json, split_header
from retinaedge.service.results.sc import NOTICE, SC_IMAGE_STORAGE
from retinaedge.service.results.selection import findings_by_frame
from support.paths import DEMO, EXAMPLES

SINGLE = EXAMPLES / "study_01" / "IM0015.dcm"
MULTI = EXAMPLES / "study_01_multiframe" / "MF0001.dcm"
NO_FINDINGS = EXAMPLES / "study_01" / "IM0001.dcm"
DCIODVFY = shutil.which("dciodvfy")


@pytest.fixture(scope="module")
def results() -> dict[Path, dict[str, Any]]:
    with Detector.open(DEMO, threads=1) as det:
        return {f: det.detect(f).to_json() for f in (SINGLE, MULTI, NO_FINDINGS)}


@pytest.fixture(scope="module")
def maker(tmp_path_factory: pytest.TempPathFactory) -> CaptureMaker:
    return CaptureMaker(CaptureFiles(tmp_path_factory.mktemp("captures")), load_bundle(DEMO).manifest)


def header(source: Path) -> pydicom.Dataset:
    with open(source, "rb") as fh:
        return header_from_json(*split_header(fh))


def make(maker: CaptureMaker, source: Path, result: dict[str, Any]) -> dict[int, Path]:
    """Frame number -> SC file, made and installed as the service does."""
    uid = str(result["sop_instance_uid"])
    maker.files.install(uid, maker.make(source, result, header(source)))
    return maker.files.frames(uid)


def windowed(maker: CaptureMaker, source: Path, index: int) -> np.ndarray:
    """Frame ``index`` as the model saw it, at its own size, as 8-bit RGB: nothing drawn."""
    m = maker.manifest
    ((_, chw),) = list(seen_frames(source, [index], m.preprocessing, m.input))
    grey = np.clip(np.rint(chw[0] * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def drawn(maker: CaptureMaker, source: Path, index: int, findings: list[dict[str, Any]]) -> BurnedIn:
    m = maker.manifest
    ((_, chw),) = list(seen_frames(source, [index], m.preprocessing, m.input))
    dets = [Detection(d["label"], d["class_id"], d["score"], tuple(d["box"])) for d in findings]  # type: ignore[arg-type]
    return burn_in(chw, dets, NOTICE)


def outline(box: list[float], shape: tuple[int, ...], width: int) -> np.ndarray:
    """The outline a box's JSON edges mean: ``width`` pixels inside the rounded edges (a mask)."""
    h, w = shape[:2]
    x1, y1, x2, y2 = (round(v) for v in box)
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    mask = np.zeros((h, w), bool)
    mask[y1:y2, x1:x2] = True
    mask[y1 + width : y2 - width, x1 + width : x2 - width] = False
    return mask


def rects(mask_shape: tuple[int, ...], bounds: list[tuple[int, int, int, int]]) -> np.ndarray:
    mask = np.zeros(mask_shape[:2], bool)
    for x0, y0, x1, y1 in bounds:
        mask[y0:y1, x0:x1] = True
    return mask


def boxes_on_their_edges(
    pixels: np.ndarray, findings: list[dict[str, Any]], covered: np.ndarray
) -> list[str]:
    """What is wrong with the outlines in ``pixels``: every pixel of each finding's outline (from its
    JSON box) not ``covered`` by a label, the notice or another outline has the class's colour, and
    the ring of pixels just outside it does not (so a box drawn 2 pixels off is found)."""
    width = outline_width(*pixels.shape[:2])
    masks = [outline(d["box"], pixels.shape, width) for d in findings]
    wrong = []
    for k, d in enumerate(findings):
        colour = np.array(COLOURS[d["class_id"] % len(COLOURS)], np.uint8)
        others = np.zeros_like(covered)
        for j, m in enumerate(masks):
            if j != k:
                others |= m
        mine = masks[k] & ~covered & ~others
        if not mine.any() or not (pixels[mine] == colour).all(axis=-1).all():
            wrong.append(f"finding {k} ({d['label']}): its outline is not where its box says")
        x1, y1, x2, y2 = (round(v) for v in d["box"])
        ring = outline([x1 - 1, y1 - 1, x2 + 1, y2 + 1], pixels.shape, 1) & ~covered & ~others
        if ring.any() and (pixels[ring] == colour).all(axis=-1).any():
            wrong.append(f"finding {k} ({d['label']}): its colour spills outside its box")
    return wrong


@pytest.mark.skipif(DCIODVFY is None, reason="needs dicom3tools' dciodvfy (installed by .ci/run)")
@pytest.mark.parametrize("source", [SINGLE, MULTI], ids=["single-frame", "multi-frame"])
def test_dciodvfy_finds_no_error(maker: CaptureMaker, results: dict[Path, Any], source: Path) -> None:
    files = make(maker, source, results[source])
    assert files
    for path in files.values():
        out = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=120)
        text = out.stdout + out.stderr
        assert "SCImage" in text, text[:500]  # it recognised the IOD it checked
        errors = [ln for ln in text.splitlines() if ln.startswith("Error")]
        assert not errors, errors
        # The one warning allowed: the multi-frame example names neither body part nor laterality, so
        # the SC's Laterality is empty (unknown), which dciodvfy points out.
        warnings = [ln for ln in text.splitlines() if ln.startswith("Warning")]
        assert all("<Laterality>" in w for w in warnings), warnings


@pytest.mark.parametrize("source", [SINGLE, MULTI], ids=["single-frame", "multi-frame"])
def test_highdicom_reads_it_back_and_it_references_exactly_its_source_frame(
    maker: CaptureMaker, results: dict[Path, Any], source: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import highdicom as hd

    src = pydicom.dcmread(source, stop_before_pixels=True)
    multiframe = int(src.get("NumberOfFrames", 1)) > 1
    files = make(maker, source, results[source])
    assert list(files) == [i + 1 for i in findings_by_frame(results[source])]
    series = set()
    for number, path in files.items():
        with caplog.at_level(logging.ERROR, logger="highdicom"):  # highdicom 0.28 warns of a reference
            image = hd.imread(str(path))  # it then finds (a tuple compared with a UID)
            assert image.get_source_image_uids() == [
                (src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)
            ]
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == SC_IMAGE_STORAGE and ds.file_meta.MediaStorageSOPClassUID == SC_IMAGE_STORAGE
        (ref,) = ds.SourceImageSequence
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
            src.SOPClassUID,
            src.SOPInstanceUID,
        )
        assert ref.get("ReferencedFrameNumber") == (number if multiframe else None)
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"] and ds.BurnedInAnnotation == "YES"
        assert ds.ImageComments.startswith(NOTICE) and ds.DerivationDescription.startswith(NOTICE)
        assert (ds.Rows, ds.Columns) == (src.Rows, src.Columns)  # the frame's own size
        assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated) == ("RGB", 3, 8)
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert image.pixel_array.shape == (src.Rows, src.Columns, 3)
        series.add(ds.SeriesInstanceUID)
    assert len(series) == 1  # all in the study's SC series


def test_both_sources_land_in_one_series_of_the_study(maker: CaptureMaker, results: dict[Path, Any]) -> None:
    """The single-frame and the multi-frame instance are in the same study: one SC series."""
    found = {
        pydicom.dcmread(p).SeriesInstanceUID
        for s in (SINGLE, MULTI)
        for p in make(maker, s, results[s]).values()
    }
    assert len(found) == 1


@pytest.mark.parametrize("source", [SINGLE, MULTI], ids=["single-frame", "multi-frame"])
def test_the_outlines_lie_on_the_boxes_and_nothing_else_changed(
    maker: CaptureMaker, results: dict[Path, Any], source: Path
) -> None:
    result = results[source]
    wanted = findings_by_frame(result)
    for number, path in make(maker, source, result).items():
        pixels = pydicom.dcmread(path).pixel_array
        findings = wanted[number - 1]
        picture = drawn(maker, source, number - 1, findings)
        assert np.array_equal(pixels, picture.image)  # the stored SC is this drawing
        covered = rects(pixels.shape, [*picture.labels, picture.notice])
        assert boxes_on_their_edges(pixels, findings, covered) == []
        # A box 2 pixels to the right, or 2 down, is not what was drawn.
        for dx, dy in ((2, 0), (0, 2)):
            moved = copy.deepcopy(findings)
            moved[0]["box"] = [
                moved[0]["box"][0] + dx,
                moved[0]["box"][1] + dy,
                moved[0]["box"][2] + dx,
                moved[0]["box"][3] + dy,
            ]
            assert boxes_on_their_edges(pixels, moved, covered), (dx, dy)
        # Outside the outlines, the labels and the notice: the frame as the model saw it, unchanged.
        width = outline_width(*pixels.shape[:2])
        allowed = covered.copy()
        for d in findings:
            allowed |= outline(d["box"], pixels.shape, width)
        changed = (pixels != windowed(maker, source, number - 1)).any(axis=-1)
        assert not (changed & ~allowed).any(), np.argwhere(changed & ~allowed)[:5]
        assert changed.any()
        # Each label touches its box's column and lies just above or below it, or inside its top edge.
        for (x0, y0, _x1, y1), d in zip(
            picture.labels, sorted(findings, key=lambda f: f["score"]), strict=True
        ):
            bx1, by1, _bx2, by2 = (round(v) for v in d["box"])
            assert x0 <= bx1 or x0 == pixels.shape[1] - (_x1 - x0)
            assert y1 == by1 or y0 == by2 or y0 == by1


def test_a_detection_that_is_not_a_finding_is_not_drawn(
    maker: CaptureMaker, results: dict[Path, Any]
) -> None:
    """Findings only: a detection with ``finding: false`` leaves its pixels as they were; a stored
    detection without the key (a bundle without an operating point) is a finding."""
    result = copy.deepcopy(results[SINGLE])
    frame = result["frames"][0]
    frame["detections"] = [d for d in frame["detections"] if d["finding"]][:1]
    kept = frame["detections"][0]
    kept.pop("finding")  # missing: a finding
    hidden = {
        "label": "glioma",
        "class_id": 0,
        "score": 0.99,
        "box": [20.0, 20.0, 60.0, 60.0],
        "finding": False,
    }
    frame["detections"].append(hidden)
    files = make(maker, SINGLE, result)
    pixels = pydicom.dcmread(files[1]).pixel_array
    base = windowed(maker, SINGLE, 0)
    ring = outline(hidden["box"], pixels.shape, outline_width(*pixels.shape[:2]))
    assert np.array_equal(pixels[ring], base[ring])
    assert not np.array_equal(
        pixels[outline(kept["box"], pixels.shape, 1)], base[outline(kept["box"], pixels.shape, 1)]
    )


def test_an_instance_without_findings_has_no_captures(maker: CaptureMaker, results: dict[Path, Any]) -> None:
    result = results[NO_FINDINGS]
    assert not findings_by_frame(result)
    assert maker.make(NO_FINDINGS, result, header(NO_FINDINGS)) is None


def test_a_new_result_replaces_the_captures_and_retention_removes_them(
    tmp_path: Path, results: dict[Path, Any]
) -> None:
    maker = CaptureMaker(CaptureFiles(tmp_path / "captures"), load_bundle(DEMO).manifest)
    result = results[MULTI]
    uid = str(result["sop_instance_uid"])
    first = make(maker, MULTI, result)
    fewer = copy.deepcopy(result)
    keep = min(findings_by_frame(result))
    for frame in fewer["frames"]:
        if frame["index"] != keep:
            frame["detections"] = []
    wanted = [i + 1 for i in findings_by_frame(fewer)]
    assert make(maker, MULTI, fewer) == {n: first[n] for n in wanted} and len(wanted) < len(first)
    assert maker.files.png(uid, wanted[0]) is not None
    maker.files.install(uid, None)  # a new result without findings
    assert maker.files.frames(uid) == {}
    make(maker, MULTI, result)
    maker.files.delete([uid])
    assert not maker.files.path(uid).exists()
    make(maker, MULTI, result)
    (maker.files.root / ".made-left-by-a-crash").mkdir()
    assert maker.files.keep_only([]) == 2 and list(maker.files.root.iterdir()) == []


def test_captures_are_trimmed_to_their_budget_oldest_first(tmp_path: Path) -> None:
    """captures_max_bytes: the oldest instances' captures go first; makings under way are left alone."""
    import os

    from retinaedge.service.results.captures import CaptureFiles

    files = CaptureFiles(tmp_path / "captures")
    for k, uid in enumerate(["1.2.3.1", "1.2.3.2", "1.2.3.3"]):
        folder = files.path(uid)
        folder.mkdir()
        (folder / "1.dcm").write_bytes(b"\0" * 1000)
        (folder / "1.png").write_bytes(b"\0" * 500)
        os.utime(folder, (1_000_000 + k, 1_000_000 + k))  # made in this order
    (tmp_path / "captures" / ".made-x").mkdir()  # a making under way
    assert files.trim(10_000) == 0
    assert files.trim(3000) == 1  # 4500 bytes kept -> the oldest goes, 3000 are left
    assert files.frames("1.2.3.1") == {} and set(files.frames("1.2.3.2")) == {1}
    assert files.trim(0) == 2 and (tmp_path / "captures" / ".made-x").is_dir()
