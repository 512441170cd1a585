"""TLS handshakes have the header deadline (``request_header_timeout_s``) on HTTPS and on DICOM TLS, and
the certificate's validity is checked at start: ``retinaedge serve`` as a real subprocess with a
one-second deadline, raw sockets that never finish their handshake."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.certs import self_signed
from support.paths import DEMO
from support.polling import wait_until
from support.servers import free_port

DEADLINE_S = 1.0


class Tls:
    def __init__(self, http_port: int, dimse_port: int, cert: Path, log: Path) -> None:
        self.http_port, self.dimse_port, self.cert, self.log = http_port, dimse_port, cert, log


@pytest.fixture(scope="module")
def tls_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    d = tmp_path_factory.mktemp("tls-deadlines")
    cert, key = self_signed(d, "cert", common_name="127.0.0.1")  # valid for two days
    http_port, dimse_port = free_port(), free_port()
    config = d / "settings.json"
    settings = {
        "data_dir": str(d / "data"),
        "tls_cert_file": str(cert),
        "tls_key_file": str(key),
        "request_header_timeout_s": DEADLINE_S,
        "dimse_port": dimse_port,
        "dimse_acse_timeout_s": 10.0,  # the handshake's deadline is the shorter one
    }
    config.write_text(json.dumps(settings))
    log_path = d / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed below)
    argv = [sys.executable, "-m", "retinaedge.runtime.cli", "serve", "--model", str(DEMO)]
    proc = subprocess.Popen(argv + ["--port", str(http_port), "--config", str(config)], stderr=log)

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()[-2000:]
        try:
            r = httpx.get(
                f"https://127.0.0.1:{http_port}/readyz", verify=ssl.create_default_context(cafile=cert)
            )
        except httpx.TransportError:
            return False
        return r.status_code == 200

    try:
        wait_until(ready, "the HTTPS server ready", timeout=60, interval=0.1)
        yield Tls(http_port, dimse_port, cert, log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


def _seconds_until_closed(port: int, drip: bool, limit: float = 8.0) -> float:
    """Connect, then send nothing (or a TLS record header a byte every 0.2 s): seconds until the server
    closes the connection (``limit`` if it does not)."""
    started = time.monotonic()
    hello = b"\x16\x03\x01\x02\x00" + b"\x01" * 64  # a ClientHello record that never completes
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(0.2)
        for k in range(int(limit / 0.2)):
            if drip and k < len(hello):
                try:
                    sock.send(hello[k : k + 1])
                except OSError:
                    break
            try:
                if sock.recv(4096) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:  # reset
                break
    return time.monotonic() - started


@pytest.mark.parametrize("drip", [False, True], ids=["silent", "slow-drip"])
def test_https_handshake_has_the_header_deadline(tls_service: Tls, drip: bool) -> None:
    seconds = _seconds_until_closed(tls_service.http_port, drip)
    assert seconds < DEADLINE_S + 2, f"a stalled HTTPS handshake was open {seconds:.1f} s"


@pytest.mark.parametrize("drip", [False, True], ids=["silent", "slow-drip"])
def test_dicom_tls_handshake_has_the_header_deadline(tls_service: Tls, drip: bool) -> None:
    seconds = _seconds_until_closed(tls_service.dimse_port, drip)
    assert seconds < DEADLINE_S + 2, f"a stalled DICOM TLS handshake was open {seconds:.1f} s"


def test_a_real_dicom_tls_peer_is_not_hurried(tls_service: Tls) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="SCANNER")
    ae.add_requested_context("1.2.840.10008.1.1")
    client = ssl.create_default_context(cafile=tls_service.cert)
    assoc = ae.associate(
        "127.0.0.1", tls_service.dimse_port, ae_title="RETINAEDGE", tls_args=(client, "127.0.0.1")
    )
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_the_certificate_expiry_is_warned_at_start(tls_service: Tls) -> None:
    text = tls_service.log.read_text()
    assert "WARNING" in text and f"the TLS certificate {tls_service.cert} expires on" in text


def test_certificate_problems(tmp_path: Path) -> None:
    from retinaedge.service.http.tls import certificate_problems

    cert, _ = self_signed(tmp_path, "c")
    now = time.time()
    assert "expires on" in certificate_problems(cert, now)[0]  # two days left
    assert "expired on" in certificate_problems(cert, now + 3 * 86400)[0]
    assert "not valid before" in certificate_problems(cert, now - 86400)[0]
    assert certificate_problems(tmp_path / "missing.crt") == []
