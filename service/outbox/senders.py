"""Send one SR file to one destination: DIMSE C-STORE (pynetdicom) or DICOMweb STOW-RS (urllib).

``sender_for(destination).send(path, sr)`` returns a :class:`Delivery`; it never raises for the peer's
or the network's failures. ``outcome`` is ``delivered``, ``failed`` (the SR did not reach the peer:
no connection, association rejected, a failure status) or ``unknown`` (it may have: the connection
broke or timed out after the SR was sent). Details name what happened, never a secret or a DICOM value.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import secrets
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from retinaedge.service.outbox.destinations import Destination, DimseDestination, StowRsDestination

log = logging.getLogger(__name__)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
#: C-STORE statuses (PS3.4 B.2.3) that mean stored: success and the three warnings.
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
#: "Duplicate SOP Instance" (PS3.7 C.4.2.1.4.1 uses 0x0111): the peer already holds it.
DUPLICATE = 0x0111


@dataclass(frozen=True)
class Delivery:
    outcome: str  # delivered | failed | unknown
    detail: str
    duplicate: bool = False  # the peer said it already had this SOP instance
    #: For a failure: it concerns the destination, not this SR (no connection, credentials refused, out
    #: of resources, a server error, no answer), so the whole destination backs off; False when the peer
    #: refused this SR only (a failure status for it), so only this job does.
    destination_wide: bool = True


def _this_sr_only(status: int) -> bool:
    """A DIMSE status or STOW-RS Failure Reason that refuses this SR (not out of resources, 0xA7xx)."""
    return status & 0xFF00 != 0xA700


class Sender(Protocol):
    def send(self, path: Path, sr: Any) -> Delivery: ...


class DimseSender:
    """C-STORE SCU: one association per SR, proposing exactly the SR's SOP class (Comprehensive 3D SR)
    in explicit and implicit VR little endian."""

    def __init__(self, dest: DimseDestination) -> None:
        self.dest = dest
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines narrate every association

    def _tls(self) -> tuple[ssl.SSLContext, str] | None:
        tls = self.dest.tls
        if tls is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = tls.check_hostname
        if tls.cert_file is not None:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        return ctx, self.dest.host

    def send(self, path: Path, sr: Any) -> Delivery:
        from pynetdicom import AE, evt

        d = self.dest
        try:
            tls_args = self._tls()
        except (OSError, ssl.SSLError) as exc:
            return Delivery("failed", f"the TLS files cannot be used: {type(exc).__name__}")
        ae = AE(ae_title=d.calling_ae_title)
        ae.add_requested_context(str(sr.SOPClassUID), [EXPLICIT_LE, IMPLICIT_LE])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = d.timeout_s
        ae.connection_timeout = d.timeout_s
        connected: list[bool] = []
        assoc = ae.associate(
            d.host,
            d.port,
            ae_title=d.ae_title,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.append(True))],
        )
        if not assoc.is_established:
            if not connected:
                why = f"no connection to {d.host}:{d.port} (refused, unreachable or timed out)"
            elif assoc.is_rejected:
                why = "the peer rejected the association (check its AE titles and allowed callers)"
            else:
                why = "the association was aborted before it was established (TLS, or the peer)"
            return Delivery("failed", why)
        try:
            if not assoc.accepted_contexts:
                return Delivery("failed", "the peer accepted no presentation context for this SR's SOP class")
            try:
                status = assoc.send_c_store(sr)
            except (ValueError, RuntimeError) as exc:  # encoding or no matching context: nothing sent
                return Delivery("failed", f"C-STORE not sent: {type(exc).__name__}", destination_wide=False)
            code = getattr(status, "Status", None) if status is not None else None
            if code is None:
                return Delivery("unknown", "no C-STORE response (connection lost or timed out after sending)")
            if code in STORED:
                return Delivery("delivered", f"C-STORE status 0x{code:04X}")
            if code == DUPLICATE:
                return Delivery("delivered", "the peer already holds this SOP instance", duplicate=True)
            return Delivery(
                "failed", f"C-STORE failure status 0x{code:04X}", destination_wide=not _this_sr_only(code)
            )
        finally:
            if assoc.is_established:
                assoc.release()


class StowRsSender:
    """STOW-RS: one ``multipart/related; type="application/dicom"`` POST to ``<url>/studies`` per SR."""

    def __init__(self, dest: StowRsDestination) -> None:
        self.dest = dest

    def _headers(self, boundary: str) -> dict[str, str]:
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        auth = self.dest.auth
        if auth is not None:
            secret = auth.secret()
            if auth.type == "bearer":
                headers["Authorization"] = f"Bearer {secret}"
            else:
                pair = f"{auth.username}:{secret}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        return headers

    def send(self, path: Path, sr: Any) -> Delivery:
        d = self.dest
        boundary = "retinaedge-" + secrets.token_hex(12)
        try:
            headers = self._headers(boundary)
        except ValueError as exc:
            return Delivery("failed", str(exc))
        body = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                path.read_bytes(),
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        request = urllib.request.Request(f"{d.url}/studies", data=body, headers=headers, method="POST")
        context = None
        if d.url.startswith("https://"):
            context = ssl.create_default_context(cafile=str(d.ca_file) if d.ca_file else None)
        try:
            with urllib.request.urlopen(request, timeout=d.timeout_s, context=context) as response:
                return _stow_outcome(response.status, response.read(), str(sr.SOPInstanceUID))
        except urllib.error.HTTPError as exc:
            try:
                payload = exc.read()
            except OSError:
                payload = b""
            return _stow_outcome(exc.code, payload, str(sr.SOPInstanceUID))
        except urllib.error.URLError as exc:  # connecting or sending failed: the response is read below
            return Delivery("failed", f"STOW-RS request failed: {_name(exc.reason)}")
        except (OSError, http.client.HTTPException) as exc:  # the request went out, no (whole) answer
            return Delivery("unknown", f"no STOW-RS response ({type(exc).__name__})")


def _name(reason: object) -> str:
    return "connection failed" if isinstance(reason, str) else type(reason).__name__


def _stow_outcome(status: int, payload: bytes, sop_uid: str) -> Delivery:
    """The STOW-RS response (PS3.18 10.5.3) -> a delivery: 200 stored; 202/409 with the SR in the Failed
    SOP Sequence (its Failure Reason) failed, or delivered when that reason is a duplicate."""
    if status in (401, 403):
        return Delivery("failed", f"STOW-RS HTTP {status}: the credentials were refused")
    reason = _failure_reason(payload, sop_uid)
    if reason == DUPLICATE:
        return Delivery("delivered", "the peer already holds this SOP instance", duplicate=True)
    if status == 200 or (status == 202 and reason is None):
        return Delivery("delivered", f"STOW-RS HTTP {status}")
    if reason is not None:
        return Delivery(
            "failed",
            f"STOW-RS HTTP {status}, failure reason 0x{reason:04X}",
            destination_wide=not _this_sr_only(reason),
        )
    this_sr = 400 <= status < 500 and status not in (404, 405, 408, 429)  # the request, not the service
    return Delivery("failed", f"STOW-RS HTTP {status}", destination_wide=not this_sr)


def _failure_reason(payload: bytes, sop_uid: str) -> int | None:
    """The Failure Reason (0008,1197) of ``sop_uid`` in the response's Failed SOP Sequence (0008,1198)."""
    try:
        doc = json.loads(payload) if payload else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    for item in doc.get("00081198", {}).get("Value", []) or []:
        if not isinstance(item, dict):
            continue
        uid = (item.get("00081155", {}).get("Value") or [None])[0]
        reason = (item.get("00081197", {}).get("Value") or [None])[0]
        if uid in (sop_uid, None) and isinstance(reason, int):
            return reason
    return None


#: The sender of each destination type (:data:`.destinations.DESTINATION_TYPES`).
SENDERS: dict[type[Destination], Callable[[Any], Sender]] = {
    DimseDestination: DimseSender,
    StowRsDestination: StowRsSender,
}


def sender_for(dest: Destination) -> Sender:
    return SENDERS[type(dest)](dest)
