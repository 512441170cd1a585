"""The DICOM C-STORE SCP of the service (pynetdicom), started and stopped by the app's lifespan.

It listens on ``host:dimse_port`` as ``dimse_ae_title`` and answers C-ECHO and C-STORE for the image
storage classes and transfer syntaxes of :mod:`.contexts`. An association is refused (A-ASSOCIATE-RJ,
permanent, "calling AE title not recognised") when the calling AE is not in ``dimse_allowed_aets`` (with
its host, where one is given; an empty list allows any calling AE, which the settings permit on loopback
only), and by pynetdicom when the called AE title is not ours or ``dimse_max_associations`` are open
(transient, "local limit exceeded"). Each C-STORE is stored durably by :class:`.receive.Receiver` before
its status is sent.

TLS (the DICOM TLS profile: TLS 1.2 or newer, the BCP 195 cipher suites of Python's defaults): with
``tls_cert_file`` and ``tls_key_file`` set, the SCP uses the same certificate as HTTPS and speaks TLS only;
with ``dimse_tls_ca_file`` too, the peer must present a certificate that CA signed.

pynetdicom's own logging is kept to warnings, with its per-message handlers off
(``_config.LOG_HANDLER_LEVEL = "none"``): they would log UIDs of every message. Its remaining records go
through :mod:`retinaedge.runtime.logsafety` as a DICOM library's (cut at the first ``:``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from retinaedge.runtime.errors import ConfigError
from retinaedge.service.dimse.contexts import supported_contexts
from retinaedge.service.dimse.incoming import IncomingInstance
from retinaedge.service.dimse.peers import allowed, parse_peers
from retinaedge.service.dimse.receive import Outcome, Receiver, status_dataset
from retinaedge.service.http.tls import server_context

if TYPE_CHECKING:
    from retinaedge.service.settings import Settings

log = logging.getLogger(__name__)

#: A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognised (PS3.8 9.3.4).
REJECT_CALLING_AET = (0x01, 0x01, 0x03)
#: Rejected permanently by the service user: called AE title not recognised (PS3.8 9.3.4).
REJECT_CALLED_AET = (0x01, 0x01, 0x07)
#: A-ASSOCIATE-RJ: rejected-transient, by the service provider (presentation), local limit exceeded.
REJECT_LIMIT = (0x02, 0x03, 0x02)


class DeferredHandshake(ssl.SSLContext):
    """A server context whose ``wrap_socket`` leaves the handshake to the first read.

    pynetdicom wraps each accepted socket in its one accepting thread; a handshake there would let one
    silent peer hold up every other. Deferred, the handshake runs on the connection's own DUL thread
    before its first PDU is read (:mod:`.reader`), complete within ``request_header_timeout_s`` of the
    connection (and within ``dimse_acse_timeout_s`` if that is sooner); :attr:`timeout_s` bounds any
    read until then.
    """

    timeout_s: float = 30.0

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock.settimeout(self.timeout_s)
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


class DimseServer:
    """The SCP's life cycle and state; ``start(loop)`` in the lifespan, ``stop()`` at its end."""

    def __init__(self, settings: Settings, receiver: Receiver, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.receiver = receiver
        self.peers = parse_peers(settings.dimse_allowed_aets)
        self.problem: str | None = None  # why the SCP is not listening although configured
        self._ae: Any = None
        self._server: Any = None
        self.associations = Counter(
            "retinaedge_dimse_associations",
            "DICOM associations requested, by result (accepted, rejected)",
            ["result"],
            registry=registry,
        )
        self.stores = Counter(
            "retinaedge_dimse_stores",
            "C-STORE requests answered, by status (success, out-of-resources, cannot-understand ...)",
            ["status"],
            registry=registry,
        )
        self.echoes = Counter("retinaedge_dimse_echoes", "C-ECHO requests answered", registry=registry)
        Gauge(
            "retinaedge_dimse_active_associations", "Open DICOM associations", registry=registry
        ).set_function(lambda: float(self.active_associations))
        Gauge(
            "retinaedge_dimse_pending_connections",
            "DICOM connections without an association request yet (they count against the limit)",
            registry=registry,
        ).set_function(lambda: float(self.pending_connections))
        Gauge(
            "retinaedge_dimse_listening",
            "1 while the C-STORE SCP listens (0: off or failed)",
            registry=registry,
        ).set_function(lambda: 1.0 if self.listening else 0.0)

    @property
    def enabled(self) -> bool:
        return self.settings.dimse_port != 0

    @property
    def listening(self) -> bool:
        server = self._server
        return server is not None and server.socket is not None and server.socket.fileno() != -1

    @property
    def active_associations(self) -> int:
        """Open associations (connections that have not sent their request yet are not counted)."""
        connections = getattr(self._server, "connections", None)
        return connections.counts()[0] if connections is not None else 0

    @property
    def pending_connections(self) -> int:
        """Open connections whose association request has not been read yet."""
        connections = getattr(self._server, "connections", None)
        return connections.counts()[1] if connections is not None else 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Listen (non-blocking: pynetdicom's server thread); a failure is logged and kept in
        :attr:`problem` (``/readyz`` answers 503 with it), the HTTP service goes on."""
        if not self.enabled:
            return
        self.receiver.loop = loop
        s = self.settings
        try:
            self._server = self._listen()
        except (OSError, ssl.SSLError, ConfigError) as exc:
            self.problem = f"the DICOM SCP cannot listen on {s.host}:{s.dimse_port}: " + (
                getattr(exc, "strerror", None) or str(exc)
            )
            log.error("%s", self.problem)
            return
        log.info(
            "DICOM SCP %s listening on %s:%d (%s, %s)",
            s.dimse_ae_title,
            s.host,
            s.dimse_port,
            "TLS" if s.tls_cert_file is not None else "no TLS",
            f"{len(self.peers)} allowed calling AE(s)" if self.peers else "any calling AE (loopback)",
        )

    def _listen(self) -> Any:
        from pynetdicom import AE, _config, evt
        from retinaedge.service.dimse.guard import Policy, start_server

        _config.LOG_HANDLER_LEVEL = "none"
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        s = self.settings
        ae = AE(ae_title=s.dimse_ae_title)
        ae.supported_contexts = supported_contexts()
        ae.maximum_pdu_size = s.dimse_max_pdu_bytes
        ae.acse_timeout = s.dimse_acse_timeout_s
        ae.dimse_timeout = s.dimse_dimse_timeout_s
        ae.network_timeout = s.dimse_network_timeout_s
        # The SCP's own title and those bound to models (dimse_ae_titles): checked in _on_requested.
        ae.require_called_aet = not self.receiver.titles
        if self.peers:
            ae.require_calling_aet = sorted({p.ae_title for p in self.peers})
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        policy = Policy(
            s.dimse_max_associations,
            s.dimse_max_pdu_bytes,
            self.receiver.open_instance,
            handshake_timeout_s=s.request_header_timeout_s,
        )
        server = start_server(ae, (s.host, s.dimse_port), policy, self._tls(), handlers)
        self._ae = ae
        return server

    def _tls(self) -> ssl.SSLContext | None:
        ctx = server_context(self.settings, DeferredHandshake)
        if isinstance(ctx, DeferredHandshake):
            ctx.timeout_s = self.settings.dimse_acse_timeout_s
        ca = self.settings.dimse_tls_ca_file
        if ctx is not None and ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            try:
                ctx.load_verify_locations(cafile=str(ca))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"dimse_tls_ca_file {ca} cannot be used: {exc}") from exc
        return ctx

    def stop(self) -> None:
        """Close the port, abort open associations and close every connection (blocking, a few
        seconds at most; run it off the event loop)."""
        ae, self._ae = self._ae, None
        server, self._server = self._server, None
        if server is not None:
            from retinaedge.service.dimse.guard import stop_server

            stop_server(server)
        if ae is not None:
            ae.shutdown()  # what is left (nothing, normally)

    def describe(self) -> dict[str, Any] | None:
        """The SCP for ``/readyz`` (None when ``dimse_port`` is 0)."""
        if not self.enabled:
            return None
        s = self.settings
        return {
            "state": "listening" if self.listening else "failed",
            "ae_title": s.dimse_ae_title,
            "port": s.dimse_port,
            "tls": s.tls_cert_file is not None,
            "mutual_tls": s.tls_cert_file is not None and s.dimse_tls_ca_file is not None,
            "allowed_aets": len(self.peers),
            "active_associations": self.active_associations,
            "pending_connections": self.pending_connections,
            "reason": self.problem,
        }

    @property
    def not_ready_reason(self) -> str | None:
        """Why ``/readyz`` should answer 503 for the SCP, or None."""
        if not self.enabled:
            return None
        if self.problem is not None:
            return self.problem
        if not self.listening:
            return "the DICOM SCP stopped listening"
        return None

    # -- pynetdicom event handlers (on the association's thread) --------------------------------------
    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        called = str(assoc.requestor.primitive.called_ae_title).strip()
        titles = self.receiver.titles
        if titles and called != self.settings.dimse_ae_title.strip() and called not in titles:
            log.warning("association refused: called AE %r is not ours (from %s)", called, address)
            self._refuse(assoc, REJECT_CALLED_AET)
            return
        if not allowed(self.peers, calling, address):
            log.warning(
                "association refused: calling AE %r from %s is not allowed (dimse_allowed_aets)",
                calling,
                address,
            )
            self._refuse(assoc, REJECT_CALLING_AET)
            return
        connections = getattr(self._server, "connections", None)
        if connections is not None and not connections.claim(assoc):
            log.warning(
                "association refused: dimse_max_associations (%d) associations are open (%s from %s)",
                connections.max_associations,
                calling,
                address,
            )
            self._refuse(assoc, REJECT_LIMIT)

    def _refuse(self, assoc: Any, reason: tuple[int, int, int]) -> None:
        self.associations.labels(result="rejected").inc()
        assoc.acse.send_reject(*reason)
        assoc.kill()

    def _on_established(self, event: Any) -> None:
        self.associations.labels(result="accepted").inc()

    def _on_rejected(self, event: Any) -> None:
        primitive = event.assoc.acceptor.primitive
        diagnostic = getattr(primitive, "diagnostic", None)
        why = {
            0x07: "called AE title not ours",
            0x03: "calling AE title not allowed",
            0x02: "too many associations",
        }
        log.warning("association refused: %s", why.get(int(diagnostic or 0), f"diagnostic {diagnostic}"))
        self.associations.labels(result="rejected").inc()

    def _on_echo(self, event: Any) -> int:
        self.echoes.inc()
        return 0x0000

    def _on_store(self, event: Any) -> Any:
        req = event.request
        cls, inst = str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID)
        incoming = getattr(req, "_dataset_file", None)
        called = str(event.assoc.requestor.primitive.called_ae_title).strip()  # which models run it
        if isinstance(incoming, IncomingInstance):  # streamed to the spool as it arrived (.stream)
            outcome = self.receiver.receive_instance(cls, inst, incoming, called)
        else:
            try:
                data = event.encoded_dataset(include_meta=True)
            except Exception:  # File Meta from request UIDs pynetdicom cannot encode
                outcome = Outcome(0xC000, "the request's UIDs cannot form a File Meta Information group")
            else:
                outcome = self.receiver.receive(cls, inst, data, called)
        self.stores.labels(status=outcome.name).inc()
        if outcome.comment:
            log.info(
                "C-STORE refused (%04X %s): %s", outcome.status, outcome.name, outcome.comment.split(":")[0]
            )
        return status_dataset(outcome)
