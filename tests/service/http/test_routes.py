"""The service's routers: the OpenAPI contract, real bodies against the response models, and the
result-format registry with its one Accept negotiation.

In process (FastAPI's TestClient, which runs the lifespan) on the committed demo bundle ``models/demo``:
no torch export needed.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi import FastAPI
from fastapi.responses import Response
from fastapi.testclient import TestClient
from pydantic import BaseModel
from retinaedge.service.app import create_app
from retinaedge.service.http import schemas
from retinaedge.service.results.documents import DICOM, Document, DocumentRegistry
from retinaedge.service.results.formats import (
    FormatRegistry,
    InstanceView,
    ResultFormat,
    default_formats,
    negotiate,
)
from retinaedge.service.results.sr import instance_sr
from retinaedge.service.routes import detect
from retinaedge.service.settings import load_settings
from support.paths import CORPUS, DEMO, EXAMPLES, demo_any_image
from support.servers import demo_app, ready_client

CT_SMALL = (CORPUS / "CT_small.dcm").read_bytes()
CT_SMALL_UID = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
CT_SMALL_SERIES = "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"
EXAMPLE = EXAMPLES / "study_01" / "IM0015.dcm"
PROBLEM = "application/problem+json"
JSON_ROUTES = [
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/v1/model"),
    ("post", "/v1/detect"),
    ("post", "/dicomweb/studies"),
    ("post", "/dicomweb/studies/{study}"),
    ("get", "/v1/results/{uid}"),
    ("get", "/v1/series/{series_uid}"),
    ("post", "/v1/series/{series_uid}/complete"),
    ("get", "/v1/studies/{study_uid}"),
    ("get", "/v1/exports"),
    ("get", "/v1/exports/{job_id}"),
    ("post", "/v1/exports/retry"),
]


@pytest.fixture(scope="module")
def app() -> FastAPI:
    return demo_app("retinaedge-routes-", model=demo_any_image())  # CT_small below: any image


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with ready_client(app) as c:
        yield c


@pytest.fixture(scope="module")
def detected(client: TestClient) -> dict[str, Any]:
    """CT_small through /v1/detect (so /v1/results and its series have a done instance)."""
    r = client.post("/v1/detect", content=CT_SMALL, headers={"Content-Type": "application/dicom"})
    assert r.status_code == 200, r.text
    return dict(r.json())


def conforms(model: type[BaseModel], body: Any) -> None:
    """``body`` validates against ``model`` and has no top-level member the model does not declare
    (unless the model is open to extra members)."""
    model.model_validate(body)
    if model.model_config.get("extra") != "allow":
        declared = {f.alias or name for name, f in model.model_fields.items()}
        assert set(body) <= declared, f"{model.__name__}: undeclared {sorted(set(body) - declared)}"


# --- the OpenAPI schema -------------------------------------------------------------------------------


def test_openapi_documents_a_response_body_for_every_json_route(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    components = doc["components"]["schemas"]
    assert {"type", "title", "status", "detail"} <= set(components["Problem"]["properties"])
    for method, path in JSON_ROUTES:
        responses = doc["paths"][path][method]["responses"]
        ok = responses["200"]["content"]
        media = "application/dicom+json" if path.startswith("/dicomweb/") else "application/json"
        schema = ok[media]["schema"]
        assert schema.get("$ref") or schema.get("anyOf"), f"{method} {path}: no 200 body schema"
        for ref in [schema.get("$ref")] + [s.get("$ref") for s in schema.get("anyOf", [])]:
            if ref:
                assert components[ref.rsplit("/", 1)[1]]["properties"], (method, path, ref)
        for status, response in responses.items():
            # FastAPI's own 422 (HTTPValidationError) stays on routes with parameters.
            generated = status == "422" and "HTTPValidationError" in json.dumps(response)
            stow_refusal = status == "409" and path.startswith("/dicomweb/")  # a DICOM JSON body
            if status.startswith(("4", "5")) and not generated and not stow_refusal:
                assert response["content"][PROBLEM]["schema"] == {"$ref": "#/components/schemas/Problem"}
    # Negotiating routes list every registered format; the asynchronous answers have their own models.
    for path in ("/v1/results/{uid}", "/v1/series/{series_uid}"):
        op = doc["paths"][path]["get"]
        assert {"application/json", "application/dicom"} <= set(op["responses"]["200"]["content"])
        assert "406" in op["responses"] and "202" in op["responses"]
    assert doc["paths"]["/v1/detect"]["post"]["responses"]["503"]["content"][PROBLEM]


# --- real bodies against the models -------------------------------------------------------------------


def test_operations_bodies_match_their_models(client: TestClient) -> None:
    conforms(schemas.Health, client.get("/healthz").json())
    conforms(schemas.Ready, client.get("/readyz").json())
    model = client.get("/v1/model").json()
    conforms(schemas.ModelInfo, model)
    conforms(schemas.BackendInfo, model["backend"])


def test_detect_and_result_bodies_match_their_models(client: TestClient, detected: dict[str, Any]) -> None:
    conforms(schemas.DetectResult, detected)
    for frame in detected["frames"]:
        conforms(schemas.Frame, frame)
        for d in frame["detections"]:
            conforms(schemas.Detection, d)
    done = client.get(f"/v1/results/{detected['sop_instance_uid']}").json()
    conforms(schemas.ResultDone, done)
    assert done == {**detected, "state": "done", "timings_ms": done["timings_ms"]}


def test_pending_failed_and_missing_results_match_their_models(app: FastAPI, client: TestClient) -> None:
    store = app.state.store
    assert store.add_pending("1.2.3.4.1", "1.2.840.10008.5.1.4.1.1.4", "1.2", "1.2.3.9", "x.dcm", 1)
    r = client.get("/v1/results/1.2.3.4.1", headers={"Accept": "application/dicom"})
    assert r.status_code == 202 and r.headers["retry-after"] == "1"
    conforms(schemas.ResultPending, r.json())
    s = client.get("/v1/series/1.2.3.9")
    assert s.status_code == 202 and "retry-after" in s.headers
    conforms(schemas.SeriesCollecting, s.json())
    conforms(schemas.InstanceCounts, s.json()["instances"])
    store.failed("1.2.3.4.1", "malformed-dicom", "not DICOM")
    r = client.get("/v1/results/1.2.3.4.1")
    assert r.status_code == 200
    conforms(schemas.ResultFailed, r.json())
    missing = client.get("/v1/results/1.2.3.4.404")
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM
    conforms(schemas.Problem, missing.json())


def test_series_body_matches_its_model(client: TestClient, detected: dict[str, Any]) -> None:
    r = client.post(f"/v1/series/{CT_SMALL_SERIES}/complete")
    assert r.status_code == 200, r.text
    body = r.json()
    conforms(schemas.SeriesComplete, body)
    for finding in body["findings"]:
        conforms(schemas.Finding, finding)
    sr = client.get(f"/v1/series/{CT_SMALL_SERIES}", headers={"Accept": "application/dicom"})
    assert sr.status_code == 200 and sr.headers["content-type"] == "application/dicom"


def test_stow_body_matches_its_model(client: TestClient) -> None:
    boundary = "routes-boundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + CT_SMALL
        + f"\r\n--{boundary}\r\nContent-Type: text/plain\r\n\r\nnot dicom\r\n--{boundary}--\r\n".encode()
    )
    r = client.post(
        "/dicomweb/studies",
        content=body,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
    )
    assert r.status_code == 202 and r.headers["content-type"] == "application/dicom+json", r.text
    parsed = schemas.StoreInstancesResponse.model_validate(r.json())
    assert parsed.referenced is not None and parsed.failed is not None
    assert set(r.json()) == {"00081199", "00081198"}


@pytest.fixture(scope="module")
def with_findings(client: TestClient) -> dict[str, Any]:
    """An example slice on which the demo model has findings, through /v1/detect."""
    r = client.post("/v1/detect", content=EXAMPLE.read_bytes(), headers={"Content-Type": "application/dicom"})
    assert r.status_code == 200, r.text
    body = dict(r.json())
    assert any(d["finding"] for f in body["frames"] for d in f["detections"])
    return body


def test_the_gsps_and_the_kos_are_served_by_kind(client: TestClient, with_findings: dict[str, Any]) -> None:
    """``?document=gsps`` on an instance with findings, 404 on one without (CT_small has none here);
    a study answers in JSON (its images with findings so far), its KOS by ``Accept: application/dicom``
    or ``?document=kos``; kinds of another scope are 404 there."""
    uid = with_findings["sop_instance_uid"]
    source = pydicom.dcmread(EXAMPLE, stop_before_pixels=True)
    r = client.get(f"/v1/results/{uid}", params={"document": "gsps"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom", r.text
    gsps = pydicom.dcmread(io.BytesIO(r.content))
    assert gsps.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
    assert gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == uid
    study = client.get(f"/v1/studies/{source.StudyInstanceUID}")
    assert study.status_code == 200, study.text
    conforms(schemas.StudyResult, study.json())
    assert [i["sop_instance_uid"] for i in study.json()["key_images"]] == [uid]
    for params, headers in (({"document": "kos"}, {}), ({}, {"Accept": "application/dicom"})):
        r = client.get(f"/v1/studies/{source.StudyInstanceUID}", params=params, headers=headers)
        assert r.status_code == 200 and r.headers["content-type"] == "application/dicom", r.text
        kos = pydicom.dcmread(io.BytesIO(r.content))
        assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document
        assert [
            i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for i in kos.ContentSequence
            if i.ValueType == "IMAGE"
        ] == [uid]
    for path, kind in [
        (f"/v1/results/{uid}", "kos"),
        (f"/v1/studies/{source.StudyInstanceUID}", "gsps"),
        (f"/v1/series/{source.SeriesInstanceUID}", "kos"),
    ]:
        r = client.get(path, params={"document": kind})
        assert r.status_code == 404 and r.headers["content-type"] == PROBLEM, (path, kind, r.text)
    assert client.get("/v1/studies/1.2.3.404").status_code == 404
    doc = client.get("/openapi.json").json()
    op = doc["paths"]["/v1/studies/{study_uid}"]["get"]
    assert {"application/json", "application/dicom"} <= set(op["responses"]["200"]["content"])
    assert "document" in [p["name"] for p in op["parameters"]]


def test_an_instance_or_study_without_findings_has_no_gsps_or_kos(
    client: TestClient, detected: dict[str, Any]
) -> None:
    if any(d["finding"] for f in detected["frames"] for d in f["detections"]):
        pytest.skip("the demo model has a finding on CT_small")
    r = client.get(f"/v1/results/{detected['sop_instance_uid']}", params={"document": "gsps"})
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
    assert "no findings" in r.json()["detail"]
    study = pydicom.dcmread(io.BytesIO(CT_SMALL), stop_before_pixels=True).StudyInstanceUID
    assert client.get(f"/v1/studies/{study}").json()["key_images"] == []
    r = client.get(f"/v1/studies/{study}", headers={"Accept": "application/dicom"})
    assert r.status_code == 406 and r.headers["content-type"] == PROBLEM


# --- negotiation and the format registry --------------------------------------------------------------

OFFERED = ["application/json", "application/dicom"]


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, "application/json"),
        ("", "application/json"),
        ("*/*", "application/json"),
        ("*", "application/json"),
        ("application/json", "application/json"),
        ("application/dicom", "application/dicom"),
        ("Application/DICOM", "application/dicom"),
        ("application/*", "application/json"),
        ("application/dicom, application/json", "application/json"),  # a tie: the server's order
        ("application/dicom, application/json;q=0.5", "application/dicom"),
        ("application/json;q=0.1, application/dicom", "application/dicom"),
        ("text/html,application/xhtml+xml,*/*;q=0.8", "application/json"),
        ("*/*, application/json;q=0", "application/dicom"),  # the most specific range decides
        ("application/dicom; transfer-syntax=*", "application/dicom"),
        ("text/html", None),
        ("application/dicom+json", None),
        ("application/json;q=0", None),
        ("application/json;q=abc", None),
        ("garbage, ;;;, /, */json", None),
    ],
)
def test_negotiate(accept: str | None, chosen: str | None) -> None:
    assert negotiate(accept, OFFERED) == chosen


@pytest.mark.parametrize(
    ("accept", "status", "media"),
    [
        ("application/dicom", 200, "application/dicom"),
        ("application/json", 200, "application/json"),
        ("*/*", 200, "application/json"),
        ("text/html", 406, PROBLEM),
    ],
)
def test_results_negotiate_through_the_registry(
    client: TestClient, detected: dict[str, Any], accept: str, status: int, media: str
) -> None:
    r = client.get(f"/v1/results/{detected['sop_instance_uid']}", headers={"Accept": accept})
    assert r.status_code == status and r.headers["content-type"].split(";")[0] == media, r.text
    if media == "application/dicom":
        sr = pydicom.dcmread(io.BytesIO(r.content))
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    if status == 406:
        problem = r.json()
        conforms(schemas.Problem, problem)
        assert problem["type"] == "urn:retinaedge:error:not-acceptable"
        assert problem["offered"] == OFFERED and "application/dicom" in problem["detail"]


def test_series_negotiates_through_the_same_registry(client: TestClient, detected: dict[str, Any]) -> None:
    r = client.get(f"/v1/series/{CT_SMALL_SERIES}", headers={"Accept": "image/png"})
    assert r.status_code == 406 and r.headers["content-type"] == PROBLEM
    assert r.json()["offered"] == OFFERED


async def _csv(view: InstanceView) -> Response:
    rows = ["frame,label,score"] + [
        f"{f['index']},{d['label']},{d['score']}" for f in view.result["frames"] for d in f["detections"]
    ]
    return Response("\n".join(rows) + "\n", media_type="text/csv")


def test_a_registered_format_is_served_without_touching_the_router(
    app: FastAPI, client: TestClient, detected: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = app.state.services
    formats = FormatRegistry(services.formats)
    formats.register(ResultFormat("text/csv", instance=_csv))
    monkeypatch.setattr(services, "formats", formats)
    monkeypatch.setattr(app, "openapi_schema", None)  # regenerated with the new format

    uid = detected["sop_instance_uid"]
    r = client.get(f"/v1/results/{uid}", headers={"Accept": "text/csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv"), r.text
    n = sum(len(f["detections"]) for f in detected["frames"])
    assert r.text.splitlines()[0] == "frame,label,score" and len(r.text.splitlines()) == n + 1
    # The others still negotiate as before; a format without a series renderer is not offered for series.
    assert client.get(f"/v1/results/{uid}").json()["state"] == "done"
    gone = client.get(f"/v1/results/{uid}", headers={"Accept": "text/html"})
    assert gone.status_code == 406 and gone.json()["offered"] == [*OFFERED, "text/csv"]
    series = client.get(f"/v1/series/{CT_SMALL_SERIES}", headers={"Accept": "text/csv"})
    assert series.status_code == 406 and series.json()["offered"] == OFFERED
    doc = client.get("/openapi.json").json()
    assert "text/csv" in doc["paths"]["/v1/results/{uid}"]["get"]["responses"]["200"]["content"]
    assert "text/csv" not in doc["paths"]["/v1/series/{series_uid}"]["get"]["responses"]["200"]["content"]


def test_a_result_document_is_asked_for_by_kind(client: TestClient, detected: dict[str, Any]) -> None:
    """``?document=KIND``: that document in its media type; 400 for a kind no document has, 404 for a
    document of the other scope, 406 when Accept excludes its media type."""
    uid = detected["sop_instance_uid"]
    r = client.get(f"/v1/results/{uid}", params={"document": "sr"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom", r.text
    assert pydicom.dcmread(io.BytesIO(r.content)).SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    series = client.post(f"/v1/series/{CT_SMALL_SERIES}/complete", params={"document": "series-sr"})
    assert series.status_code == 200 and series.headers["content-type"] == "application/dicom"
    for path, kind, status in [
        (f"/v1/results/{uid}", "gsps-of-nothing", 400),
        (f"/v1/results/{uid}", "series-sr", 404),
        (f"/v1/series/{CT_SMALL_SERIES}", "sr", 404),
    ]:
        r = client.get(path, params={"document": kind})
        assert r.status_code == status and r.headers["content-type"] == PROBLEM, (path, kind, r.text)
        conforms(schemas.Problem, r.json())
        assert repr(kind) in r.json()["detail"]
    r = client.get(f"/v1/results/{uid}", params={"document": "sr"}, headers={"Accept": "application/json"})
    assert r.status_code == 406 and r.json()["offered"] == ["application/dicom"]
    doc = client.get("/openapi.json").json()
    for path in ("/v1/results/{uid}", "/v1/series/{series_uid}"):
        assert "document" in [p["name"] for p in doc["paths"][path]["get"]["parameters"]]


def test_a_second_dicom_document_does_not_replace_the_sr(
    app: FastAPI, client: TestClient, detected: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second ``application/dicom`` document of an instance is one registry entry: ``Accept:
    application/dicom`` still answers with the SR (its media type's default), the new one by kind."""

    def relabelled(view: InstanceView) -> pydicom.Dataset:
        ds = instance_sr(view)
        ds.SeriesDescription = "a second DICOM document"
        return ds

    services = app.state.services
    second = Document("relabelled-sr", "instance", DICOM, relabelled, "DICOM SR", "the SR, relabelled")
    documents = DocumentRegistry([*services.documents, second])
    monkeypatch.setattr(services, "documents", documents)
    monkeypatch.setattr(services, "formats", default_formats(documents))
    uid = detected["sop_instance_uid"]
    sr = client.get(f"/v1/results/{uid}", headers={"Accept": "application/dicom"})
    assert pydicom.dcmread(io.BytesIO(sr.content)).SeriesDescription.startswith("retinaedge findings")
    other = client.get(f"/v1/results/{uid}", params={"document": "relabelled-sr"})
    assert other.status_code == 200, other.text
    assert pydicom.dcmread(io.BytesIO(other.content)).SeriesDescription == "a second DICOM document"
    assert services.formats.offered("instance") == OFFERED
    with pytest.raises(ValueError, match="two default application/dicom documents"):
        documents.register(Document("another-sr", "instance", DICOM, relabelled, "DICOM SR", default=True))


def test_detect_hot_path_is_not_validated_twice(detected: dict[str, Any]) -> None:
    """The model is declared for the schema; the handler's JSONResponse goes out as built (so the body
    keeps exactly the runtime's members and order)."""
    route = next(r for r in detect.router.routes if getattr(r, "path", None) == "/v1/detect")
    assert route.response_model is schemas.DetectResult  # type: ignore[attr-defined]
    assert list(detected) == [
        "sop_instance_uid",
        "model",
        "image",
        "frames",
        "timings_ms",
        "backend",
        "backend_reason",
        "precision",
    ]


def test_every_route_but_healthz_needs_the_bearer_token() -> None:
    token = "routes-token-routes-token"
    settings = load_settings(
        model=DEMO, data_dir=Path(tempfile.mkdtemp(prefix="retinaedge-routes-")), api_token=token
    )
    app = create_app(settings)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        for method, path in JSON_ROUTES[1:] + [("get", "/metrics"), ("get", "/openapi.json")]:
            url = (
                path.replace("{study}", "1.2")
                .replace("{uid}", "1.2")
                .replace("{series_uid}", "1.2")
                .replace("{study_uid}", "1.2")
                .replace("{job_id}", "1")
            )
            r = c.request(method, url)
            assert r.status_code == 401 and r.headers["content-type"] == PROBLEM, (method, path)
            assert r.headers["www-authenticate"].startswith("Bearer")
        authorized = c.get("/v1/results/1.2", headers={"Authorization": f"Bearer {token}"})
        assert authorized.status_code == 404
