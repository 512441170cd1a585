"""Series findings through the HTTP service: quiet period, completion on request, re-opening, the series
DICOM SR with 3D coordinates, and agreement with ``retinaedge detect --series`` (the runtime's linking)
on the demo model and the sample studies, over a real uvicorn server and real clients."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid
from retinaedge.runtime.bundle import load_bundle
from retinaedge.runtime.detector import Detector
from retinaedge.runtime.findings import LinkParams, analyse_series
from retinaedge.runtime.slices import read_frames
from support.paths import DEMO, EXAMPLES
from support.polling import wait_until
from support.servers import serve

CLASS_CODES = load_bundle(DEMO).manifest.class_codes

SINGLE = sorted((EXAMPLES / "study_01").glob("*.dcm"))
MULTI = EXAMPLES / "study_01_multiframe" / "MF0001.dcm"

pytestmark = pytest.mark.skipif(not (DEMO / "model.onnx").exists(), reason="models/demo is missing")


def series_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def stow(base: str, paths: list[Path]) -> None:
    client = DICOMwebClient(url=f"{base}/dicomweb")
    response = client.store_instances([pydicom.dcmread(p) for p in paths])
    assert len(response.get("ReferencedSOPSequence", [])) == len(paths)


def poll_series(client: httpx.Client, base: str, uid: str, timeout: float = 240) -> dict:
    """GET /v1/series/{uid} until it is complete (200)."""

    def complete() -> dict | None:  # type: ignore[type-arg]
        r = client.get(f"{base}/v1/series/{uid}")
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 202, r.text
        assert int(r.headers["retry-after"]) >= 1
        return None

    return wait_until(
        complete, f"series {uid} complete", lambda body: body is not None, timeout=timeout, interval=0.25
    )


def wait_processed(client: httpx.Client, base: str, uid: str, timeout: float = 240) -> dict:
    """GET /v1/series/{uid} until no instance is pending (the body of the last answer)."""
    return wait_until(
        lambda: client.get(f"{base}/v1/series/{uid}").json(),
        "no instance pending",
        lambda body: body["instances"]["pending"] == 0,
        timeout=timeout,
        interval=0.25,
    )


def key(f: dict) -> tuple:  # type: ignore[type-arg]
    return (f["label"], f["first_slice"], f["last_slice"], f["slices"])


def test_quiet_period_completes_a_series_with_the_runtime_findings(tmp_path: Path) -> None:
    """27 single-frame instances by STOW-RS; after the quiet period the findings equal those the runtime
    links from the same detections (``detect --series``), with the default parameters."""
    uid = series_uid(SINGLE[0])
    with (
        serve(model=DEMO, data_dir=tmp_path / "data", series_quiet_s=2.0) as base,
        httpx.Client(timeout=60) as c,
    ):
        first = c.get(f"{base}/v1/series/{uid}")
        assert first.status_code == 404 and first.headers["content-type"] == "application/problem+json"
        stow(base, SINGLE)
        early = c.get(f"{base}/v1/series/{uid}")
        assert early.status_code == 202 and early.json()["state"] == "collecting"
        body = poll_series(c, base, uid)
    assert body["state"] == "complete" and body["completed_by"] == "quiet-period"
    assert body["instances"] == {"received": 27, "pending": 0, "done": 27, "failed": 0, "not_applicable": 0}
    assert body["stack"]["consistent"] and body["stack"]["slices"] == 27
    # The demo bundle has an operating point: its findings are linked, with no further score floor.
    assert body["parameters"] == LinkParams(min_score=0.0).to_json()
    assert body["model"]["name"] == "retinaedge-demo-brainmr"
    with Detector.open(DEMO) as det:
        results = [det.detect(p) for p in SINGLE]
    frames = [f for p in SINGLE for f in read_frames(p)]
    detections = {
        (r.sop_instance_uid, fr.index): [d for d in fr.detections if d.finding]
        for r in results
        for fr in r.frames
    }
    (expected,) = analyse_series(frames, detections, LinkParams(min_score=0.0))
    want = [f for f in expected.to_json()["findings"]]
    assert want, "the demo model finds no tumour in examples/study_01 at its operating point"
    assert [key(f) for f in body["findings"]] == [key(f) for f in want]
    for got, exp in zip(body["findings"], want, strict=True):
        np.testing.assert_allclose(got["bbox_lps_mm"]["min"], exp["bbox_lps_mm"]["min"], atol=1e-3)
        np.testing.assert_allclose(got["bbox_lps_mm"]["max"], exp["bbox_lps_mm"]["max"], atol=1e-3)
        np.testing.assert_allclose(got["centroid_lps_mm"], exp["centroid_lps_mm"], atol=1e-3)
        assert got["volume_mm3"] == pytest.approx(exp["volume_mm3"], rel=1e-4)


def test_completion_on_request_reopening_and_the_series_sr(tmp_path: Path) -> None:
    """A long quiet period: the series stays collecting until a client asks; a late instance re-opens it;
    the series SR carries one volumetric group per finding with polygons in patient coordinates."""
    uid = series_uid(SINGLE[0])
    with (
        serve(model=DEMO, data_dir=tmp_path / "data", series_quiet_s=3600.0) as base,
        httpx.Client(timeout=60) as c,
    ):
        assert c.post(f"{base}/v1/series/{uid}/complete").status_code == 404
        stow(base, SINGLE)
        waiting = wait_processed(c, base, uid)
        assert waiting["state"] == "collecting"
        r = c.post(f"{base}/v1/series/{uid}/complete")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["completed_by"] == "request" and body["findings"]
        assert c.get(f"{base}/v1/series/{uid}").json()["findings"] == body["findings"]

        sr_response = c.get(f"{base}/v1/series/{uid}", headers={"Accept": "application/dicom"})
        assert sr_response.status_code == 200, sr_response.text
        sr = pydicom.dcmread(io.BytesIO(sr_response.content))
        check_series_sr(sr, body, {str(pydicom.dcmread(p).SOPInstanceUID) for p in SINGLE})

        late = pydicom.dcmread(SINGLE[0])
        late.SOPInstanceUID = generate_uid()
        late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID
        buf = io.BytesIO()
        late.save_as(buf, enforce_file_format=True)
        assert (
            c.post(
                f"{base}/v1/detect", content=buf.getvalue(), headers={"Content-Type": "application/dicom"}
            ).status_code
            == 200
        )
        reopened = c.get(f"{base}/v1/series/{uid}")
        assert reopened.status_code == 202 and reopened.json()["instances"]["received"] == 28
        again = c.post(f"{base}/v1/series/{uid}/complete").json()
        # Two frames now share the first position: not one stack, reported, no findings forced.
        assert again["stack"]["consistent"] is False and again["findings"] == []
        assert any("share" in p for p in again["stack"]["problems"])


def check_series_sr(sr: pydicom.Dataset, body: dict, sources: set[str]) -> None:
    """TID 1500 with one TID 1411 group per finding (SCOORD3D polygons inside the finding's box, in the
    series' Frame of Reference, with volume and scores) and one TID 1410 group per linked 2D box."""
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == sources
    measurements = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"
    )
    groups = measurements.ContentSequence
    templates = [g.ContentTemplateSequence[0].TemplateIdentifier for g in groups]
    assert summary_count(sr) == len(body["findings"])
    assert templates.count("1411") == len(body["findings"])
    assert templates.count("1410") == sum(f["slices"] for f in body["findings"])
    volumetric = [g for g in groups if g.ContentTemplateSequence[0].TemplateIdentifier == "1411"]
    for group, finding in zip(volumetric, body["findings"], strict=True):
        items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in group.ContentSequence}
        surfaces = [
            i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Volume Surface"
        ]
        assert len(surfaces) == max(2, finding["slices"])
        lo = np.asarray(finding["bbox_lps_mm"]["min"]) - 1e-3
        hi = np.asarray(finding["bbox_lps_mm"]["max"]) + 1e-3
        for s in surfaces:
            assert s.ValueType == "SCOORD3D" and s.GraphicType == "POLYGON"
            assert s.ReferencedFrameOfReferenceUID == body["frame_of_reference_uid"]
            pts = np.asarray(s.GraphicData, dtype=np.float64).reshape(-1, 3)
            assert len(pts) == 5 and np.allclose(pts[0], pts[-1])
            assert np.all(pts >= lo) and np.all(pts <= hi)
        code = CLASS_CODES.get(finding["label"])  # the class's standard code, else the private one
        assert items["Finding"].ConceptCodeSequence[0].CodeMeaning == (
            code.meaning if code else finding["label"]
        )
        volume = items["Volume"].MeasuredValueSequence[0]
        assert float(volume.NumericValue) == pytest.approx(finding["volume_mm3"], rel=1e-4)
        assert volume.MeasurementUnitsCodeSequence[0].CodeValue == "mm3"
        maximum = certainty(group, "Maximum")  # (111012, DCM, "Certainty of Finding"), derivation Maximum
        assert float(maximum.MeasuredValueSequence[0].NumericValue) == pytest.approx(
            finding["max_score"], abs=1e-5
        )
        mean = certainty(group, "Mean")
        assert float(mean.MeasuredValueSequence[0].NumericValue) == pytest.approx(
            finding["mean_score"], abs=1e-5
        )


def certainty(group: pydicom.Dataset, derivation: str) -> pydicom.Dataset:
    """The group's score item (111012, DCM, "Certainty of Finding") with the given derivation (121401)."""
    for item in group.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != "111012":
            continue
        for mod in item.get("ContentSequence", []):
            code = mod.ConceptNameCodeSequence[0].CodeValue
            if code == "121401" and mod.ConceptCodeSequence[0].CodeMeaning == derivation:
                return item
    raise AssertionError(f"no {derivation} certainty of finding in the group")


def test_multiframe_instance_gives_the_same_findings_as_the_single_frames(tmp_path: Path) -> None:
    """The same volume as one legacy-converted enhanced MR instance (its own series) through /v1/detect."""
    uid_single, uid_multi = series_uid(SINGLE[0]), series_uid(MULTI)
    with (
        serve(model=DEMO, data_dir=tmp_path / "data", series_quiet_s=3600.0) as base,
        httpx.Client(timeout=120) as c,
    ):
        stow(base, SINGLE)
        r = c.post(
            f"{base}/v1/detect", content=MULTI.read_bytes(), headers={"Content-Type": "application/dicom"}
        )
        assert r.status_code == 200, r.text
        wait_processed(c, base, uid_single)
        single = c.post(f"{base}/v1/series/{uid_single}/complete").json()
        multi = c.post(f"{base}/v1/series/{uid_multi}/complete").json()
    assert multi["instances"]["received"] == 1 and multi["stack"]["slices"] == 27
    assert [key(f) for f in single["findings"]] == [key(f) for f in multi["findings"]]
    for a, b in zip(single["findings"], multi["findings"], strict=True):
        np.testing.assert_allclose(a["bbox_lps_mm"]["min"], b["bbox_lps_mm"]["min"], atol=1e-3)
        np.testing.assert_allclose(a["bbox_lps_mm"]["max"], b["bbox_lps_mm"]["max"], atol=1e-3)
        assert [d["frame"] for d in b["detections"]] == [
            26 - d["slice"] for d in b["detections"]
        ]  # frame 0 of the multi-frame instance is the most superior slice


def test_failed_instance_is_listed_and_leaves_a_gap(tmp_path: Path) -> None:
    """A middle slice whose JPEG 2000 codestream is cut short passes STOW-RS (its header is sound) and
    fails in decoding; the series answer lists it and the stack records the missing slice instead of
    closing the gap."""
    uid = series_uid(SINGLE[0])
    j2k = pydicom.dcmread(EXAMPLES / "compressed" / "study_01_IM0016_J2K.dcm")
    (codestream,) = generate_frames(j2k.PixelData, number_of_frames=1)
    broken = pydicom.dcmread(SINGLE[13])
    broken.file_meta.TransferSyntaxUID = j2k.file_meta.TransferSyntaxUID
    broken.PixelData = encapsulate([codestream[: len(codestream) // 4]])
    broken["PixelData"].VR = "OB"
    with (
        serve(model=DEMO, data_dir=tmp_path / "data", series_quiet_s=3600.0) as base,
        httpx.Client(timeout=60) as c,
    ):
        stow(base, SINGLE[:13] + SINGLE[14:])
        client = DICOMwebClient(url=f"{base}/dicomweb")
        client.store_instances([broken])
        wait_processed(c, base, uid)
        body = c.post(f"{base}/v1/series/{uid}/complete").json()
    assert body["instances"]["failed"] == 1 and body["instances"]["done"] == 26
    assert [x["sop_instance_uid"] for x in body["left_out"]] == [str(broken.SOPInstanceUID)]
    assert body["left_out"][0]["reason"].startswith("failed: ")
    assert body["stack"]["slices"] == 26
    assert body["stack"]["missing_slices"] and body["stack"]["missing_slices"][0]["missing"] == 1


def test_series_settings_are_validated(tmp_path: Path) -> None:
    from retinaedge.runtime.errors import ConfigError
    from retinaedge.service.settings import load_settings

    for bad in ({"series_quiet_s": 0}, {"series_min_score": 1.5}, {"series_min_slices": 0}):
        with pytest.raises(ConfigError, match="series_"):
            load_settings(model=DEMO, data_dir=tmp_path, **bad)


def summary_count(sr: pydicom.Dataset) -> int:
    """The count in the report's TID 1501 summary group."""
    import highdicom as hd

    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    parsed = hd.sr.srread(io.BytesIO(buf.getvalue()))
    (summary,) = parsed.content.get_image_measurement_groups()
    (measurement,) = summary.get_measurements()
    return int(measurement.value)


def test_reports_with_nothing_found_are_still_reports() -> None:
    """An instance without detections and a series without findings each give a valid TID 1500 SR that
    says so (a count of 0), not an error: "nothing found" is a result."""
    from retinaedge.service.results.sr import build_series_sr, build_sr

    ds = pydicom.dcmread(SINGLE[0], stop_before_pixels=True)
    instance = build_sr(ds, {"frames": [{"index": 0, "detections": []}]}, "m", "0" * 64)
    (series,) = analyse_series(read_frames(SINGLE[0]), {})
    assert not series.findings
    whole = build_series_sr({str(ds.SOPInstanceUID): ds}, series, "m", "0" * 64)
    assert summary_count(instance) == summary_count(whole) == 0
