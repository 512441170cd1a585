"""DICOMweb STOW-RS, durability and results, against a real uvicorn server and real clients."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from retinaedge.runtime.bundle import load_bundle
from retinaedge.runtime.detector import Detector
from retinaedge.service.results.selection import frame_findings
from support.clients import multipart, wait_done
from support.dicomgen import mr_instance, to_bytes
from support.forkserver import Launcher, Server
from support.paths import CORPUS, EXAMPLES, demo_any_image
from support.servers import free_port, serve

#: The demo model without its intended use: pydicom's corpus (CT, US, SC, broken files) reaches the runtime.
ANY_IMAGE = demo_any_image()

#: The demo model's classes that have a standard code (the others are named in the private scheme).
CLASS_CODES = load_bundle(ANY_IMAGE).manifest.class_codes


def test_dicomweb_client_store_and_results(tmp_path: Path) -> None:
    frames = np.random.default_rng(2).integers(0, 4096, size=(3, 128, 160), dtype=np.uint16)
    datasets = [
        pydicom.dcmread(CORPUS / "CT_small.dcm"),
        pydicom.dcmread(CORPUS / "MR_small_RLE.dcm"),
        mr_instance(frames, window=(2048, 4096)),
    ]
    with serve(model=ANY_IMAGE, data_dir=tmp_path) as base:
        client = DICOMwebClient(url=f"{base}/dicomweb")
        response = client.store_instances(datasets)
        refs = response.ReferencedSOPSequence
        assert [r.ReferencedSOPInstanceUID for r in refs] == [d.SOPInstanceUID for d in datasets]
        assert "FailedSOPSequence" not in response
        with httpx.Client(timeout=60) as c, Detector.open(ANY_IMAGE) as det:
            for ds in datasets:
                result = wait_done(c, base, ds.SOPInstanceUID)
                assert result["state"] == "done" and result["backend"] == "onnxruntime"
                assert result["frames"] == det.detect(to_bytes(ds)).to_json()["frames"]
            metrics = c.get(f"{base}/metrics").text
            assert 'retinaedge_instances_total{outcome="ok"} 3.0' in metrics
    assert not list((tmp_path / "spool").glob("*.dcm"))  # processed instances leave the spool


def test_partial_failure_and_idempotency(tmp_path: Path) -> None:
    good = (CORPUS / "CT_small.dcm").read_bytes()
    truncated = (CORPUS / "MR_small.dcm").read_bytes()[:-1000]
    body, ctype = multipart([good, truncated, b"garbage" * 50])
    with serve(model=ANY_IMAGE, data_dir=tmp_path) as base, httpx.Client(timeout=60) as c:
        r = c.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 202 and r.headers["content-type"] == "application/dicom+json"
        doc = r.json()
        ref = doc["00081199"]["Value"]
        failed = doc["00081198"]["Value"]
        assert [x["00081155"]["Value"][0] for x in ref] == [pydicom.dcmread(io.BytesIO(good)).SOPInstanceUID]
        assert ref[0]["00081190"]["Value"][0].endswith("/v1/results/" + ref[0]["00081155"]["Value"][0])
        assert [x["00081197"]["Value"][0] for x in failed] == [0xC000, 0xC000]
        assert failed[0]["00081155"]["Value"][0] == pydicom.dcmread(io.BytesIO(truncated)).SOPInstanceUID
        uid = ref[0]["00081155"]["Value"][0]
        first = wait_done(c, base, uid)
        # The same instance again: acknowledged, not processed twice, result unchanged.
        body2, ctype2 = multipart([good])
        r2 = c.post(f"{base}/dicomweb/studies", content=body2, headers={"Content-Type": ctype2})
        assert r2.status_code == 200 and r2.json()["00081199"]["Value"][0]["00081155"]["Value"][0] == uid
        assert wait_done(c, base, uid) == first
        # Nothing stored -> 409; another study's instance on a study-scoped URL -> 0xA900.
        r3 = c.post(
            f"{base}/dicomweb/studies", content=multipart([truncated])[0], headers={"Content-Type": ctype}
        )
        assert r3.status_code == 409
        r4 = c.post(f"{base}/dicomweb/studies/1.2.3.4", content=body2, headers={"Content-Type": ctype2})
        assert r4.status_code == 409 and r4.json()["00081198"]["Value"][0]["00081197"]["Value"][0] == 0xA900
        assert c.get(f"{base}/v1/results/1.2.3.999").status_code == 404


@pytest.mark.parametrize(
    ("ctype", "body", "status"),
    [
        ("application/dicom", b"x" * 200, 415),
        ('multipart/related; type="application/dicom+xml"; boundary=abc', b"", 415),
        ('multipart/related; type="application/dicom"', b"", 400),
        ('multipart/related; type="application/dicom"; boundary=abc', b"--abc\r\n\r\nunfinished", 400),
    ],
)
def test_malformed_requests(tmp_path: Path, ctype: str, body: bytes, status: int) -> None:
    with serve(model=ANY_IMAGE, data_dir=tmp_path) as base, httpx.Client(timeout=60) as c:
        r = c.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == status and r.headers["content-type"] == "application/problem+json"


def test_507_when_disk_below_reserve(tmp_path: Path) -> None:
    body, ctype = multipart([(CORPUS / "CT_small.dcm").read_bytes()])
    with (
        serve(model=ANY_IMAGE, data_dir=tmp_path, min_free_bytes=2**62) as base,
        httpx.Client(timeout=60) as c,
    ):
        r = c.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 507 and r.json()["type"].endswith("insufficient-storage")
    assert not list((tmp_path / "spool").iterdir())


def test_retention_budget(small_bundle: Path, tmp_path: Path) -> None:
    """The biased exported model's results are large (hundreds of detections): three exceed 60 kB."""
    uids = []
    with (
        serve(model=small_bundle, data_dir=tmp_path, results_max_bytes=60_000, prune_interval_s=0) as base,
        httpx.Client(timeout=60) as c,
    ):
        for k in range(3):
            ds = mr_instance(np.full((64, 64), 100 * k, np.uint16), window=(2048, 4096))
            body, ctype = multipart([to_bytes(ds)])
            assert (
                c.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code
                == 200
            )
            wait_done(c, base, ds.SOPInstanceUID)
            uids.append(ds.SOPInstanceUID)
        codes = [c.get(f"{base}/v1/results/{u}").status_code for u in uids]
    assert codes[-1] == 200 and 404 in codes[:-1], codes


def test_crash_after_acknowledgement_loses_nothing(tmp_path: Path, launcher: Launcher) -> None:
    """SIGKILL the server right after STOW-RS acknowledged slow instances; a restart processes them all."""
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "max_batch_size": 2}))
    datasets = [
        mr_instance(
            np.random.default_rng(k).integers(0, 4096, size=(16, 256, 320), dtype=np.uint16),
            window=(2048, 4096),
        )
        for k in range(3)
    ]
    body, ctype = multipart([to_bytes(ds) for ds in datasets])

    def start(port: int) -> Server:
        return launcher.start_server(ANY_IMAGE, config, port)

    port = free_port()
    proc = start(port)
    try:
        r = httpx.post(
            f"http://127.0.0.1:{port}/dicomweb/studies",
            content=body,
            headers={"Content-Type": ctype},
            timeout=60,
        )
        assert r.status_code == 200
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    pending = [u for u in (ds.SOPInstanceUID for ds in datasets)]
    port = free_port()
    proc = start(port)
    try:
        with httpx.Client(timeout=60) as c:
            for uid in pending:
                assert wait_done(c, f"http://127.0.0.1:{port}", uid)["state"] == "done"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_results_as_dicom_sr(tmp_path: Path) -> None:
    """/v1/detect and STOW-RS results come back as a TID 1500 SR referencing the source image's frames."""
    import highdicom as hd

    # The demo model finds tumours in the example study: a slice with two, and the multi-frame series.
    multi = pydicom.dcmread(EXAMPLES / "study_01_multiframe" / "MF0001.dcm")
    single = (EXAMPLES / "study_01" / "IM0015.dcm").read_bytes()
    with serve(model=ANY_IMAGE, data_dir=tmp_path) as base, httpx.Client(timeout=60) as c:
        detected = c.post(
            f"{base}/v1/detect", content=single, headers={"Content-Type": "application/dicom"}
        ).json()
        body, ctype = multipart([to_bytes(multi)])
        assert (
            c.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code
            == 200
        )
        stowed = wait_done(c, base, multi.SOPInstanceUID)
        cases = [
            (detected["sop_instance_uid"], detected, pydicom.dcmread(io.BytesIO(single))),
            (multi.SOPInstanceUID, stowed, multi),
        ]
        for uid, result, source in cases:
            assert c.get(f"{base}/v1/results/{uid}").json()["frames"] == result["frames"]
            r = c.get(f"{base}/v1/results/{uid}", headers={"Accept": "application/dicom"})
            assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
            sr = pydicom.dcmread(io.BytesIO(r.content))
            assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
            assert sr.PatientID == source.PatientID and sr.StudyInstanceUID == source.StudyInstanceUID
            assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
            procedure = [
                item.ConceptCodeSequence[0]
                for item in sr.ContentSequence
                if item.ConceptNameCodeSequence[0].CodeValue == "121058"  # Procedure reported
            ]
            assert [(c.CodeValue, c.CodingSchemeDesignator) for c in procedure] == [("363679005", "SCT")]
            findings = [d for f in result["frames"] for d in frame_findings(f)]
            private = sorted({d["label"] for d in findings} - set(CLASS_CODES))
            # The private scheme is declared only when a class without a standard code is reported.
            schemes = [i.CodingSchemeDesignator for i in sr.get("CodingSchemeIdentificationSequence", [])]
            assert schemes == (["99RETINAEDGE"] if private else [])
            parsed = hd.sr.srread(io.BytesIO(r.content))
            groups = parsed.content.get_planar_roi_measurement_groups()
            assert len(groups) == len(findings) > 0
            first = findings[0]
            assert np.allclose(groups[0].roi.value[0], first["box"][:2], atol=1e-3)
            scores = [m.value for m in groups[0].get_measurements()]
            assert scores and abs(float(scores[0]) - first["score"]) < 1e-5
