"""An incremental ``multipart/related`` parser (RFC 2046 / RFC 2387) for streamed STOW-RS bodies.

``feed(chunk)`` returns events as soon as they are known, so a part's bytes can go straight to disk:
``("headers", {name: value})``, ``("data", bytes)``, ``("end", None)`` per part, and ``("close", None)``
after the final boundary. Memory use is bounded by the chunk size plus the boundary length.
"""

from __future__ import annotations

from typing import Any

from retinaedge.runtime.errors import RequestError, UnsupportedMediaTypeError

MAX_HEADER_BYTES = 16 * 1024


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """``'multipart/related; type="application/dicom"; boundary=x'`` -> (media type, parameters)."""
    parts = [p.strip() for p in value.split(";")]
    media = parts[0].lower()
    params: dict[str, str] = {}
    for p in parts[1:]:
        if "=" in p:
            key, _, val = p.partition("=")
            params[key.strip().lower()] = val.strip().strip('"')
    return media, params


def stow_boundary(content_type: str) -> bytes:
    """The boundary of a STOW-RS request; 415 unless it is multipart/related of application/dicom."""
    media, params = parse_content_type(content_type)
    if media != "multipart/related":
        raise UnsupportedMediaTypeError(
            f"STOW-RS needs multipart/related, got {media or 'no Content-Type'!r}"
        )
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        raise UnsupportedMediaTypeError(
            f'only type="application/dicom" parts are supported (not {part_type!r}; metadata+bulkdata '
            "requests are not)"
        )
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 70:
        raise RequestError("multipart/related Content-Type needs a boundary parameter of 1 to 70 characters")
    return boundary.encode("latin-1")


class MultipartParser:
    """Feed bytes, get events. Raises :class:`RequestError` on a malformed body."""

    def __init__(self, boundary: bytes) -> None:
        self._first = b"--" + boundary
        self._delim = b"\r\n--" + boundary
        self._buf = b""
        self._state = "preamble"

    def feed(self, chunk: bytes) -> list[tuple[str, Any]]:
        self._buf += chunk
        events: list[tuple[str, Any]] = []
        while True:
            if self._state == "preamble":
                at = self._buf.find(self._first)
                if at < 0:
                    self._buf = self._buf[-len(self._first) :]
                    return events
                self._buf = self._buf[at + len(self._first) :]
                self._state = "after-boundary"
            elif self._state == "after-boundary":
                if len(self._buf) < 2:
                    return events
                if self._buf.startswith(b"--"):
                    self._state = "epilogue"
                    events.append(("close", None))
                    return events
                line_end = self._buf.find(b"\r\n")
                if line_end < 0:
                    if len(self._buf) > 1024:
                        raise RequestError("malformed multipart body: no line break after a boundary")
                    return events
                if self._buf[:line_end].strip(b" \t"):
                    raise RequestError("malformed multipart body: text after a boundary")
                self._buf = self._buf[line_end + 2 :]
                self._state = "headers"
            elif self._state == "headers":
                end = self._buf.find(b"\r\n\r\n")
                if end < 0 and not self._buf.startswith(b"\r\n"):
                    if len(self._buf) > MAX_HEADER_BYTES:
                        raise RequestError("malformed multipart body: part headers too long")
                    return events
                raw, self._buf = (
                    (b"", self._buf[2:])
                    if self._buf.startswith(b"\r\n")
                    else (self._buf[:end], self._buf[end + 4 :])
                )
                events.append(("headers", _headers(raw)))
                self._state = "body"
            elif self._state == "body":
                at = self._buf.find(self._delim)
                if at < 0:
                    keep = len(self._delim) - 1
                    if len(self._buf) > keep:
                        events.append(("data", self._buf[:-keep]))
                        self._buf = self._buf[-keep:]
                    return events
                if at:
                    events.append(("data", self._buf[:at]))
                events.append(("end", None))
                self._buf = self._buf[at + len(self._delim) :]
                self._state = "after-boundary"
            else:  # epilogue: ignored
                self._buf = b""
                return events

    def finish(self) -> None:
        """Call at the end of the stream: a body without its closing boundary is malformed."""
        if self._state != "epilogue":
            raise RequestError("malformed multipart body: it ends before the closing boundary")


def _headers(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise RequestError("malformed multipart body: a part header line has no ':'")
        out[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return out
