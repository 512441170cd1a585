"""Self-signed test certificates for 127.0.0.1, made by the openssl command."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def self_signed(directory: Path, name: str, *, common_name: str | None = None) -> tuple[Path, Path]:
    """``directory/name.crt`` and ``directory/name.key``: an RSA-2048 certificate valid for two days with
    subjectAltName IP:127.0.0.1 and CN ``common_name`` (default ``name``). Skips the calling test when
    there is no openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        + ["-subj", f"/CN={common_name or name}", "-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key
