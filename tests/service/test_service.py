"""The HTTP service against a real uvicorn server on 127.0.0.1 with a real HTTP client (httpx)."""

from __future__ import annotations

import concurrent.futures
import io
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from retinaedge.runtime.cli import main
from retinaedge.runtime.detector import Detector
from retinaedge.runtime.errors import ConfigError
from retinaedge.service.pipeline.stages import InferenceWorker
from retinaedge.service.settings import load_settings
from support.clients import dicom_post
from support.dicomgen import mr_instance, to_bytes
from support.paths import CORPUS, demo_any_image
from support.polling import poll
from support.servers import serve

#: The demo model without its intended use: pydicom's corpus (CT, US, SC, broken files) reaches the runtime.
ANY_IMAGE = demo_any_image()

TOKEN = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serve(model=ANY_IMAGE, queue_size=4) as url:
        yield url


def test_health_ready_model_metrics(base: str) -> None:
    with httpx.Client(timeout=60) as c:
        assert c.get(f"{base}/healthz").json() == {"status": "alive"}
        ready = c.get(f"{base}/readyz")
        assert ready.status_code == 200 and ready.json()["self_test"]["passed"] is True
        assert ready.json()["backend"] == "onnxruntime"
        model = c.get(f"{base}/v1/model").json()
        assert model["class_names"] == ["glioma", "meningioma", "pituitary"]
        assert model["model_sha256"] == json.loads((ANY_IMAGE / "manifest.json").read_text())["model_sha256"]
        dicom_post(c, base, (CORPUS / "CT_small.dcm").read_bytes())
        text = c.get(f"{base}/metrics").text
        assert 'retinaedge_instances_total{outcome="ok"}' in text
        assert 'retinaedge_stage_seconds_bucket{le="0.005",stage="inference"}' in text
        assert "retinaedge_queue_depth" in text
        assert 'retinaedge_backend_info{backend="onnxruntime",state="ready"} 1.0' in text


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm"]
)
def test_detect_matches_the_runtime(base: str, name: str) -> None:
    data = (CORPUS / name).read_bytes()
    with httpx.Client(timeout=120) as c:
        r = dicom_post(c, base, data)
    assert r.status_code == 200, r.text
    body = r.json()
    ds = pydicom.dcmread(io.BytesIO(data))
    assert body["sop_instance_uid"] == ds.SOPInstanceUID
    assert set(body["timings_ms"]) >= {"decode", "preprocess", "inference", "postprocess", "request"}
    with Detector.open(ANY_IMAGE) as det:
        local = det.detect(data).to_json()
    assert body["frames"] == local["frames"]
    for frame in body["frames"]:
        for d in frame["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= ds.Columns and 0 <= y1 <= y2 <= ds.Rows
            assert d["label"] in ("glioma", "meningioma", "pituitary")


def _lying() -> bytes:
    ds = pydicom.dcmread(CORPUS / "CT_small.dcm")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "content_type", "status", "type_"),
    [
        (b"not dicom at all" * 20, "application/dicom", 400, "malformed-dicom"),
        ((CORPUS / "CT_small.dcm").read_bytes()[:-500], "application/dicom", 400, "truncated-dicom"),
        ((CORPUS / "rtplan.dcm").read_bytes(), "application/dicom", 422, "no-pixel-data"),
        (_lying(), "application/dicom", 413, "over-budget"),
        ((CORPUS / "CT_small.dcm").read_bytes(), "application/json", 415, "unsupported-media-type"),
        (b"", "application/dicom", 400, "bad-request"),
    ],
)
def test_bad_input_is_a_clear_4xx(base: str, data: bytes, content_type: str, status: int, type_: str) -> None:
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{base}/v1/detect", content=data, headers={"Content-Type": content_type})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == f"urn:retinaedge:error:{type_}" and body["status"] == status and body["detail"]


def test_body_over_limit_refused_from_content_length() -> None:
    with serve(model=ANY_IMAGE, max_body_bytes=64 * 1024) as url, httpx.Client(timeout=30) as c:
        sent = {"n": 0}

        def body() -> Iterator[bytes]:
            for _ in range(4096):  # would be 64 MiB; the server answers from Content-Length first
                sent["n"] += 1
                yield b"\0" * 16384

        r = c.post(
            f"{url}/v1/detect",
            content=body(),
            headers={"Content-Type": "application/dicom", "Content-Length": str(4096 * 16384)},
        )
        assert r.status_code == 413 and r.json()["type"].endswith("payload-too-large")


def test_overload_gives_503_with_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference is held inside the worker's batch run (a gate, not a slow model or CPU): with queue_size=1
    exactly one request is in inference and one waits, the other four get 503 with Retry-After at once;
    once the gate opens the two accepted ones complete with 200."""
    frames = np.random.default_rng(0).integers(0, 4096, size=(4, 256, 320), dtype=np.uint16)
    data = to_bytes(mr_instance(frames, window=(2048, 4096)))
    gate, entered = threading.Event(), threading.Event()
    real_run = InferenceWorker.run_batch

    def held(self: InferenceWorker, *args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert gate.wait(120), "the gate never opened"
        return real_run(self, *args, **kwargs)

    with serve(model=ANY_IMAGE, queue_size=1, retry_after_s=7) as url, httpx.Client(timeout=300) as c:
        monkeypatch.setattr(InferenceWorker, "run_batch", held)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            try:
                first = pool.submit(dicom_post, c, url, data)
                assert entered.wait(60), "the worker never started the first request"
                rest = [pool.submit(dicom_post, c, url, data) for _ in range(5)]
                poll(lambda: sum(f.done() for f in rest) >= 4, timeout=120, interval=0.05)
                assert sum(f.done() for f in rest) == 4 and not first.done()  # 4 refused, 2 held
            finally:
                gate.set()
            responses = [first.result(), *(f.result() for f in rest)]
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 503, 503, 503, 503], codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "7" and r.json()["type"].endswith("overloaded")
        else:
            assert len(r.json()["frames"]) == 4


def test_bearer_token() -> None:
    with serve(model=ANY_IMAGE, api_token=TOKEN) as url, httpx.Client(timeout=60) as c:
        assert c.get(f"{url}/healthz").status_code == 200
        r = c.get(f"{url}/readyz")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert (
            c.get(f"{url}/readyz", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code
            == 401
        )
        assert c.get(f"{url}/readyz", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_not_ready_when_self_test_fails(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(ANY_IMAGE, broken)
    golden = json.loads((broken / "golden.json").read_text())
    golden["detections"][0]["labels"] = [(x + 1) % 3 for x in golden["detections"][0]["labels"]]
    (broken / "golden.json").write_text(json.dumps(golden))
    with serve(model=broken) as url, httpx.Client(timeout=60) as c:
        r = c.get(f"{url}/readyz")
        assert r.status_code == 503 and "golden self-test failed" in r.json()["detail"]
        r = dicom_post(c, url, (CORPUS / "CT_small.dcm").read_bytes())
        assert r.status_code == 503 and r.json()["type"].endswith("not-ready")
        assert c.get(f"{url}/healthz").status_code == 200


def test_not_ready_while_the_spool_is_unwritable(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with serve(model=ANY_IMAGE, data_dir=data) as url, httpx.Client(timeout=60) as c:
        assert c.get(f"{url}/readyz").status_code == 200
        spool = data / "spool"
        shutil.rmtree(spool)
        spool.write_bytes(b"")  # the spool directory replaced by a file: nothing can be created in it
        r = c.get(f"{url}/readyz")
        assert r.status_code == 503 and "not writable" in r.json()["detail"]
        assert "Retry-After" in r.headers
        assert c.get(f"{url}/healthz").status_code == 200
        spool.unlink()
        spool.mkdir()
        assert c.get(f"{url}/readyz").status_code == 200


def test_refuses_to_bind_beyond_loopback_without_token(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="API token is required"):
        load_settings(model=ANY_IMAGE, host="0.0.0.0")
    assert main(["serve", "--model", str(ANY_IMAGE), "--host", "0.0.0.0"]) == 2
    out = capsys.readouterr().out
    assert "API token is required" in json.loads(out.strip().splitlines()[-1])["error"]["message"]
