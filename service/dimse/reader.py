"""The SCP's DICOM upper layer (pynetdicom's DUL, one thread per connection): PDUs read within limits and
deadlines, and no busy polling while a connection is idle.

pynetdicom reads a PDU by its announced length, all of it into memory, with no socket timeout: a stranger's
6-byte header announcing 1 GiB is read as far as it sends, and 16 bytes of a header hold the connection
(and its association slot) for ever, since none of the ACSE, DIMSE and network timers runs while the
reader blocks. :class:`GuardedDUL` reads each PDU itself:

- the length is checked against its type before anything else is read: an A-ASSOCIATE-RQ (or -AC) at most
  :data:`MAX_ASSOCIATE_PDU` bytes, a P-DATA-TF at most the Maximum Length the SCP advertised
  (``dimse_max_pdu_bytes``), a release or abort PDU at most :data:`MAX_SMALL_PDU`; a PDU beyond its limit
  or of an unknown type is answered with an A-ABORT (service provider, invalid PDU parameter value) and
  the connection is closed, unread;
- a deadline per PDU: the first one (the association request, a TLS handshake before it included) must be
  complete ``dimse_acse_timeout_s`` after the connection was accepted, every later one
  ``dimse_network_timeout_s`` after its first byte arrived; a PDU that is late closes the connection;
- with TLS, the handshake itself must be complete ``request_header_timeout_s`` (the HTTPS handshake's
  deadline too) after the connection was accepted, or by the request's deadline if that is sooner.

While nothing arrives, the thread waits in ``select`` on the socket and on a wake-up socket (written when
the association sends a PDU or stops) for at most :data:`IDLE_WAIT_S`, instead of pynetdicom's 1 ms poll.

Every PDU still goes through pynetdicom's decoder and state machine; written against pynetdicom 3.0.4
(the version pinned in pyproject.toml; :func:`retinaedge.service.dimse.guard.check_pynetdicom`).
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import sys
import time
from typing import TYPE_CHECKING, Any

from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from retinaedge.runtime.logsafety import redacted_traceback

if TYPE_CHECKING:
    from retinaedge.service.dimse.guard import GuardedAssociation

log = logging.getLogger(__name__)

#: The largest A-ASSOCIATE-RQ/-AC accepted (bytes): 128 presentation contexts with 20 transfer syntaxes
#: each, plus user identity, fit well below it.
MAX_ASSOCIATE_PDU = 256 * 1024
#: The largest A-ASSOCIATE-RJ, A-RELEASE-RQ/-RP or A-ABORT accepted (bytes; each is 4 by PS3.8).
MAX_SMALL_PDU = 1024
#: How long an idle reactor thread sleeps between checks of its timers (seconds); data, a PDU to send
#: or a stop wakes it at once.
IDLE_WAIT_S = 0.25

#: PS3.8 9.3.8: A-ABORT source "service provider", reason "invalid PDU parameter value".
_ABORT_SOURCE_PROVIDER = 0x02
_ABORT_INVALID_PARAMETER = 0x06
_HEADER = struct.Struct(">BBL")


class PduLimitExceeded(Exception):
    """A PDU whose type or announced length is not accepted (never read)."""


class LateError(TimeoutError):
    """A PDU not complete by its deadline."""


class Closed(Exception):
    """The peer closed the connection before a PDU was complete."""


#: What the association thread gets from :meth:`GuardedDUL.receive_pdu` once the DUL thread has ended:
#: nothing (pynetdicom's acceptor then stops at once instead of waiting out its ACSE timeout).
_ENDED = object()


class GuardedDUL(DULServiceProvider):
    """pynetdicom's DUL for one SCP connection with bounded PDUs, read deadlines and an idle wait."""

    def __init__(self, assoc: GuardedAssociation, max_pdu_bytes: int, handshake_timeout_s: float) -> None:
        super().__init__(assoc)
        self.max_pdu_bytes = max_pdu_bytes
        self.handshake_timeout_s = handshake_timeout_s
        self._handshaken = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    @property
    def guarded(self) -> GuardedAssociation:
        return self._assoc  # type: ignore[return-value]

    # -- limits and deadlines -------------------------------------------------------------------------
    def limit(self, pdu_type: int) -> int | None:
        """The largest length (bytes after the 6-byte header) accepted for ``pdu_type``; None: unknown."""
        if pdu_type in (0x01, 0x02):
            return MAX_ASSOCIATE_PDU
        if pdu_type == 0x04:
            return self.max_pdu_bytes
        if pdu_type in (0x03, 0x05, 0x06, 0x07):
            return MAX_SMALL_PDU
        return None

    def deadline(self) -> tuple[float, str]:
        """When the PDU being read must be complete (time.monotonic()), and what that deadline is."""
        assoc = self.guarded
        if not assoc.requested:
            timeout = _seconds(assoc.acse_timeout)
            return (
                assoc.accepted_at + timeout,
                f"no complete association request {timeout:g} s after connecting",
            )
        timeout = _seconds(assoc.network_timeout)
        return time.monotonic() + timeout, f"a PDU not complete {timeout:g} s after its first byte"

    def _read_pdu_data(self) -> None:
        """Read one PDU (header, checked length, body) by its deadline and queue its event."""
        wrapper = self.socket
        sock = wrapper.socket if wrapper is not None else None
        if wrapper is None or sock is None:
            self.event_queue.put("Evt17")
            return
        try:
            pdu = self._read(sock)
        except PduLimitExceeded as exc:
            log.warning("DICOM connection from %s aborted: %s", self._peer(), exc)
            self._abort_and_close()
            return
        except LateError as exc:
            log.warning("DICOM connection from %s closed: %s", self._peer(), exc)
            wrapper.close()
            return
        except (Closed, OSError):  # the peer went away (reset, EOF, a TLS error): nothing to answer
            wrapper.close()
            return
        finally:
            self._restore_timeout(sock)
        try:
            decoded, event = self._decode_pdu(pdu)
        except Exception as exc:  # pynetdicom's decoder on a malformed PDU: Evt19 aborts, as pynetdicom does
            log.warning("DICOM connection from %s: undecodable PDU (%s)", self._peer(), type(exc).__name__)
            self.event_queue.put("Evt19")
            return
        if pdu[0] == 0x01:
            self.guarded.requested = True
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _read(self, sock: socket.socket) -> bytearray:
        deadline, what = self.deadline()
        if isinstance(sock, ssl.SSLSocket) and not self._handshaken:
            self._handshake(sock, min(deadline, self.guarded.accepted_at + self.handshake_timeout_s))
        try:
            return self._read_pdu(sock, deadline)
        except LateError:
            raise LateError(what) from None

    def _read_pdu(self, sock: socket.socket, deadline: float) -> bytearray:
        header = _read_exactly(sock, 6, deadline)
        pdu_type, _, length = _HEADER.unpack(header)
        limit = self.limit(pdu_type)
        if limit is None:
            raise PduLimitExceeded(f"unknown PDU type 0x{pdu_type:02X}")
        if length > limit:
            raise PduLimitExceeded(
                f"a PDU of type 0x{pdu_type:02X} announces {length} bytes, more than the {limit} accepted"
            )
        buffer = bytearray(6 + length)
        buffer[:6] = header
        _read_into(sock, memoryview(buffer)[6:], deadline)
        return buffer

    def _handshake(self, sock: ssl.SSLSocket, deadline: float) -> None:
        """The TLS handshake (deferred to this thread by the SCP's context), complete by ``deadline``."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise LateError("the TLS handshake was not complete within its deadline")
        sock.settimeout(min(left, 86400.0))  # CPython bounds the whole handshake call by it
        try:
            sock.do_handshake()
        except TimeoutError:
            raise LateError("the TLS handshake was not complete within its deadline") from None
        self._handshaken = True

    def _restore_timeout(self, sock: socket.socket) -> None:
        """Sends are bounded too: the network timeout (a peer that never reads cannot hold the thread)."""
        try:
            sock.settimeout(self.guarded.network_timeout)
        except OSError:
            pass

    def _abort_and_close(self) -> None:
        """Send an A-ABORT (service provider, invalid PDU parameter value) and close the connection."""
        wrapper = self.socket
        if wrapper is None or wrapper.socket is None:
            return
        pdu = A_ABORT_RQ()
        pdu.source = _ABORT_SOURCE_PROVIDER
        pdu.reason_diagnostic = _ABORT_INVALID_PARAMETER
        try:
            wrapper.socket.settimeout(1.0)
            wrapper.socket.sendall(pdu.encode())
        except OSError:
            pass
        wrapper.close()  # -> Evt17: the state machine ends the association

    def _peer(self) -> str:
        info = self.guarded.requestor.address_info
        return str(info.address) if info is not None else "?"

    # -- idle wait ------------------------------------------------------------------------------------
    def _is_transport_event(self) -> bool:
        if self._handshake_overdue():
            log.warning(
                "DICOM connection from %s closed: the TLS handshake did not start in time", self._peer()
            )
            self._handshaken = True  # once
            if self.socket is not None:
                self.socket.close()
            return True
        if self.event_queue.empty():
            self._await_input(IDLE_WAIT_S)
        return bool(super()._is_transport_event())

    def _handshake_overdue(self) -> bool:
        """A TLS peer that sent nothing by the handshake's deadline (a silent one never makes the socket
        readable, so the read's own deadline would not apply)."""
        wrapper = self.socket
        if self._handshaken or wrapper is None or not isinstance(wrapper.socket, ssl.SSLSocket):
            return False
        return time.monotonic() > self.guarded.accepted_at + self.handshake_timeout_s

    def _await_input(self, timeout: float) -> None:
        """Wait until the socket is readable, something is to be sent or the DUL stops, or ``timeout``."""
        wrapper = self.socket
        sock = wrapper.socket if wrapper is not None else None
        if sock is None:
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        try:
            select.select([sock, self._wake_r], [], [], timeout)
        except (OSError, ValueError):  # closed meanwhile
            return
        try:
            while self._wake_r.recv(64):
                pass
        except OSError:  # drained (BlockingIOError) or closed
            pass

    def wake(self) -> None:
        """Interrupt :meth:`_await_input` (from any thread)."""
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed (the thread has ended)
            pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self.wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.wake()
        return bool(super().stop_dul())

    # -- the association thread's view --------------------------------------------------------------
    def receive_pdu(self, wait: bool = False, timeout: float | None = None) -> Any:
        primitive = super().receive_pdu(wait, timeout)
        if primitive is _ENDED:
            self.to_user_queue.put(primitive)  # type: ignore[arg-type, unused-ignore]  # keep answering "ended" later
            return None
        return primitive

    def peek_next_pdu(self) -> Any:
        primitive = super().peek_next_pdu()
        return None if primitive is _ENDED else primitive

    # -- the thread ------------------------------------------------------------------------------------
    def run_reactor(self) -> None:
        """pynetdicom's reactor; an exception it lets escape (a bug, or a malformed message that got past
        the checks) aborts the association and is logged here, redacted, instead of Python printing the
        thread's traceback to stderr."""
        try:
            super().run_reactor()
        except Exception:
            log.error(
                "the DICOM connection from %s failed and was aborted:\n%s",
                self._peer(),
                redacted_traceback(sys.exc_info(), dicom=True),
            )
            self._abort_and_close()
            self.guarded.is_aborted = True
            self.guarded.is_established = False
            self.guarded._kill = True
        finally:
            self.to_user_queue.put(_ENDED)  # type: ignore[arg-type, unused-ignore]
            self.guarded.wake.set()
            self._wake_w.close()
            self._wake_r.close()


def _seconds(timeout: float | None) -> float:
    """A pynetdicom timeout (None: none) in seconds."""
    return float("inf") if timeout is None else float(timeout)


def _read_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    buffer = bytearray(n)
    _read_into(sock, memoryview(buffer), deadline)
    return bytes(buffer)


def _read_into(sock: socket.socket, view: memoryview, deadline: float) -> None:
    """Fill ``view`` from ``sock`` by ``deadline`` (LateError), or Closed at EOF."""
    done = 0
    while done < len(view):
        left = deadline - time.monotonic()
        if left <= 0:
            raise LateError("a PDU was not complete within its deadline")
        sock.settimeout(min(left, 86400.0))
        try:
            got = sock.recv_into(view[done:], min(len(view) - done, 1 << 20))
        except TimeoutError:
            raise LateError("a PDU was not complete within its deadline") from None
        if got == 0:
            raise Closed()
        done += got
