"""Bad requests against a real server: each is a 4xx problem document that says what is wrong, answered
before the body is read where the headers already decide, and nothing accepted before is lost."""

from __future__ import annotations

import io
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from support.clients import multipart
from support.forkserver import Launcher
from support.paths import REPO_ROOT, demo_any_image
from support.polling import wait_until
from support.servers import free_port, serve, start_server

#: The demo model without its intended use: pydicom's corpus (CT, US, SC, broken files) reaches the runtime.
ANY_IMAGE = demo_any_image()

SOURCE = REPO_ROOT / "examples" / "study_01" / "IM0001.dcm"
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("bad-requests")
    with serve(
        model=ANY_IMAGE,
        data_dir=data,
        min_free_bytes=0,
        max_body_bytes=1024**2,
        max_request_bytes=1024**2,
        request_idle_timeout_s=1.0,
    ) as url:
        yield url


def _raw(base: str, head: str, body: bytes, timeout: float = 10) -> tuple[bytes, float]:
    """Send ``head`` (request line and headers) and ``body`` on a socket; the answer's first bytes and
    how long it took, without sending the rest of a declared body."""
    host, port = base.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode() + body)
        reply = s.recv(65536)
        header, _, rest = reply.partition(b"\r\n\r\n")
        length = next(
            (
                int(ln.split(b":")[1])
                for ln in header.split(b"\r\n")
                if ln.lower().startswith(b"content-length:")
            ),
            0,
        )
        for _ in range(10):  # the body may come in a later segment; bounded
            if len(rest) >= length:
                break
            more = s.recv(65536)
            if not more:
                break
            rest += more
            reply += more
    return reply, time.monotonic() - started


def _instance(**changes: object) -> bytes:
    ds = pydicom.dcmread(SOURCE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about invalid values as they are set
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("path", ["/dicomweb/studies", "/v1/detect"])
def test_a_declared_length_over_the_limit_is_refused_before_the_body(base: str, path: str) -> None:
    ctype = (
        'multipart/related; type="application/dicom"; boundary=x'
        if "studies" in path
        else "application/dicom"
    )
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: 5000000000\r\n\r\n"
    reply, seconds = _raw(base, head, b"-")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    assert PROBLEM.encode() in reply and b"5000000000 bytes exceeds" in reply
    assert seconds < 5


@pytest.mark.parametrize("path", ["/dicomweb/studies", "/v1/detect"])
def test_a_stalled_body_gets_408_after_the_idle_timeout(base: str, path: str) -> None:
    ctype = (
        'multipart/related; type="application/dicom"; boundary=x'
        if "studies" in path
        else "application/dicom"
    )
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: 100000\r\n\r\n"
    reply, seconds = _raw(base, head, b"--x\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * 1000)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
    assert b"request-timeout" in reply
    assert 0.9 <= seconds < 10


def test_unknown_routes_and_methods_are_problem_documents(base: str) -> None:
    r = httpx.get(f"{base}/no/such/route")
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM and r.json()["detail"]
    r = httpx.delete(f"{base}/healthz")
    assert r.status_code == 405 and r.headers["content-type"] == PROBLEM


@pytest.mark.parametrize(
    "path",
    [
        "/v1/results/1.2.abc",
        "/v1/results/" + "1." * 40 + "1",
        "/v1/results/1.2..3",
        "/v1/series/1.2.3abc/complete",
        "/v1/series/1.2.%00",
    ],
)
def test_identifiers_in_paths_that_are_not_uids_are_refused(base: str, path: str) -> None:
    r = httpx.post(f"{base}{path}") if path.endswith("/complete") else httpx.get(f"{base}{path}")
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == PROBLEM and "not a DICOM UID" in r.json()["detail"]


def test_a_study_path_that_is_not_a_uid_is_refused(base: str) -> None:
    body, ctype = multipart([SOURCE.read_bytes()])
    r = httpx.post(f"{base}/dicomweb/studies/not-a-uid", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 400 and "not a DICOM UID" in r.json()["detail"]


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "PALETTE COLOR without its palette"),
        ({"SOPInstanceUID": "../../etc/passwd"}, "not a DICOM UID"),
        ({"SOPInstanceUID": "1.2." + "3" * 10_000}, "not a DICOM UID"),
    ],
)
def test_bad_instances_are_400_on_detect_and_failed_parts_on_stow(
    base: str, changes: dict[str, object], why: str
) -> None:
    data = _instance(**changes)
    r = httpx.post(f"{base}/v1/detect", content=data, headers={"Content-Type": "application/dicom"})
    assert r.status_code == 400 and r.headers["content-type"] == PROBLEM, r.text
    assert why in r.json()["detail"]
    body, ctype = multipart([data])
    r = httpx.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 409, r.text  # nothing stored
    failed = r.json()["00081198"]["Value"]
    assert len(failed) == 1 and failed[0]["00081197"]["Value"] == [0xC000]  # cannot understand
    assert "00081199" not in r.json()


def test_the_stow_backlog_limit_answers_503_until_the_backlog_drains(tmp_path: Path) -> None:
    """Inference is held inside ``detect`` by a gate (not a slow CPU): two acknowledged instances fill a
    backlog of two; the third request is refused with 503 and Retry-After; once the gate opens, both are
    processed and the third is taken."""
    gate = tmp_path / "gate"
    gate.touch()
    config = tmp_path / "settings.json"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(tmp_path / "data"),
                "min_free_bytes": 0,
                "max_pending_instances": 2,
                "retry_after_s": 2,
            }
        )
    )
    port = free_port()
    proc = start_server(ANY_IMAGE, config, port, gate=gate)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=60) as c:
            stored = []
            for n in (1, 2, 3):
                body, ctype = multipart([_instance(SOPInstanceUID=f"1.2.826.0.1.3680043.10.77.{n}")])
                r = c.post(f"{url}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
                if n < 3:
                    assert r.status_code == 200, r.text
                    stored.append(f"1.2.826.0.1.3680043.10.77.{n}")
                else:
                    assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
                    assert "backlog limit" in r.json()["detail"]
            os.unlink(gate)
            for uid in stored:
                wait_until(
                    lambda uid=uid: c.get(f"{url}/v1/results/{uid}").status_code == 200,
                    "the backlog drained",
                    timeout=60,
                    interval=0.1,
                )
            r = c.post(f"{url}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(60)


def test_a_connection_that_sends_its_headers_too_slowly_is_closed(tmp_path: Path, launcher: Launcher) -> None:
    """``retinaedge serve`` (its own HTTP protocol): a client sending its request line a byte at a time
    is cut off at the header deadline; a normal client on a kept-alive connection is not."""
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "request_header_timeout_s": 1.0}))
    port = free_port()
    proc = launcher.start_server(ANY_IMAGE, config, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:  # one kept-alive connection
            assert [c.get("/healthz").status_code for _ in range(3)] == [200, 200, 200]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            started, closed = time.monotonic(), False
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n"[:20]:  # bounded: 20 bytes, 0.25 s apart
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.25)
            if not closed:
                s.settimeout(5)
                closed = s.recv(1024) == b""
            assert closed and time.monotonic() - started < 8
    finally:
        proc.terminate()
        proc.wait(60)


def test_a_pipelined_request_is_not_cut_off_by_the_header_deadline(tmp_path: Path) -> None:
    """Two requests in one packet; the second is held in inference (a gate) past the header deadline:
    its headers arrived with the first, so both are answered."""
    gate = tmp_path / "gate"
    gate.touch()
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "request_header_timeout_s": 1.0}))
    port = free_port()
    proc = start_server(ANY_IMAGE, config, port, gate=gate)
    data = SOURCE.read_bytes()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                + b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
                + f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            time.sleep(2.5)  # the detect request is held well past the 1 s header deadline
            os.unlink(gate)
            received = b""
            for _ in range(50):  # bounded
                if received.count(b"HTTP/1.1 200") == 2 and received.rstrip().endswith(b"}"):
                    break
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
        assert received.count(b"HTTP/1.1 200") == 2, received[:500]
        assert b'"sop_instance_uid"' in received
    finally:
        proc.terminate()
        proc.wait(60)


def test_the_protocol_is_httptools_when_installed_else_h11() -> None:
    """``retinaedge serve`` parses HTTP with httptools (a dependency; C) and keeps h11 as the fallback; both
    carry the header deadline."""
    from retinaedge.service.http.protocol import protocol_class
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    fast, fallback = protocol_class(1.5), protocol_class(2.5, prefer_httptools=False)
    assert issubclass(fast, HttpToolsProtocol) and fast.header_timeout_s == 1.5
    assert issubclass(fallback, H11Protocol) and fallback.header_timeout_s == 2.5
