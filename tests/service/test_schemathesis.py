"""Schemathesis against the service's own OpenAPI schema, on a real uvicorn server on 127.0.0.1.

Bounded, deterministic runs, all asserting that no response is a server error (5xx) and that the server
logs no internal error (an unhandled exception, or a background processing failure):

* every operation in ``/openapi.json``: schemathesis-generated positive and negative cases, at most 25
  per operation and mode;
* raw request bodies, which the schema does not describe (the POST endpoints read the body themselves):
  random bytes, a DICOM preamble followed by random bytes, and a real DICOM file with bytes overwritten
  or cut short -- bare as application/dicom to POST /v1/detect, as multipart/related parts to POST
  /dicomweb/studies[/{study}], and under mismatched or malformed content types to all three;
* and, as fixed cases, the malformed headers those runs found answered with a 500.

Every request goes on a fresh connection: after an unhandled exception uvicorn closes the connection
without saying so, and a client that reuses it would blame the next request for the reset.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from support.paths import CORPUS, demo_any_image
from support.polling import poll
from support.servers import serve

#: The demo model without its intended use: pydicom's corpus (CT, US, SC, broken files) reaches the runtime.
ANY_IMAGE = demo_any_image()

# Fuzzed DICOM headers make pydicom warn (e.g. a UI value longer than 64 characters); that is expected.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")

EXAMPLES_PER_OPERATION = 25
RAW_EXAMPLES = 25
BOUNDARY = "x"
STOW_CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
OTHER_STUDY_UID = "1.2.826.0.1.3680043.2.1125.1"
CT_SMALL_STUDY_UID = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
POST_PATHS = ["/v1/detect", "/dicomweb/studies", f"/dicomweb/studies/{OTHER_STUDY_UID}"]
ODD_CONTENT_TYPES = [
    "application/dicom",
    STOW_CONTENT_TYPE,
    f"multipart/related; boundary={BOUNDARY}",
    'multipart/related; type="application/dicom"',  # no boundary
    'multipart/related; type="application/dicom"; boundary=""',
    "multipart/related; boundary=" + "b" * 200,
    "application/octet-stream",
    "application/dicom; charset=utf-8",
    "",
]
CT_SMALL = (CORPUS / "CT_small.dcm").read_bytes()
CT_SMALL_SERIES_UID = "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"
PIXEL_DATA_OFFSET = CT_SMALL.index(b"\xe0\x7f\x10\x00")  # the (7FE0,0010) tag, little endian
# Bounded and reproducible: a fixed number of examples, the same ones every run, no example database, and
# no shrinking (each failing request is reported whole, with the server's traceback).
HYPOTHESIS: dict[str, Any] = {
    "derandomize": True,
    "database": None,
    "deadline": None,
    "phases": [Phase.explicit, Phase.generate],
    "suppress_health_check": list(HealthCheck),
}
NO_KEEPALIVE = {"Connection": "close"}


class _Collect(logging.Handler):
    """Keeps every record at WARNING or above, from any thread (the server runs in one).

    The record is formatted here, in the thread that logs it, so its traceback text is cached on it: on
    Python 3.11, formatting a traceback parses source with ``ast``, which is not safe to do from two
    threads at once (SystemError: AST constructor recursion depth mismatch).
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)
        self.records.append(record)


def _internal_errors(records: list[logging.LogRecord]) -> list[str]:
    """Server-side errors: ERROR and above, or anything logged with a traceback."""
    formatter = logging.Formatter("%(name)s %(levelname)s: %(message)s")
    return [formatter.format(r) for r in records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.fixture(scope="module")
def server_log() -> Iterator[list[logging.LogRecord]]:
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)


@pytest.fixture(scope="module")
def tally() -> Iterator[Counter[str]]:
    """Responses per ``METHOD path -> status``; printed at the end of the module (see with ``-s``)."""
    counts: Counter[str] = Counter()
    yield counts
    print(f"\nschemathesis/raw-body requests: {sum(counts.values())}")
    for key, n in sorted(counts.items()):
        print(f"  {n:5d}  {key}")


@pytest.fixture(scope="module")
def base_url(server_log: list[logging.LogRecord]) -> Iterator[str]:
    with serve(model=ANY_IMAGE, queue_size=4) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(base_url: str) -> schemathesis.BaseSchema:
    # An explicit, empty config: no schemathesis.toml is discovered, nothing else changes the run.
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=schemathesis.Config(), timeout=30)


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False  # 127.0.0.1 only: no proxies from the environment
        yield s


def _describe(
    method: str, url: str, headers: dict[str, str], body: bytes | None, status: int, text: str
) -> str:
    shown = body if body is None or len(body) <= 512 else body[:512] + b"...(%d bytes)" % len(body)
    return f"{method} {url}\nheaders: {headers}\nbody: {shown!r}\n-> {status}: {text[:2000]}"


def _assert_no_server_error(
    detail: str, status: int, server_log: list[logging.LogRecord], since: int
) -> None:
    if status >= 500:
        # uvicorn logs the unhandled exception only after the 500 has been sent: wait for its traceback
        # (and let the server thread finish logging it before the failure is reported).
        poll(lambda: any(r.exc_info for r in server_log[since:]), timeout=5, interval=0.05)
        time.sleep(0.2)
    errors = _internal_errors(server_log[since:])
    assert status < 500 and not errors, f"{detail}\nserver log:\n" + "\n".join(errors)


def _operation_test(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    *,
    base_url: str,
    session: requests.Session,
    server_log: list[logging.LogRecord],
    tally: Counter[str],
) -> Callable[[], None]:
    """A bounded, derandomized Hypothesis test sending ``mode`` cases of one operation to the server."""

    @settings(max_examples=EXAMPLES_PER_OPERATION, **HYPOTHESIS)
    @given(case=operation.as_strategy(mode))
    def run(case: schemathesis.Case) -> None:
        before = len(server_log)
        response = case.call(base_url=base_url, session=session, headers=NO_KEEPALIVE, timeout=60)
        tally[f"{operation.label} [{mode.value}] -> {response.status_code}"] += 1
        request = response.request
        sent = request.body.encode() if isinstance(request.body, str) else request.body
        headers = dict(request.headers)
        detail = _describe(
            request.method or "", request.url or "", headers, sent, response.status_code, response.text
        )
        _assert_no_server_error(detail, response.status_code, server_log, before)
        case.validate_response(response, checks=[not_a_server_error], headers=headers)

    return run


@pytest.mark.slow
def test_no_server_error_on_any_operation(
    api_schema: schemathesis.BaseSchema,
    base_url: str,
    session: requests.Session,
    server_log: list[logging.LogRecord],
    tally: Counter[str],
) -> None:
    # schemathesis.pytest.from_fixture + @schema.parametrize() is the usual way to test a schema known
    # only at run time, but schemathesis 4.32.5's lazy loader reads and writes Node._nodeid, which pytest
    # 9.2 no longer has (AttributeError). So: its documented Hypothesis integration, operation by operation.
    operations = []
    for result in api_schema.get_all_operations():
        assert isinstance(result, Ok), f"invalid operation in /openapi.json: {result.err()}"
        operations.append(result.ok())
    labels = {operation.label for operation in operations}
    assert {"GET /healthz", "POST /v1/detect", "POST /dicomweb/studies", "GET /v1/results/{uid}"} <= labels

    failures: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = _operation_test(
                operation, mode, base_url=base_url, session=session, server_log=server_log, tally=tally
            )
            try:
                run()
            except Unsatisfiable:
                # Nothing in this operation can be made invalid (it has no parameters): no negative cases.
                assert mode is GenerationMode.NEGATIVE, f"{operation.label}: no positive case generated"
            except Exception as exc:  # collect, so one failing operation does not hide the others
                failures.append(f"{operation.label} [{mode.value}]: {type(exc).__name__}: {exc}")
    assert not failures, "\n\n".join(failures)


@st.composite
def _mutated_dicom(draw: st.DrawFn) -> bytes:
    """A real DICOM file with a few header bytes overwritten, sometimes cut short.

    Only the header (before Pixel Data) is mutated: changed pixels decode like any image, they only cost
    an inference.
    """
    data = bytearray(CT_SMALL)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, PIXEL_DATA_OFFSET - 1))] = draw(st.integers(0, 255))
    cut = draw(st.none() | st.integers(0, len(data)))
    return bytes(data if cut is None else data[:cut])


PAYLOADS = st.one_of(
    st.binary(max_size=2048),
    st.binary(max_size=2048).map(lambda b: b"\0" * 128 + b"DICM" + b),
    _mutated_dicom(),
)


def _multipart(parts: list[tuple[str | None, bytes]], boundary: str = BOUNDARY) -> bytes:
    """A multipart/related body; a part without a type gets no Content-Type header."""
    out = b""
    for part_type, data in parts:
        head = f"Content-Type: {part_type}\r\n" if part_type else ""
        out += f"--{boundary}\r\n{head}\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


PARTS = st.lists(
    st.tuples(st.sampled_from(["application/dicom", "application/octet-stream", None]), PAYLOADS),
    min_size=1,
    max_size=3,
)
# (path, Content-Type, body): what each endpoint expects, then anything to anything.
RAW_REQUESTS = {
    "detect": st.tuples(st.just("/v1/detect"), st.just("application/dicom"), PAYLOADS),
    "stow": st.tuples(st.just("/dicomweb/studies"), st.just(STOW_CONTENT_TYPE), PARTS.map(_multipart)),
    "stow-study": st.tuples(
        st.just(f"/dicomweb/studies/{CT_SMALL_STUDY_UID}"), st.just(STOW_CONTENT_TYPE), PARTS.map(_multipart)
    ),
    "mismatched": st.tuples(
        st.sampled_from(POST_PATHS),
        st.sampled_from(ODD_CONTENT_TYPES),
        PAYLOADS | PARTS.map(_multipart) | st.binary(max_size=256).map(lambda b: b"--x\r\n" + b),
    ),
}


def _client(base_url: str) -> httpx.Client:
    """127.0.0.1 only (no proxies from the environment), one connection per request."""
    limits = httpx.Limits(max_keepalive_connections=0)
    return httpx.Client(base_url=base_url, timeout=60, trust_env=False, limits=limits)


def _referenced(response: httpx.Response) -> list[str]:
    """SOP Instance UIDs a STOW-RS response says were stored."""
    try:
        body = response.json()
    except json.JSONDecodeError:
        return []
    items = body.get("00081199", {}).get("Value", []) if isinstance(body, dict) else []
    return [u for item in items for u in item.get("00081155", {}).get("Value", [])]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(RAW_REQUESTS))
def test_no_server_error_on_raw_bodies(
    kind: str, base_url: str, server_log: list[logging.LogRecord], tally: Counter[str]
) -> None:
    stored: set[str] = set()
    start = len(server_log)

    with _client(base_url) as client:

        @settings(max_examples=RAW_EXAMPLES, **HYPOTHESIS)
        @given(request=RAW_REQUESTS[kind])
        def post(request: tuple[str, str, bytes]) -> None:
            path, content_type, body = request
            headers = {"Content-Type": content_type} if content_type else {}
            before = len(server_log)
            response = client.post(path, content=body, headers=headers)
            tally[f"POST {path} (raw {kind}) -> {response.status_code}"] += 1
            detail = _describe("POST", path, headers, body, response.status_code, response.text)
            _assert_no_server_error(detail, response.status_code, server_log, before)
            if path.startswith("/dicomweb/"):
                stored.update(_referenced(response))

        post()

        # Instances stored through STOW-RS are processed in the background: wait for them, make sure none
        # failed with an internal error, and that fetching the result (JSON and SR) is not a 5xx either.
        deadline = time.monotonic() + 30  # for all of them

        def fetch(uid: str) -> Any:
            before = len(server_log)
            r = client.get(f"/v1/results/{uid}")
            detail = _describe("GET", r.url.path, {}, None, r.status_code, r.text)
            _assert_no_server_error(detail, r.status_code, server_log, before)
            return r

        for uid in sorted(stored):
            r = poll(
                lambda uid=uid: fetch(uid),
                lambda r: r.status_code != 202,
                timeout=deadline - time.monotonic(),
                interval=0.1,
            )
            tally[f"GET /v1/results/{{uid}} (stored, {kind}) -> {r.status_code}"] += 1
            assert r.json().get("error", {}).get("type") != "internal-error", r.text
            before = len(server_log)
            headers = {"Accept": "application/dicom"}
            sr = client.get(f"/v1/results/{uid}", headers=headers)
            tally[f"GET /v1/results/{{uid}} (SR, {kind}) -> {sr.status_code}"] += 1
            detail = _describe("GET", sr.url.path, headers, None, sr.status_code, sr.text)
            _assert_no_server_error(detail, sr.status_code, server_log, before)

        # The mutated instances mostly keep CT_small's series: asking for that series' findings (JSON,
        # then the series SR) over whatever headers were stored is not a 5xx either.
        for method, suffix, headers in (
            ("POST", "/complete", {}),
            ("GET", "", {"Accept": "application/dicom"}),
        ):
            before = len(server_log)
            r = client.request(method, f"/v1/series/{CT_SMALL_SERIES_UID}{suffix}", headers=headers)
            tally[
                f"{method} /v1/series/{{uid}}{suffix} ({kind}, {headers or 'JSON'}) -> {r.status_code}"
            ] += 1
            detail = _describe(method, r.url.path, headers, None, r.status_code, r.text)
            _assert_no_server_error(detail, r.status_code, server_log, before)

        # The server is still up, and its worker still ready, after all of it.
        assert client.get("/readyz").status_code == 200
    errors = _internal_errors(server_log[start:])
    assert not errors, "server log:\n" + "\n".join(errors)


def _ct_small(old: bytes, new: bytes, instance: str) -> bytes:
    """CT_small.dcm with one header value replaced by another of the same length, under its own UID."""
    assert CT_SMALL.count(old) == 1 and len(old) == len(new) and len(instance) == 5
    return CT_SMALL.replace(old, new).replace(CT_SMALL_UID.encode(), _uid(instance).encode())


def _uid(instance: str) -> str:
    return CT_SMALL_UID[:-5] + instance


CT_SMALL_UID = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
# Header values the fuzzing above found answered with a 500, kept as fixed cases: (old, new) bytes.
MALFORMED = {
    # KVP (0018,0060), DS "120 " -> "\x8820 ": not a number (pydicom's to_json_dict raises ValueError).
    "ds-not-a-number": (b"\x18\x00\x60\x00DS\x04\x00120 ", b"\x18\x00\x60\x00DS\x04\x00\x8820 "),
    # SOP Class UID (0008,0016) "1.2.840.10008.5.1.4.1.1.2" -> "1.2.840.10008.\xdf.1.4.1.1.2": no such class
    # (highdicom raises KeyError building the SR).
    # A private tag's VR (0029,1009) "SH" -> "S\x9f": unknown VR (pydicom raises NotImplementedError when
    # the element is converted, which the DICOM JSON evidence of a STOW-RS instance did).
    "unknown-vr": (b"\x29\x00\x09\x10SH\x00\x00", b"\x29\x00\x09\x10S\x9f\x00\x00"),
    "unknown-sop-class": (
        b"\x08\x00\x16\x00UI\x1a\x001.2.840.10008.5.1.4.1.1.2\x00",
        b"\x08\x00\x16\x00UI\x1a\x001.2.840.10008.\xdf.1.4.1.1.2\x00",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "how", "instance"),
    [
        ("ds-not-a-number", "detect", "90011"),
        ("ds-not-a-number", "stow", "90012"),
        ("unknown-sop-class", "detect", "90021"),
        ("unknown-sop-class", "stow", "90022"),
        ("unknown-vr", "detect", "90031"),
        ("unknown-vr", "stow", "90032"),
    ],
)
def test_no_server_error_on_malformed_header_values(
    name: str,
    how: str,
    instance: str,
    base_url: str,
    server_log: list[logging.LogRecord],
    tally: Counter[str],
) -> None:
    data, uid = _ct_small(*MALFORMED[name], instance), _uid(instance)
    if how == "detect":
        path, headers, body = "/v1/detect", {"Content-Type": "application/dicom"}, data
    else:
        path, headers = "/dicomweb/studies", {"Content-Type": STOW_CONTENT_TYPE}
        body = _multipart([("application/dicom", data)])
    with _client(base_url) as client:
        before = len(server_log)
        r = client.post(path, content=body, headers=headers)
        tally[f"POST {path} ({name}) -> {r.status_code}"] += 1
        detail = _describe("POST", path, headers, body, r.status_code, r.text)
        _assert_no_server_error(detail, r.status_code, server_log, before)
        if r.status_code >= 300:
            return  # refused: nothing stored, nothing to fetch
        poll(lambda: client.get(f"/v1/results/{uid}").status_code != 202, timeout=30, interval=0.1)
        for accept in ("application/json", "application/dicom"):
            before = len(server_log)
            got = client.get(f"/v1/results/{uid}", headers={"Accept": accept})
            tally[f"GET /v1/results/{{uid}} ({name}, {accept}) -> {got.status_code}"] += 1
            detail = _describe(
                "GET", f"/v1/results/{uid}", {"Accept": accept}, None, got.status_code, got.text
            )
            _assert_no_server_error(detail, got.status_code, server_log, before)
