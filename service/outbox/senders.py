"""Send one document to one destination: DIMSE C-STORE (pynetdicom) or DICOMweb STOW-RS (urllib).

A document is one SOP instance (an SR, a GSPS, a KOS) or several (the secondary captures of an instance's
frames): ``sender_for(destination).send(instances)`` sends them all (one association, or one STOW-RS
request) and returns one :class:`Delivery`; it never raises for the peer's or the network's failures.
``outcome`` is ``delivered`` (every instance stored), ``failed`` (none reached the peer: no connection,
association rejected, a failure status) or ``unknown`` (some may have: the connection broke or timed out
after sending, or the peer stored some instances and refused another). Details name what happened, never
a secret or a DICOM value. C-STORE proposes exactly the SOP class of each instance, as its file says.
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
from collections.abc import Callable, Iterator, Sequence
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
class Instance:
    """One SOP instance of a document, as built: its file and the SOP class and instance UIDs in it."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str


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
    def send(self, instances: Sequence[Instance], timeout_s: float | None = None) -> Delivery:
        """Send ``instances``; ``timeout_s`` overrides the destination's (a slow peer's longer wait)."""
        ...


def _partial(stored: int, total: int, failure: Delivery) -> Delivery:
    """The outcome of a document whose first ``stored`` of ``total`` instances were stored before
    ``failure``: that failure when none was, else ``unknown`` (part of the document reached the peer)."""
    if stored == 0 or failure.outcome != "failed":
        return failure
    return Delivery(
        "unknown",
        f"{stored} of {total} instances stored, then: {failure.detail}",
        destination_wide=failure.destination_wide,
    )


def client_tls(dest: DimseDestination) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for ``dest`` (None without TLS); raises ``OSError``/``ssl.SSLError`` when
    its files cannot be used."""
    tls = dest.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx, dest.host


def basic_or_bearer(dest: StowRsDestination) -> dict[str, str]:
    """The ``Authorization`` header of ``dest``'s credentials (none without them); raises ``ValueError``
    when its secret cannot be read."""
    auth = dest.auth
    if auth is None:
        return {}
    secret = auth.secret()
    if auth.type == "bearer":
        return {"Authorization": f"Bearer {secret}"}
    pair = f"{auth.username}:{secret}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


class DimseSender:
    """C-STORE SCU: one association per document, proposing exactly the SOP class of each of its
    instances (Comprehensive 3D SR, Secondary Capture, ...) in explicit and implicit VR little endian,
    then one C-STORE per instance."""

    def __init__(self, dest: DimseDestination) -> None:
        self.dest = dest
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines narrate every association

    def send(self, instances: Sequence[Instance], timeout_s: float | None = None) -> Delivery:
        from pynetdicom import AE, evt

        d = self.dest
        timeout = timeout_s or d.timeout_s
        try:
            tls_args = client_tls(d)
        except (OSError, ssl.SSLError) as exc:
            return Delivery("failed", f"the TLS files cannot be used: {type(exc).__name__}")
        ae = AE(ae_title=d.calling_ae_title)
        for sop_class in dict.fromkeys(i.sop_class_uid for i in instances):
            ae.add_requested_context(sop_class, [EXPLICIT_LE, IMPLICIT_LE])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
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
                return Delivery(
                    "failed", "the peer accepted no presentation context for this document's SOP class"
                )
            done: list[Delivery] = []
            for instance in instances:
                outcome = self._store(assoc, instance)
                if outcome.outcome != "delivered":
                    return _partial(len(done), len(instances), outcome)
                done.append(outcome)
            if len(done) == 1:
                return done[0]
            return Delivery(
                "delivered",
                f"{len(done)} instances, C-STORE statuses {', '.join(sorted({o.detail for o in done}))}",
                duplicate=any(o.duplicate for o in done),
            )
        finally:
            if assoc.is_established:
                assoc.release()

    @staticmethod
    def _store(assoc: Any, instance: Instance) -> Delivery:
        """One C-STORE of ``instance`` on the established ``assoc``."""
        import pydicom

        if not any(c.abstract_syntax == instance.sop_class_uid for c in assoc.accepted_contexts):
            name = pydicom.uid.UID(instance.sop_class_uid).name
            return Delivery(
                "failed", f"the peer accepted no presentation context for {name}", destination_wide=False
            )
        try:
            dataset = pydicom.dcmread(instance.path)
            status = assoc.send_c_store(dataset)
        except (ValueError, RuntimeError, OSError) as exc:  # unreadable, encoding or no context: not sent
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


class StowRsSender:
    """STOW-RS: one ``multipart/related; type="application/dicom"`` POST to ``<url>/studies`` per
    document, one part per instance (the files are read while the body is sent, one at a time)."""

    def __init__(self, dest: StowRsDestination) -> None:
        self.dest = dest

    def _headers(self, boundary: str) -> dict[str, str]:
        return {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
            **basic_or_bearer(self.dest),
        }

    def send(self, instances: Sequence[Instance], timeout_s: float | None = None) -> Delivery:
        d = self.dest
        boundary = "retinaedge-" + secrets.token_hex(12)
        try:
            headers = self._headers(boundary)
            length = _multipart_length(instances, boundary)
        except (ValueError, OSError) as exc:
            return Delivery("failed", str(exc) if isinstance(exc, ValueError) else type(exc).__name__)
        headers["Content-Length"] = str(length)
        request = urllib.request.Request(
            f"{d.url}/studies", data=_multipart(instances, boundary), headers=headers, method="POST"
        )
        context = None
        if d.url.startswith("https://"):
            context = ssl.create_default_context(cafile=str(d.ca_file) if d.ca_file else None)
        uids = [i.sop_instance_uid for i in instances]
        try:
            with urllib.request.urlopen(
                request, timeout=timeout_s or d.timeout_s, context=context
            ) as response:
                return _stow_outcome(response.status, response.read(), uids)
        except urllib.error.HTTPError as exc:
            try:
                payload = exc.read()
            except OSError:
                payload = b""
            return _stow_outcome(exc.code, payload, uids)
        except urllib.error.URLError as exc:  # connecting or sending failed: the response is read below
            return Delivery("failed", f"STOW-RS request failed: {_name(exc.reason)}")
        except (OSError, http.client.HTTPException) as exc:  # the request went out, no (whole) answer
            return Delivery("unknown", f"no STOW-RS response ({type(exc).__name__})")


def _name(reason: object) -> str:
    return "connection failed" if isinstance(reason, str) else type(reason).__name__


def _part_head(boundary: str) -> bytes:
    return f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()


def _multipart_length(instances: Sequence[Instance], boundary: str) -> int:
    """The bytes of :func:`_multipart`'s body (raises ``OSError`` for a file that is gone)."""
    head, tail = len(_part_head(boundary)), len(f"--{boundary}--\r\n")
    return sum(head + i.path.stat().st_size + 2 for i in instances) + tail


def _multipart(instances: Sequence[Instance], boundary: str) -> Iterator[bytes]:
    """The ``multipart/related`` body, one part per instance, each file read when its part is sent."""
    for instance in instances:
        yield _part_head(boundary)
        yield instance.path.read_bytes()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _stow_outcome(status: int, payload: bytes, sop_uids: Sequence[str]) -> Delivery:
    """The STOW-RS response (PS3.18 10.5.3) -> a delivery: 200 stored; 202/409 with instances in the
    Failed SOP Sequence (their Failure Reasons) failed, or ``unknown`` when the others were stored, or
    delivered when every reason is a duplicate."""
    if status in (401, 403):
        return Delivery("failed", f"STOW-RS HTTP {status}: the credentials were refused")
    reasons = _failure_reasons(payload, sop_uids)
    refused = [r for r in reasons if r != DUPLICATE]
    if not refused and reasons:
        return Delivery("delivered", "the peer already holds this SOP instance", duplicate=True)
    if status == 200 or (status == 202 and not reasons):
        return Delivery("delivered", f"STOW-RS HTTP {status}")
    if refused:
        failure = Delivery(
            "failed",
            f"STOW-RS HTTP {status}, failure reason 0x{refused[0]:04X}",
            destination_wide=not all(_this_sr_only(r) for r in refused),
        )
        return _partial(len(sop_uids) - len(reasons), len(sop_uids), failure) if status == 202 else failure
    this_sr = 400 <= status < 500 and status not in (404, 405, 408, 429)  # the request, not the service
    return Delivery("failed", f"STOW-RS HTTP {status}", destination_wide=not this_sr)


def _failure_reasons(payload: bytes, sop_uids: Sequence[str]) -> list[int]:
    """The Failure Reasons (0008,1197) of ``sop_uids`` in the response's Failed SOP Sequence (0008,1198)
    (an item without a Referenced SOP Instance UID counts as one of them)."""
    try:
        doc = json.loads(payload) if payload else None
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(doc, dict):
        return []
    out = []
    for item in doc.get("00081198", {}).get("Value", []) or []:
        if not isinstance(item, dict):
            continue
        uid = (item.get("00081155", {}).get("Value") or [None])[0]
        reason = (item.get("00081197", {}).get("Value") or [None])[0]
        if (uid is None or uid in sop_uids) and isinstance(reason, int):
            out.append(reason)
    return out


#: The sender of each destination type (:data:`.destinations.DESTINATION_TYPES`).
SENDERS: dict[type[Destination], Callable[[Any], Sender]] = {
    DimseDestination: DimseSender,
    StowRsDestination: StowRsSender,
}


def sender_for(dest: Destination) -> Sender:
    return SENDERS[type(dest)](dest)
