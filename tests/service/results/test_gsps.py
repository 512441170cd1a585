"""The ``gsps`` document (service/results/gsps.py): the findings of one instance over its image as a
Grayscale Softcopy Presentation State, on the examples' single-frame, multi-frame and JPEG 2000
instances as the demo model reads them.

Checked: the boxes are exactly the result's findings (a detection below the operating point is not
drawn), each on its frame; highdicom's own constructors accept what is read back; dicom3tools'
``dciodvfy`` finds no error; dcmtk's ``dcmp2pgm`` renders each image under its GSPS, at the image's size
and with the image's window.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from retinaedge.runtime.detector import Detector
from retinaedge.service.results.dicomdoc import document_series_uid
from retinaedge.service.results.evidence import header_from_json, split_header
from retinaedge.service.results.gsps import build_gsps, instance_gsps
from retinaedge.service.results.selection import findings_by_frame, frame_findings
from retinaedge.service.results.views import InstanceView, NothingToReport, Unavailable
from support.paths import DEMO, EXAMPLES
from support.peers_dcmtk import dcmtk

SOURCES = {
    "single-frame": EXAMPLES / "study_01" / "IM0015.dcm",
    "multi-frame": EXAMPLES / "study_01_multiframe" / "MF0001.dcm",
    "jpeg2000": EXAMPLES / "compressed" / "study_01_IM0016_J2K.dcm",
}
GSPS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


@pytest.fixture(scope="module")
def detected() -> dict[str, tuple[InstanceView, Dataset]]:
    """Each source through the demo model (as ``retinaedge detect`` runs it): its view (result and kept
    header, as the service keeps them) and the source's own header."""
    out = {}
    with Detector.open(DEMO, threads=1) as det:
        manifest = det.bundle.manifest
        for name, source in SOURCES.items():
            result = det.detect(source).to_json()
            with open(source, "rb") as fh:
                evidence, identity = split_header(fh)
            view = InstanceView(
                str(result["sop_instance_uid"]),
                result,
                evidence,
                manifest.name,
                str(manifest.model_sha256),
                identity,
            )
            out[name] = (view, pydicom.dcmread(source, stop_before_pixels=True))
    return out


def boxes_of(gsps: Dataset) -> dict[int, list[tuple[float, ...]]]:
    """Frame number (1 when the annotation names none) -> the boxes drawn on it, as (x1, y1, x2, y2)."""
    out: dict[int, list[tuple[float, ...]]] = {}
    for annotation in gsps.GraphicAnnotationSequence:
        (ref,) = annotation.ReferencedImageSequence
        frame = int(ref.get("ReferencedFrameNumber", 1))
        for obj in annotation.GraphicObjectSequence:
            points = np.asarray(obj.GraphicData, dtype=np.float64).reshape(-1, 2)
            assert (obj.GraphicType, obj.GraphicAnnotationUnits, obj.NumberOfGraphicPoints) == (
                "POLYLINE",
                "PIXEL",
                5,
            )
            assert np.array_equal(points[0], points[-1])  # closed
            x1, y1 = points.min(axis=0)
            x2, y2 = points.max(axis=0)
            out.setdefault(frame, []).append((x1, y1, x2, y2))
    return out


@pytest.mark.parametrize("name", list(SOURCES))
def test_the_boxes_are_exactly_the_findings_each_on_its_frame(
    detected: dict[str, tuple[InstanceView, Dataset]], name: str
) -> None:
    view, source = detected[name]
    gsps = instance_gsps(view)
    multiframe = int(source.get("NumberOfFrames", 1)) > 1
    expected = {
        index + 1: [tuple(float(v) for v in d["box"]) for d in dets]
        for index, dets in findings_by_frame(view.result).items()
    }
    assert expected, "the demo model finds something on each example (so there is something to check)"
    drawn = boxes_of(gsps)
    assert sorted(drawn) == sorted(expected)
    for frame, boxes in expected.items():
        assert len(drawn[frame]) == len(boxes)
        assert np.abs(np.asarray(drawn[frame]) - np.asarray(boxes)).max() <= 0.5, frame
    for annotation in gsps.GraphicAnnotationSequence:
        (ref,) = annotation.ReferencedImageSequence
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
            source.SOPClassUID,
            source.SOPInstanceUID,
        )
        assert ("ReferencedFrameNumber" in ref) == multiframe
        assert annotation.GraphicLayer == "FINDINGS"
        texts = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
        assert len(texts) == len(annotation.GraphicObjectSequence)
        assert all(re.fullmatch(r"\S+ [01]\.\d\d", t) for t in texts), texts
    (series,) = gsps.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedImageSequence] == [source.SOPInstanceUID]


def test_a_detection_that_is_not_a_finding_is_not_drawn(
    detected: dict[str, tuple[InstanceView, Dataset]],
) -> None:
    """The demo bundle has an operating point: some detections are below it (``finding: false``)."""
    for view, _ in detected.values():
        gsps = instance_gsps(view)
        drawn = sum(len(b) for b in boxes_of(gsps).values())
        detections = [d for f in view.result["frames"] for d in f["detections"]]
        assert drawn == sum(d["finding"] for d in detections)
    assert any(
        not d["finding"] for v, _ in detected.values() for f in v.result["frames"] for d in f["detections"]
    )


def test_findings_of_a_frame_treat_a_missing_key_as_a_finding() -> None:
    frame = {"index": 0, "detections": [{"score": 0.9}, {"score": 0.2, "finding": False}, {"finding": True}]}
    assert frame_findings(frame) == [{"score": 0.9}, {"finding": True}]
    result = {
        "frames": [
            {"index": 0, "detections": []},
            {"index": 3, "detections": [{"finding": False}]},
            frame | {"index": 5},
        ]
    }
    assert list(findings_by_frame(result)) == [5]


def test_an_instance_without_findings_has_no_gsps(detected: dict[str, tuple[InstanceView, Dataset]]) -> None:
    view, _ = detected["single-frame"]
    below = {
        **view.result,
        "frames": [
            {**f, "detections": [{**d, "finding": False} for d in f["detections"]]}
            for f in view.result["frames"]
        ],
    }
    with pytest.raises(NothingToReport):
        instance_gsps(InstanceView(view.uid, below, view.header_json, view.model_name, view.model_sha256))
    # A result stored before operating points (no "finding" key): every detection is drawn.
    older = {
        **view.result,
        "frames": [
            {**f, "detections": [{k: v for k, v in d.items() if k != "finding"} for d in f["detections"]]}
            for f in view.result["frames"]
        ],
    }
    gsps = instance_gsps(InstanceView(view.uid, older, view.header_json, view.model_name, view.model_sha256))
    assert sum(len(b) for b in boxes_of(gsps).values()) == sum(len(f["detections"]) for f in older["frames"])
    with pytest.raises(Unavailable) as info:
        instance_gsps(InstanceView(view.uid, view.result, None, view.model_name, view.model_sha256))
    assert not isinstance(info.value, NothingToReport)  # the header is missing: not "nothing to report"


@pytest.mark.parametrize("name", list(SOURCES))
def test_the_image_shows_as_the_site_reads_it_and_the_document_says_who_made_it(
    detected: dict[str, tuple[InstanceView, Dataset]], name: str
) -> None:
    view, source = detected[name]
    gsps = instance_gsps(view)
    (voi,) = gsps.SoftcopyVOILUTSequence  # one window for the image (every frame of the multi-frame one)
    assert "ReferencedImageSequence" not in voi
    window = (
        source
        if "WindowCenter" in source
        else source.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    )
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (
        float(window.WindowCenter),
        float(window.WindowWidth),
    )
    assert gsps.PresentationLUTShape == "IDENTITY"  # MONOCHROME2
    if "SharedFunctionalGroupsSequence" in source:  # the enhanced image's rescale, repeated
        assert (float(gsps.RescaleSlope), float(gsps.RescaleIntercept), gsps.RescaleType) == (1.0, 0.0, "US")
    else:
        assert "RescaleSlope" not in gsps  # the MR image has none
    (area,) = gsps.DisplayedAreaSelectionSequence
    assert list(area.DisplayedAreaBottomRightHandCorner) == [source.Columns, source.Rows]
    assert (gsps.SOPClassUID, gsps.Modality) == (GSPS_SOP_CLASS, "PR")
    assert gsps.SeriesInstanceUID == document_series_uid("gsps", source.StudyInstanceUID, view.model_sha256)
    assert gsps.SeriesInstanceUID != source.SeriesInstanceUID
    again = instance_gsps(view)
    assert again.SeriesInstanceUID == gsps.SeriesInstanceUID and again.SOPInstanceUID != gsps.SOPInstanceUID
    assert gsps.Manufacturer == "retinaedge" and gsps.ManufacturerModelName == view.model_name
    assert any(view.model_sha256[:16] in v for v in gsps.SoftwareVersions)
    assert gsps.PresentationCreationDate and gsps.PresentationCreationTime
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "StudyInstanceUID",
        "AccessionNumber",
        "StudyID",
    ):
        assert gsps.get(keyword) == source.get(keyword), keyword


def test_the_grey_scale_pipeline_follows_the_image(detected: dict[str, tuple[InstanceView, Dataset]]) -> None:
    """MONOCHROME1 keeps its polarity (INVERSE), a CT rescale without a type is in HU, non-square pixels
    keep their aspect ratio, and an image without a window gets no VOI."""
    view, _ = detected["single-frame"]
    assert view.header_json is not None
    header = header_from_json(view.header_json, view.identity)
    found = findings_by_frame(view.result)
    header.PhotometricInterpretation = "MONOCHROME1"
    header.Modality = "CT"
    header.RescaleSlope, header.RescaleIntercept = 1, -1024
    header.PixelSpacing = [0.5, 0.25]
    del header.WindowCenter, header.WindowWidth
    gsps = build_gsps(header, found, view.model_name, view.model_sha256)
    assert gsps.PresentationLUTShape == "INVERSE"
    assert (float(gsps.RescaleIntercept), gsps.RescaleType) == (-1024.0, "HU")
    assert list(gsps.DisplayedAreaSelectionSequence[0].PresentationPixelAspectRatio) == [2, 1]
    assert "SoftcopyVOILUTSequence" not in gsps


def test_highdicom_accepts_what_is_read_back(
    tmp_path: Path, detected: dict[str, tuple[InstanceView, Dataset]]
) -> None:
    """highdicom 0.28 has no reader for presentation states; its constructors, which check graphic types,
    point counts, units and that every coordinate lies on the image, are given what the file holds."""
    from highdicom.pr import (
        AnnotationUnitsValues,
        GraphicAnnotation,
        GraphicLayer,
        GraphicObject,
        GraphicTypeValues,
        TextObject,
    )

    for name, (view, source) in detected.items():
        path = tmp_path / f"{name}.dcm"
        instance_gsps(view).save_as(path, enforce_file_format=True)
        read = pydicom.dcmread(path)
        (layer,) = read.GraphicLayerSequence
        for annotation in read.GraphicAnnotationSequence:
            (ref,) = annotation.ReferencedImageSequence
            GraphicAnnotation(
                [source],
                GraphicLayer(layer.GraphicLayer, int(layer.GraphicLayerOrder)),
                referenced_frame_number=ref.get("ReferencedFrameNumber"),
                graphic_objects=[
                    GraphicObject(
                        GraphicTypeValues(o.GraphicType),
                        np.asarray(o.GraphicData, dtype=np.float64).reshape(-1, 2),
                        AnnotationUnitsValues(o.GraphicAnnotationUnits),
                    )
                    for o in annotation.GraphicObjectSequence
                ],
                text_objects=[
                    TextObject(
                        t.UnformattedTextValue,
                        AnnotationUnitsValues(t.AnchorPointAnnotationUnits),
                        anchor_point=tuple(float(v) for v in t.AnchorPoint),
                    )
                    for t in annotation.TextObjectSequence
                ],
            )


DCIODVFY = shutil.which("dciodvfy")
#: dciodvfy's one warning: the multi-frame example states no body part, so Laterality is present and
#: empty (unknown), which it notes (PS3.3 C.7.3.1: Type 2C, empty when unknown).
ALLOWED_WARNING = "should be absent (not empty) if an unpaired body part"


@pytest.mark.skipif(DCIODVFY is None, reason="needs dicom3tools' dciodvfy (installed by .ci/run)")
@pytest.mark.parametrize("name", list(SOURCES))
def test_dciodvfy_finds_no_error(
    tmp_path: Path, detected: dict[str, tuple[InstanceView, Dataset]], name: str
) -> None:
    path = tmp_path / "gsps.dcm"
    instance_gsps(detected[name][0]).save_as(path, enforce_file_format=True)
    out = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "GrayscaleSoftcopyPresentationState" in text, text[:500]  # it recognised the IOD it checked
    findings = [ln for ln in text.splitlines() if ln.startswith(("Error", "Warning"))]
    assert not [f for f in findings if f.startswith("Error")], findings
    assert not [f for f in findings if ALLOWED_WARNING not in f], findings


def read_pgm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    header = re.match(rb"P5\s+(\d+)\s+(\d+)\s+(\d+)\s", data)
    assert header is not None and int(header[3]) == 255, data[:20]
    return np.frombuffer(data[header.end() :], dtype=np.uint8).reshape(int(header[2]), int(header[1]))


@pytest.mark.parametrize("name", list(SOURCES))
def test_dcmp2pgm_renders_the_image_under_the_gsps(
    tmp_path: Path, detected: dict[str, tuple[InstanceView, Dataset]], name: str
) -> None:
    """dcmtk's presentation state renderer: exit 0, a bitmap of the image's size, and its grey levels the
    image's window (DICOM's linear VOI function, PS3.3 C.11.2.1.2.1) within one level. Debian's dcmtk has
    no JPEG 2000 decoder, so the JPEG 2000 instance is rendered from an uncompressed copy (same UIDs)."""
    tools = dcmtk()
    view, source = detected[name]
    gsps = instance_gsps(view)
    pstate = tmp_path / "gsps.dcm"
    gsps.save_as(pstate, enforce_file_format=True)
    image = pydicom.dcmread(SOURCES[name])
    image_path = SOURCES[name]
    if image.file_meta.TransferSyntaxUID.is_compressed:
        image.decompress()
        image_path = tmp_path / "decompressed.dcm"
        image.save_as(image_path, enforce_file_format=True)
    frame = min(findings_by_frame(view.result)) + 1
    out = tmp_path / "rendered.pgm"
    run = tools.run("dcmp2pgm", "-f", str(frame), "-p", str(pstate), str(image_path), str(out))
    assert run.returncode == 0, run.stdout
    rendered = read_pgm(out)
    assert rendered.shape == (image.Rows, image.Columns)
    pixels = image.pixel_array[frame - 1] if int(image.get("NumberOfFrames", 1)) > 1 else image.pixel_array
    (voi,) = gsps.SoftcopyVOILUTSequence
    c, w = float(voi.WindowCenter), float(voi.WindowWidth)
    expected = np.clip((pixels.astype(np.float64) - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255
    assert np.abs(rendered - expected).max() <= 1.0
