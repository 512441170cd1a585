"""HTTPS: with a certificate and key configured the service speaks TLS only; real clients verify it."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from support.certs import self_signed
from support.paths import DEMO, REPO_ROOT
from support.polling import wait_until
from support.servers import free_port

TOKEN = "a-test-token-of-sufficient-length"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 made by openssl (the client trusts exactly it)."""
    return self_signed(tmp_path_factory.mktemp("tls"), "cert", common_name="127.0.0.1")


@pytest.fixture(scope="module")
def https_server(certificate: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cert, key = certificate
    d = tmp_path_factory.mktemp("https")
    config = d / "settings.json"
    settings = {"data_dir": str(d / "data"), "tls_cert_file": str(cert), "tls_key_file": str(key)}
    config.write_text(json.dumps(settings | {"api_token": TOKEN}))
    port = free_port()
    log = open(d / "server.log", "wb")  # noqa: SIM115 (closed below)
    argv = [sys.executable, "-m", "retinaedge.runtime.cli", "serve", "--model", str(DEMO)]
    proc = subprocess.Popen(argv + ["--port", str(port), "--config", str(config)], stderr=log)
    base = f"https://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (d / "server.log").read_text()[-2000:]
        try:
            r = httpx.get(
                f"{base}/readyz",
                verify=ssl.create_default_context(cafile=cert),
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        except httpx.TransportError:
            return False
        return r.status_code == 200

    try:
        wait_until(ready, "the HTTPS server ready", timeout=60, interval=0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    text = (d / "server.log").read_text()
    assert "serving" in text and "https://" in text
    assert "Traceback" not in text, text[-3000:]


def test_a_verifying_client_stores_a_study_over_https(
    https_server: str, certificate: tuple[Path, Path]
) -> None:
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session

    session = create_session()
    session.verify = str(certificate[0])
    session.trust_env = False  # else REQUESTS_CA_BUNDLE from the environment overrides verify
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    client = DICOMwebClient(url=f"{https_server}/dicomweb", session=session)
    study = sorted((REPO_ROOT / "examples" / "study_01").glob("*.dcm"))[:5]
    with session:  # closes its pooled connection: the server's graceful stop need not wait for it
        response = client.store_instances([pydicom.dcmread(p) for p in study])
    stored = [item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence]
    assert len(stored) == 5
    with httpx.Client(
        verify=ssl.create_default_context(cafile=certificate[0]), headers={"Authorization": f"Bearer {TOKEN}"}
    ) as c:
        wait_until(
            lambda: all(c.get(f"{https_server}/v1/results/{u}").status_code == 200 for u in stored),
            "the results of the stored instances",
            timeout=60,
            interval=0.2,
        )


def test_an_unverified_certificate_is_refused_by_the_client(https_server: str) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{https_server}/healthz")  # the system's CAs do not know the test certificate


def test_plain_http_on_the_https_port_gets_no_answer(https_server: str) -> None:
    plain = https_server.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/healthz", timeout=10)


def test_a_certificate_that_does_not_load_is_a_configuration_error(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    from retinaedge.runtime.errors import ConfigError
    from retinaedge.service.http.tls import server_context
    from retinaedge.service.settings import Settings

    key = tmp_path / "not-a-key.pem"
    key.write_text("not a key")
    s = Settings(model=DEMO, tls_cert_file=certificate[0], tls_key_file=key)
    with pytest.raises(ConfigError, match="cannot be used"):
        server_context(s)
    with pytest.raises(ValueError, match="go together"):
        Settings(model=DEMO, tls_cert_file=certificate[0])


def test_plain_http_beyond_loopback_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from retinaedge.service.http.tls import uvicorn_options
    from retinaedge.service.settings import Settings

    assert uvicorn_options(Settings(model=DEMO, host="0.0.0.0", api_token=TOKEN)) == {}
    assert "unencrypted" in caplog.text


def test_the_image_healthcheck_speaks_https_when_a_certificate_is_set(
    https_server: str, certificate: tuple[Path, Path]
) -> None:
    port = https_server.rsplit(":", 1)[1]
    env = {
        "PATH": "/usr/bin:/bin",
        "RETINAEDGE_PORT": port,
        "RETINAEDGE_API_TOKEN": TOKEN,
        "RETINAEDGE_TLS_CERT_FILE": str(certificate[0]),
    }
    probe = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docker" / "healthcheck.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert probe.stdout.startswith("readyz 200")
