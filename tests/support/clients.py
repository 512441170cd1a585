"""Requests to a running service: ``/v1/detect``, results, multipart/related bodies."""

from __future__ import annotations

from typing import Any

from support.polling import wait_until


def dicom_post(client: Any, url: str, data: bytes, **headers: str) -> Any:
    """POST one DICOM instance to ``url``/v1/detect."""
    return client.post(
        f"{url}/v1/detect", content=data, headers={"Content-Type": "application/dicom", **headers}
    )


def wait_done(client: Any, base: str, uid: str, timeout: float = 180) -> dict[str, Any]:
    """GET /v1/results/{uid} until it is 200 (202 meanwhile); returns the result."""

    def result() -> dict[str, Any] | None:
        r = client.get(f"{base}/v1/results/{uid}")
        if r.status_code == 200:
            return dict(r.json())
        assert r.status_code == 202, r.text
        return None

    return wait_until(
        result, f"a result for {uid}", lambda body: body is not None, timeout=timeout, interval=0.05
    )


def multipart(parts: list[bytes], boundary: str = "b0undary-xyz") -> tuple[bytes, str]:
    """A multipart/related body of application/dicom parts and its Content-Type."""
    body = (
        b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
            for p in parts
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'
