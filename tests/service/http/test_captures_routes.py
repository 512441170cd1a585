"""The secondary captures through the service: ``?document=sc[&frame=N]`` and
``GET /v1/results/{uid}/frames/{n}/overlay.png``, for results of ``/v1/detect`` (made by the result
writer from the request's bytes) and of STOW-RS (made by the processor from the spool file).

In process (FastAPI's TestClient, which runs the lifespan) on the committed demo bundle.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from retinaedge.runtime.overlay import COLOURS, outline_width
from retinaedge.service.app import create_app
from retinaedge.service.results.evidence import IdentityFiles
from retinaedge.service.results.selection import findings_by_frame
from retinaedge.service.results.store import Store
from retinaedge.service.results.writer import KeptResult, ResultWriter
from retinaedge.service.settings import load_settings
from support.clients import multipart, wait_done
from support.paths import DEMO, EXAMPLES
from support.servers import demo_app, ready_client

SINGLE = EXAMPLES / "study_01" / "IM0015.dcm"
MULTI = EXAMPLES / "study_01_multiframe" / "MF0001.dcm"
NO_FINDINGS = EXAMPLES / "study_01" / "IM0001.dcm"
BY_STOW = EXAMPLES / "study_01" / "IM0014.dcm"
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def app() -> FastAPI:
    return demo_app("retinaedge-captures-")


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with ready_client(app) as c:
        yield c


@pytest.fixture(scope="module")
def detected(client: TestClient) -> dict[Path, dict[str, Any]]:
    out = {}
    for source in (SINGLE, MULTI, NO_FINDINGS):
        r = client.post(
            "/v1/detect", content=source.read_bytes(), headers={"Content-Type": "application/dicom"}
        )
        assert r.status_code == 200, r.text
        out[source] = r.json()
    return out


def frames_with_findings(result: dict[str, Any]) -> list[int]:
    return [i + 1 for i in findings_by_frame(result)]


def sc_pixels(content: bytes) -> np.ndarray:
    return np.asarray(pydicom.dcmread(io.BytesIO(content)).pixel_array)


def png_pixels(content: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(bgr[..., ::-1])


def test_each_frame_with_findings_has_its_sc_and_the_same_pixels_as_png(
    client: TestClient, detected: dict[Path, dict[str, Any]]
) -> None:
    result = detected[MULTI]
    uid = result["sop_instance_uid"]
    numbers = frames_with_findings(result)
    assert 1 < len(numbers) < result["image"]["frames"]
    for n in numbers:
        sc = client.get(f"/v1/results/{uid}", params={"document": "sc", "frame": n})
        assert sc.status_code == 200 and sc.headers["content-type"] == "application/dicom", sc.text
        ds = pydicom.dcmread(io.BytesIO(sc.content))
        assert ds.SourceImageSequence[0].ReferencedFrameNumber == n
        png = client.get(f"/v1/results/{uid}/frames/{n}/overlay.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        pixels = png_pixels(png.content)
        assert pixels.shape == (ds.Rows, ds.Columns, 3)
        assert np.array_equal(pixels, sc_pixels(sc.content))  # the same picture, pixel for pixel
        # ... whose outlines are where the result's boxes are (top-left corner of each finding).
        w = outline_width(ds.Rows, ds.Columns)
        for d in findings_by_frame(result)[n - 1]:
            x1, y1 = (round(v) for v in d["box"][:2])
            colour = COLOURS[d["class_id"] % len(COLOURS)]
            corner = pixels[y1 : y1 + w, x1 : x1 + w].reshape(-1, 3)
            assert (corner == colour).all() or (corner != corner[:, :1]).any(axis=-1).all()


def test_asking_without_frame_and_for_frames_without_findings(
    client: TestClient, detected: dict[Path, dict[str, Any]]
) -> None:
    multi, single = detected[MULTI], detected[SINGLE]
    (only,) = frames_with_findings(single)
    r = client.get(f"/v1/results/{single['sop_instance_uid']}", params={"document": "sc"})
    assert r.status_code == 200 and pydicom.dcmread(io.BytesIO(r.content)).Modality == "OT"  # its only SC
    uid = multi["sop_instance_uid"]
    numbers = frames_with_findings(multi)
    without = next(n for n in range(1, multi["image"]["frames"] + 1) if n not in numbers)
    cases = [
        (f"/v1/results/{uid}", {"document": "sc"}, 400, "&frame=N"),  # several: which one?
        (f"/v1/results/{uid}", {"document": "sc", "frame": without}, 404, f"frame {without} has no"),
        (f"/v1/results/{uid}", {"document": "sc", "frame": 0}, 400, ""),
        (f"/v1/results/{uid}", {"document": "sr", "frame": numbers[0]}, 400, "frame selects"),
        (f"/v1/results/{uid}", {"frame": numbers[0]}, 400, "goes with ?document"),
        (f"/v1/results/{detected[NO_FINDINGS]['sop_instance_uid']}", {"document": "sc"}, 404, "no frame"),
        (f"/v1/results/{uid}/frames/{without}/overlay.png", {}, 404, "has no findings"),
        (
            f"/v1/results/{uid}/frames/{multi['image']['frames'] + 1}/overlay.png",
            {},
            404,
            "there is no frame",
        ),
        (f"/v1/results/{uid}/frames/0/overlay.png", {}, 400, ""),
        ("/v1/results/1.2.3.404/frames/1/overlay.png", {}, 404, "no instance"),
        (f"/v1/results/{uid}/frames/x/overlay.png", {}, 400, ""),
    ]
    for path, params, status, words in cases:
        r = client.get(path, params=params)
        assert r.status_code == status and r.headers["content-type"] == PROBLEM, (path, params, r.text)
        assert words in r.json()["detail"], (path, params, r.json())


def test_a_stow_rs_result_has_its_captures_made_from_the_spool_file(client: TestClient) -> None:
    body, ctype = multipart([BY_STOW.read_bytes()])
    r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    uid = str(pydicom.dcmread(BY_STOW, stop_before_pixels=True).SOPInstanceUID)
    result = wait_done(client, "", uid)
    (n,) = frames_with_findings(result)
    sc = client.get(f"/v1/results/{uid}", params={"document": "sc"})
    png = client.get(f"/v1/results/{uid}/frames/{n}/overlay.png")
    assert sc.status_code == png.status_code == 200
    assert np.array_equal(png_pixels(png.content), sc_pixels(sc.content))


def test_a_pending_instance_has_no_overlay_yet(app: FastAPI, client: TestClient) -> None:
    assert app.state.store.add_pending(
        "1.2.3.4.77", "1.2.840.10008.5.1.4.1.1.4", "1.2", "1.2.3.9", "x.dcm", 1
    )
    r = client.get("/v1/results/1.2.3.4.77/frames/1/overlay.png")
    assert r.status_code == 202 and r.headers["retry-after"] == "1"
    app.state.store.failed("1.2.3.4.77", "malformed-dicom", "not DICOM")
    r = client.get("/v1/results/1.2.3.4.77/frames/1/overlay.png")
    assert r.status_code == 404 and "not processed" in r.json()["detail"]


def test_openapi_lists_the_overlay_and_the_frame_parameter(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    op = doc["paths"]["/v1/results/{uid}/frames/{n}/overlay.png"]["get"]
    assert "image/png" in op["responses"]["200"]["content"] and "404" in op["responses"]
    params = {p["name"] for p in doc["paths"]["/v1/results/{uid}"]["get"]["parameters"]}
    assert {"document", "frame"} <= params
    assert "frame" not in {p["name"] for p in doc["paths"]["/v1/series/{series_uid}"]["get"]["parameters"]}


def test_request_bodies_waiting_to_be_drawn_are_bounded(tmp_path: Path, detected: dict[Path, Any]) -> None:
    """Beyond ``max_source_bytes`` of bodies waiting, a /v1/detect result is kept without its captures
    (counted); a body larger than that is drawn when no other waits."""
    from retinaedge.runtime.bundle import load_bundle
    from retinaedge.service.results.captures import CaptureFiles, CaptureMaker
    from retinaedge.service.results.evidence import select_header

    store, identities = Store(tmp_path / "state.sqlite3"), IdentityFiles(tmp_path / "identity")
    files = CaptureFiles(tmp_path / "captures")
    data = SINGLE.read_bytes()
    writer = ResultWriter(
        store,
        identities,
        captures=CaptureMaker(files, load_bundle(DEMO).manifest),
        max_source_bytes=len(data) // 2,
    )
    ds = pydicom.dcmread(io.BytesIO(data))
    body = detected[SINGLE]

    def kept(uid: str) -> KeptResult:
        return KeptResult(
            uid,
            ds.SOPClassUID,
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            len(data),
            body,
            select_header(ds),
            data,
        )

    assert writer.keep(kept(str(ds.SOPInstanceUID)))
    assert writer.keep(kept("1.2.3.4.5"))  # another body waits: with it, the budget is passed
    assert writer.not_drawn == 1
    writer.start()
    try:
        assert writer.settle(60)
    finally:
        writer.stop()
    key = f"{load_bundle(DEMO).manifest.name}/"  # the model's captures (service/results/store.subject_key)
    assert list(files.frames(key + str(ds.SOPInstanceUID))) == [1] and files.frames(key + "1.2.3.4.5") == {}
    assert store.get("1.2.3.4.5") is not None and writer._source_bytes == 0
    store.close()


def test_captures_never_makes_none_and_says_so(tmp_path: Path) -> None:
    """captures=never: no capture files for a result with findings (by /v1/detect and STOW-RS), the
    overlay route says why it has none, and a destination taking sc is refused at start."""
    from retinaedge.runtime.errors import ConfigError

    sc_destination = {"name": "pacs", "type": "dimse", "host": "127.0.0.1", "port": 104, "ae_title": "PACS"}
    with pytest.raises(ConfigError, match="captures=never, but destination"):
        load_settings(
            model=DEMO,
            data_dir=tmp_path / "refused",
            captures="never",
            export_destinations=[{**sc_destination, "documents": ["sr", "sc"]}],
        )
    settings = load_settings(model=DEMO, data_dir=tmp_path / "data", captures="never")
    app = create_app(settings)
    with TestClient(app) as c:
        assert app.state.worker.wait_ready(120), app.state.worker.reason
        r = c.post("/v1/detect", content=SINGLE.read_bytes(), headers={"Content-Type": "application/dicom"})
        assert r.status_code == 200, r.text
        body = r.json()
        frame = min(findings_by_frame(body)) + 1  # a frame with findings
        data, content_type = multipart([BY_STOW.read_bytes()])
        stowed = c.post("/dicomweb/studies", content=data, headers={"Content-Type": content_type})
        assert stowed.status_code == 200, stowed.text
        uid = pydicom.dcmread(BY_STOW, stop_before_pixels=True).SOPInstanceUID
        wait_done(c, "", uid)
        overlay = c.get(f"/v1/results/{body['sop_instance_uid']}/frames/{frame}/overlay.png")
        assert overlay.status_code == 404 and overlay.headers["content-type"] == PROBLEM
        assert "captures is never" in overlay.json()["detail"]
        sc = c.get(f"/v1/results/{body['sop_instance_uid']}?document=sc")
        assert sc.status_code == 404, sc.text
    captures = tmp_path / "data" / "captures"
    assert not captures.exists() or not any(p.is_file() for p in captures.rglob("*"))
