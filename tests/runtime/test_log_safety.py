"""No DICOM value and no traceback for an expected error in any log line, dependencies' lines included
(runtime/logsafety.py)."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import pydicom
import pytest
from retinaedge.runtime import logsafety
from retinaedge.runtime.errors import MalformedDicomError
from support.paths import DEMO, REPO_ROOT
from support.polling import poll

#: Invalid values, one per VR pydicom validates, each carrying a marker that must never be logged.
CANARY_VALUES = {
    "PatientBirthDate": ("DA", "CANARY19010203"),
    "StudyDate": ("DA", "1901020X"),
    "StudyTime": ("TM", "CANARYTIME"),
    "AcquisitionDateTime": ("DT", "CANARYDT190102"),
    "PatientName": ("PN", "CANARYNAME^" + "N" * 70),
    "PatientID": ("LO", "CANARYID" * 10),
    "AccessionNumber": ("SH", "CANARYACC" * 3),
    "PatientAge": ("AS", "CANARYAGE"),
    "PatientSex": ("CS", "canarysex"),
    "InstitutionName": ("LO", "CANARYINST" * 10),
    "ReferringPhysicianName": ("PN", "CANARYDOCTOR^" + "D" * 70),
}
#: Identifiers that are not UIDs: such an instance is refused (400), and its values are not logged either.
BAD_UIDS = {
    "StudyInstanceUID": ("UI", "1.2.CANARYSTUDYUID"),
    "SeriesInstanceUID": ("UI", "1.2.826.0.1.55555." + "7" * 60),
}
MARKERS = ["CANARY", "19010203", "1901020X", "canarysex", "55555"]


@pytest.fixture
def installed() -> None:
    logsafety.install()


def test_redact_keeps_the_shape_and_drops_values() -> None:
    assert (
        logsafety.redact("Invalid value for VR DA: '19010203'.", dicom=True) == "Invalid value for VR DA: …"
    )
    assert "1.2.840" not in logsafety.redact("unknown UID 1.2.840.10008.1.2.4.999 in header")
    assert "19010203" not in logsafety.redact("date 19010203 rejected")
    assert "1.2.3.4" not in logsafety.redact("UI 1.2.3.4 wrong", dicom=True)
    assert "1234" not in logsafety.redact("ID 1234 wrong", dicom=True)
    # What operators need from a server's own lines stays: addresses, ports, process IDs.
    assert (
        logsafety.redact("Uvicorn running on http://127.0.0.1:8080")
        == "Uvicorn running on http://127.0.0.1:8080"
    )
    assert logsafety.redact("Started server process [123456]") == "Started server process [123456]"
    assert (
        logsafety.redact(
            "Invalid value for VR UI: '1.2.X'. Please see <https://dicom.nema.org/x.html#t> for allowed values for each VR.",
            dicom=True,
        )
        == "Invalid value for VR UI: …"
    )
    assert "SMITH" not in logsafety.redact("name SMITH^JOHN too long")
    assert logsafety.redact("The value length (27) exceeds 16 for VR SH.") == (
        "The value length (27) exceeds 16 for VR SH."
    )


def test_dependency_records_are_redacted_and_ours_pass(
    installed: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
        logging.getLogger("pydicom").log(level, "Invalid value for VR DA: '%s'.", "CANARY19010203")
        logging.getLogger("pydicom.valuerep").log(level, "Invalid value for VR UI: '1.2.CANARYUID'.")
        logging.getLogger("uvicorn.error").log(level, "header was CANARYNAME^X '1.2.3.4' 1.2.826.0.1.3")
    logging.getLogger("retinaedge.service.app").info("own line %s", "kept as is")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "CANARY" not in text and "1.2.3.4" not in text and "1.2.826.0.1.3" not in text
    assert "Invalid value for VR DA: …" in text
    assert "own line kept as is" in text


def test_expected_errors_lose_their_traceback(installed: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    class ClientDisconnect(Exception):  # what starlette raises when a client goes away
        pass

    cases = [
        ("uvicorn.error", ClientDisconnect()),
        ("uvicorn.error", MalformedDicomError("bad header")),
        ("pydicom.pixels.decoders.base", ValueError("CANARY unexpected end of codestream")),
    ]
    for name, exc in cases:
        try:
            raise exc
        except Exception:
            logging.getLogger(name).exception("Exception in ASGI application")
    records = [r for r in caplog.records if r.getMessage().startswith("Exception in ASGI")]
    assert len(records) == 3
    for record, (_, exc) in zip(records, cases, strict=True):
        assert record.exc_info is None and not record.exc_text
        assert record.getMessage().endswith(f"({type(exc).__name__})")
    assert "CANARY" not in caplog.text and "Traceback" not in caplog.text


def test_an_unexpected_error_keeps_a_redacted_traceback(
    installed: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    values = {"uid": "1.2.826.0.1.55555.1", "name": "CANARYNAME^X"}
    try:
        raise RuntimeError(f"state for {values['uid']} {values['name']}")  # the source line holds no value
    except RuntimeError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    assert "Traceback (most recent call last)" in caplog.text
    assert "RuntimeError" in caplog.text and "test_log_safety.py" in caplog.text
    assert "55555" not in caplog.text and "CANARYNAME" not in caplog.text


def _canary_file(tmp_path: Path, values: dict[str, tuple[str, str]] = CANARY_VALUES) -> Path:
    ds = pydicom.dcmread(REPO_ROOT / "examples" / "study_01" / "IM0001.dcm")
    with warnings.catch_warnings():  # pydicom warns here too; this test's own output is not the point
        warnings.simplefilter("ignore")
        for keyword, (vr, value) in values.items():
            ds[keyword] = pydicom.DataElement(keyword, vr, value)
        # DS and IS values pydicom will not write as they are: valid placeholders, patched afterwards.
        ds.PatientWeight = "98765.43"
        ds.StageNumber = "87654321"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    for placeholder, canary in ((b"98765.43", b"CANARYDS"), (b"87654321", b"CANARYIS")):
        assert data.count(placeholder) == 1
        data = data.replace(placeholder, canary)
    path = tmp_path / f"canary-{len(values)}.dcm"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("reader_processes", [0, 1])
def test_serve_at_debug_logs_no_value_of_an_instance_it_stores(tmp_path: Path, reader_processes: int) -> None:
    """``retinaedge serve`` as a real process at RETINAEDGE_LOG_LEVEL=DEBUG: an instance with invalid
    values in every VR pydicom validates, through /v1/detect and STOW-RS; its log holds none of them (with
    the readers in threads, and in a reader process, which logs to the same stderr)."""
    import os
    import signal

    import httpx
    from support.servers import free_port, start_server

    path = _canary_file(tmp_path)
    refused = _canary_file(tmp_path, {**CANARY_VALUES, **BAD_UIDS})
    config = tmp_path / "settings.json"
    config.write_text(
        f'{{"data_dir": "{tmp_path / "data"}", "min_free_bytes": 0, "reader_processes": {reader_processes}}}'
    )
    port = free_port()
    os.environ["RETINAEDGE_LOG_LEVEL"] = "DEBUG"
    try:
        proc = start_server(DEMO, config, port)
    finally:
        del os.environ["RETINAEDGE_LOG_LEVEL"]
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=60) as c:
            r = c.post(
                f"{base}/v1/detect", content=path.read_bytes(), headers={"Content-Type": "application/dicom"}
            )
            assert r.status_code == 200, r.text
            uid = r.json()["sop_instance_uid"]
            r = c.post(
                f"{base}/v1/detect",
                content=refused.read_bytes(),
                headers={"Content-Type": "application/dicom"},
            )
            assert r.status_code == 400 and "not a DICOM UID" in r.json()["detail"], r.text
            parts = [path.read_bytes(), refused.read_bytes()]
            head = b"--canary\r\nContent-Type: application/dicom\r\n\r\n"
            body = b"".join(head + p + b"\r\n" for p in parts) + b"--canary--\r\n"
            ctype = 'multipart/related; type="application/dicom"; boundary=canary'
            r = c.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 202, r.text  # one stored, one failed
            assert len(r.json()["00081198"]["Value"]) == 1
            poll(lambda: c.get(f"{base}/v1/results/{uid}").status_code == 200, timeout=60, interval=0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    log = (tmp_path / f"server-{port}.log").read_text()
    assert " DEBUG " in log  # the setting took effect
    assert "Invalid value for VR" in log  # pydicom did warn while the header was read
    for marker in MARKERS:
        assert marker not in log, [ln for ln in log.splitlines() if marker in ln][:3]
    assert "Traceback" not in log


def test_records_made_from_dicts_still_work(installed: None) -> None:
    """logging.makeLogRecord (socket and queue log receivers) makes an empty record through the factory,
    without a name, then fills it in: the factory must not fail on it."""
    record = logging.makeLogRecord({"name": "remote", "msg": "value %s", "args": ("x",)})
    assert record.getMessage() == "value x"


def test_formatters_that_unpack_args_keep_working(installed: None) -> None:
    """uvicorn's access formatter unpacks ``record.args``: they stay a tuple, with values redacted."""
    from uvicorn.logging import AccessFormatter

    record = logging.getLogger("uvicorn.access").makeRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/v1/results/1.2.826.0.1.55555.1", "1.1", 200),
        None,
    )
    text = AccessFormatter("%(message)s", use_colors=False).format(record)
    assert "GET /v1/results/…" in text and "200" in text and "55555" not in text
