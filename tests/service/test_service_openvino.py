"""The service with backend=openvino: the identity test of tests/service/test_service.py (what the service
answers is what the runtime detects) at FP32, by the export's parity rule against ONNX Runtime FP32 (OpenVINO
does not reproduce ONNX Runtime's last float bits), and the precision said by /readyz, /v1/model and every
result; a reduced precision whose gate cannot pass falls back to FP32 with the reason in /readyz."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pydicom
import pytest
from retinaedge.runtime.detections import ImageDetections
from retinaedge.runtime.detector import Detector
from retinaedge.runtime.matching import match_detections
from support.clients import dicom_post
from support.paths import CORPUS, demo_any_image
from support.servers import serve

#: The demo model without its intended use: pydicom's corpus (CT, SC) reaches the runtime.
ANY_IMAGE = demo_any_image()

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serve(model=ANY_IMAGE, queue_size=4, backend="openvino", threads=2) as url:
        yield url


def _dets(frame: dict[str, Any]) -> ImageDetections:
    d = frame["detections"]
    return ImageDetections.from_arrays(
        [x["box"] for x in d], [x["score"] for x in d], [x["class_id"] for x in d]
    )


def test_ready_and_model_say_openvino_fp32(base: str) -> None:
    with httpx.Client(timeout=60) as c:
        ready = c.get(f"{base}/readyz").json()
        assert ready["backend"] == "openvino" and ready["precision"] == "fp32"
        assert ready["self_test"]["passed"] is True
        assert ready["engine"]["openvino"]["inference_precision"] == "f32"
        model = c.get(f"{base}/v1/model").json()
        assert model["backend"]["name"] == "openvino" and model["backend"]["precision"] == "fp32"


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm"]
)
def test_detect_matches_the_runtime(base: str, name: str) -> None:
    data = (CORPUS / name).read_bytes()
    with httpx.Client(timeout=120) as c:
        r = dicom_post(c, base, data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["backend"] == "openvino" and body["precision"] == "fp32"
    assert body["sop_instance_uid"] == pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
    with Detector.open(ANY_IMAGE, threads=2) as det:  # ONNX Runtime FP32, the reference
        local = det.detect(data).to_json()
    assert len(body["frames"]) == len(local["frames"])
    for got, ref in zip(body["frames"], local["frames"], strict=True):
        report = match_detections(_dets(ref), _dets(got), iou_min=0.99, score_tol=1e-3)
        assert report.match_rate == 1.0 and report.candidate == report.reference
        assert [d["label"] for d in got["detections"]] == [d["label"] for d in ref["detections"]]
        assert [d["finding"] for d in got["detections"]] == [d["finding"] for d in ref["detections"]]


def test_a_precision_that_cannot_run_falls_back_to_fp32_with_the_reason() -> None:
    with (
        serve(model=ANY_IMAGE, backend="openvino", openvino_precision="int8", threads=2) as url,
        httpx.Client(timeout=60) as c,
    ):
        ready = c.get(f"{url}/readyz").json()
        assert ready["precision"] == "fp32"
        assert (
            "precision int8 not used" in ready["backend_reason"] and "serving fp32" in ready["backend_reason"]
        )


def test_a_reduced_precision_that_passed_its_gate_also_passes_the_service_self_test() -> None:
    """auto on this CPU: whatever the gate decided (bf16 where native, else fp32) is ready, self-tested, and
    said in /readyz and every result."""
    with (
        serve(model=ANY_IMAGE, backend="openvino", openvino_precision="auto", threads=2) as url,
        httpx.Client(timeout=60) as c,
    ):
        r = c.get(f"{url}/readyz")
        assert r.status_code == 200, r.text
        ready = r.json()
        gates = ready["engine"]["openvino"]["gates"]
        passed = [p for p, g in gates.items() if g["passed"]]
        assert ready["precision"] in ["fp32", *passed] and ready["self_test"]["passed"] is True
        body = dicom_post(c, url, (CORPUS / "CT_small.dcm").read_bytes()).json()
        assert body["precision"] == ready["precision"]
