"""``POST /v1/detect`` answered inside the middleware (service/routes/direct.py) answers as FastAPI's route
does: the same status, headers and body for a result and for each kind of error, behind the same token."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from typing import Any

import pydicom
import pytest
from retinaedge.service.routes import direct
from retinaedge.service.routes.direct import DirectDetect
from support.paths import REPO_ROOT
from support.servers import demo_app, ready_client

SOURCE = REPO_ROOT / "examples" / "study_01" / "IM0001.dcm"
TOKEN = "direct-detect-test-token"


def _instance(**changes: object) -> bytes:
    ds = pydicom.dcmread(SOURCE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def clients() -> Iterator[tuple[Any, Any]]:
    """(the app as built, the same app without the direct path: FastAPI's route answers)."""
    with_direct = demo_app("direct-detect-", api_token=TOKEN)
    without = demo_app("routed-detect-", api_token=TOKEN)
    without.user_middleware = [m for m in without.user_middleware if m.cls is not DirectDetect]
    with ready_client(with_direct) as a, ready_client(without) as b:
        yield a, b


def _answer(client: Any, method: str, body: bytes | None, headers: dict[str, str]) -> tuple[Any, ...]:
    response = client.request(method, "/v1/detect", content=body, headers=headers)
    kept = {k: response.headers.get(k) for k in ("content-type", "retry-after", "www-authenticate", "allow")}
    try:
        doc = response.json()
    except ValueError:
        doc = response.text
    if isinstance(doc, dict) and isinstance(doc.get("timings_ms"), dict):
        doc["timings_ms"] = sorted(doc["timings_ms"])  # their names, not the times
    return response.status_code, kept, doc


AUTH = {"Authorization": f"Bearer {TOKEN}"}
DICOM = {**AUTH, "Content-Type": "application/dicom"}
CASES = {
    "result": ("POST", _instance(), DICOM),
    "other media type": ("POST", b"{}", {**AUTH, "Content-Type": "application/json"}),
    "empty body": ("POST", b"", DICOM),
    "not DICOM": ("POST", b"\0" * 200, DICOM),
    "outside the intended use": ("POST", _instance(Modality="CT"), DICOM),
    "no token": ("POST", _instance(), {"Content-Type": "application/dicom"}),
    "another method": ("GET", None, AUTH),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_direct_path_answers_as_the_route(clients: tuple[Any, Any], case: str) -> None:
    method, body, headers = CASES[case]
    direct_answer = _answer(clients[0], method, body, headers)
    assert direct_answer == _answer(clients[1], method, body, headers)
    assert (
        direct_answer[0]
        == {
            "result": 200,
            "other media type": 415,
            "empty body": 400,
            "not DICOM": 400,
            "outside the intended use": 422,
            "no token": 401,
            "another method": 405,
        }[case]
    )


def test_the_direct_path_is_taken_and_an_unhandled_error_goes_on_out(
    clients: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    async def failing(request: Any, services: Any) -> Any:
        calls.append(request.scope["route"].path)
        raise RuntimeError("a bug")

    monkeypatch.setattr(direct, "detect", failing)
    with pytest.raises(RuntimeError, match="a bug"):  # the server-error middleware's, as from the router
        clients[0].post("/v1/detect", content=_instance(), headers=DICOM)
    assert calls == ["/v1/detect"]
    assert clients[1].post("/v1/detect", content=_instance(), headers=DICOM).status_code == 200
