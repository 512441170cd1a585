"""pynetdicom's acceptor with every connection counted from its first byte, for a DICOM listener that
strangers cannot exhaust.

pynetdicom counts an association against ``maximum_associations`` only once its A-ASSOCIATE-RQ has been
read, so connections that never complete one are not limited at all. Here :class:`GuardedServer` counts
each connection from its acceptance (:class:`Connections`): at most ``dimse_max_associations``
associations, and at most ``dimse_max_associations + 1`` connections in all (the one beyond lets a peer be
told "local limit exceeded" by an A-ASSOCIATE-RJ). When a new connection would exceed that, the oldest
connection that has not yet completed its association request is closed to make room (logged): a peer
that completes its request at once, as every real one does, always gets in, and strangers holding
connections open only evict each other. With every slot held by associations, a new connection is closed
at once.

Each connection's threads are pynetdicom's, with three providers replaced for the SCP only (the export's
SCU uses pynetdicom unchanged): :class:`GuardedAssociation` (the association thread, which waits on an
event instead of polling every millisecond), :class:`~.reader.GuardedDUL` (bounded PDUs, read deadlines)
and :class:`~.stream.StreamingDIMSE` (C-STORE data sets written to the spool as they arrive). These
subclass pynetdicom internals: the version is pinned exactly (:data:`PYNETDICOM_VERSION`) and checked at
start (:func:`check_pynetdicom`).
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.logsafety import redacted_traceback
from retinaedge.service.dimse.incoming import IncomingInstance
from retinaedge.service.dimse.reader import GuardedDUL
from retinaedge.service.dimse.stream import StreamingDIMSE

log = logging.getLogger(__name__)

#: The pynetdicom release these hooks are written against (pyproject.toml pins it).
PYNETDICOM_VERSION = "3.0.4"

#: ``(sop_class, sop_instance, transfer_syntax) -> IncomingInstance``: where a C-STORE's data set goes.
OpenInstance = Callable[[str, str, str], IncomingInstance]


def check_pynetdicom() -> None:
    """ConfigError unless the installed pynetdicom is :data:`PYNETDICOM_VERSION`."""
    import pynetdicom

    if pynetdicom.__version__ != PYNETDICOM_VERSION:
        raise ConfigError(
            f"pynetdicom {pynetdicom.__version__} is installed; the DICOM SCP's hooks need exactly "
            f"{PYNETDICOM_VERSION} (pip install 'pynetdicom=={PYNETDICOM_VERSION}')"
        )


@dataclass(frozen=True)
class Policy:
    """The limits of :class:`GuardedServer` (times in seconds, sizes in bytes)."""

    max_associations: int
    max_pdu_bytes: int
    open_instance: OpenInstance
    handshake_timeout_s: float = 10.0


class Connections:
    """The SCP's open connections, oldest first, each pending (no association request yet) or
    associated (counted against the limit). Thread-safe."""

    def __init__(self, max_associations: int) -> None:
        self.max_associations = max_associations
        self._lock = threading.Lock()
        self._open: list[GuardedAssociation] = []

    @property
    def capacity(self) -> int:
        """Connections at most: the associations and one more (to be rejected, or to evict)."""
        return self.max_associations + 1

    def add(self, assoc: GuardedAssociation) -> None:
        with self._lock:
            self._open.append(assoc)

    def remove(self, assoc: GuardedAssociation) -> None:
        with self._lock:
            if assoc in self._open:
                self._open.remove(assoc)

    def make_room(self) -> tuple[bool, list[GuardedAssociation]]:
        """Before accepting one more connection: (whether it may be accepted, the pending connections
        to close for it, oldest first). Those returned no longer count."""
        with self._lock:
            live = [a for a in self._open if not a.evicted]
            excess = len(live) + 1 - self.capacity
            if excess <= 0:
                return True, []
            # those still in their request first (oldest first), then any whose request is being decided
            pending = [a for a in live if not a.claimed and not a.requested]
            pending += [a for a in live if not a.claimed and a.requested]
            victims = pending[:excess]
            for a in victims:
                a.evicted = True
            return len(victims) == excess, victims

    def claim(self, assoc: GuardedAssociation) -> bool:
        """At the association request: count ``assoc`` as an association, or False when
        ``max_associations`` are counted already."""
        with self._lock:
            if sum(1 for a in self._open if a.claimed and a is not assoc) >= self.max_associations:
                return False
            assoc.claimed = True
            return True

    def snapshot(self) -> list[GuardedAssociation]:
        with self._lock:
            return list(self._open)

    def counts(self) -> tuple[int, int]:
        """(associations, connections without an association yet)."""
        with self._lock:
            associated = sum(1 for a in self._open if a.claimed)
            return associated, sum(1 for a in self._open if not a.evicted) - associated


class GuardedAssociation(Association):
    """pynetdicom's acceptor association with the guarded providers; it leaves :class:`Connections`
    when its thread ends."""

    def __init__(self, server: GuardedServer) -> None:
        super().__init__(server.ae, MODE_ACCEPTOR)
        self.connections = server.connections
        self.accepted_at = time.monotonic()
        self.requested = False  # its A-ASSOCIATE-RQ has been read
        self.claimed = False  # counted as an association (Connections.claim)
        self.evicted = False  # closed to make room for a newer connection
        self.wake = threading.Event()  # set when there is something for the association thread
        self.dul = GuardedDUL(self, server.policy.max_pdu_bytes, server.policy.handshake_timeout_s)
        self.dimse = StreamingDIMSE(self, server.policy.open_instance)
        self.acse_timeout = server.ae.acse_timeout  # the setters configure the (new) DUL's timers
        self.network_timeout = server.ae.network_timeout

    def evict(self) -> None:
        """Close the connection from another thread (its threads then end by themselves)."""
        sock = self.dul.socket.socket if self.dul.socket is not None else None
        if sock is None:
            return
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: safe beside a TLS read
        except OSError:
            pass

    def kill(self) -> None:
        self.wake.set()
        super().kill()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        except Exception:
            log.error("a DICOM association failed:\n%s", redacted_traceback(sys.exc_info(), dicom=True))
            self.evict()
        finally:
            cast(StreamingDIMSE, self.dimse).discard_partial()
            self.connections.remove(self)


class GuardedHandler(RequestHandler):
    """Creates a :class:`GuardedAssociation` for each accepted connection (in the accepting thread: no
    I/O happens here; the TLS handshake is deferred to the connection's first read)."""

    server: GuardedServer

    def _create_association(self) -> Association:
        server = self.server
        assoc = GuardedAssociation(server)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))
        acceptor = assoc.acceptor
        acceptor.maximum_length = self.ae.maximum_pdu_size
        acceptor.ae_title = server.ae_title
        acceptor.address_info = self.local
        acceptor.implementation_class_uid = self.ae.implementation_class_uid
        acceptor.implementation_version_name = self.ae.implementation_version_name
        # pynetdicom deep-copies them (5 ms per connection); negotiation only reads them
        acceptor.supported_contexts = list(server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention:
                if handlers:
                    assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in cast(list[tuple[Callable[..., Any], Any]], handlers):
                    assoc.bind(event, handler, args)
        return assoc

    def handle(self) -> None:
        """Count the connection, then start its association thread (uncounted again if it cannot)."""
        assoc = cast(GuardedAssociation, self._create_association())
        self.server.connections.add(assoc)
        try:
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
        except BaseException:
            self.server.connections.remove(assoc)
            raise


class GuardedServer(AssociationServer):
    """The listening socket: each accepted connection is counted and gets a :class:`GuardedAssociation`
    (see the module docstring). ``policy`` and ``connections`` are set by :func:`start_server`."""

    policy: Policy
    connections: Connections
    #: The listen backlog: a burst of connections is accepted (and counted) instead of waiting in SYN
    #: retries while the accepting thread catches up.
    request_queue_size = 64

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        client.settimeout(self.ae.acse_timeout)  # until the reader sets each read's deadline
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        ok, victims = self.connections.make_room()
        for victim in victims:
            log.warning(
                "closed a DICOM connection from %s without an association request after %.1f s: "
                "%d connections are open (dimse_max_associations + 1)",
                victim.requestor.address_info.address if victim.requestor.address_info else "?",
                time.monotonic() - victim.accepted_at,
                self.connections.capacity,
            )
            victim.evict()
        if not ok:
            log.warning(
                "refused a DICOM connection from %s: dimse_max_associations (%d) associations are open",
                client_address[0],
                self.connections.max_associations,
            )
            self.shutdown_request(request)
            return
        self.finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.error(
            "a DICOM connection from %s could not be set up:\n%s",
            client_address[0] if client_address else "?",
            redacted_traceback(sys.exc_info(), dicom=True),
        )


def start_server(
    ae: Any, address: tuple[str, int], policy: Policy, ssl_context: Any, handlers: list[Any]
) -> GuardedServer:
    """Listen on ``address`` with :class:`GuardedServer` (its accepting thread runs until ``ae.shutdown()``).

    pynetdicom's own association limit is lifted: :class:`Connections` enforces ``max_associations``.
    """
    check_pynetdicom()
    ae.maximum_associations = 1 << 20
    server = cast(
        GuardedServer,
        ae.make_server(
            address,
            ssl_context=ssl_context,
            evt_handlers=handlers,
            server_class=GuardedServer,
            request_handler=GuardedHandler,
        ),
    )
    server.policy = policy
    server.connections = Connections(policy.max_associations)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.5},
        name="retinaedge-dimse-accept",
        daemon=True,
    )
    thread.start()
    ae._servers.append(server)
    return server


def stop_server(server: GuardedServer, grace_s: float = 1.0, timeout_s: float = 5.0) -> None:
    """Stop accepting, send each association an A-ABORT, and after ``grace_s`` close every connection
    that is still open (a peer that never answers, a connection still in its request), waiting at most
    ``timeout_s`` for their threads. pynetdicom's ``ae.shutdown()`` would wait for each aborted peer to
    close (up to the ACSE timeout each) and for each stalled request's read."""
    server.shutdown()  # the accepting thread ends; the server leaves ae._servers
    connections = server.connections
    for assoc in connections.snapshot():
        if assoc.is_established:
            assoc.abort(block=False)  # queued to its DUL thread, which sends it
        else:
            assoc.evict()
    deadline = time.monotonic() + grace_s
    while connections.snapshot() and time.monotonic() < deadline:
        time.sleep(0.02)
    for assoc in connections.snapshot():
        assoc.evict()
    deadline = time.monotonic() + timeout_s
    while connections.snapshot() and time.monotonic() < deadline:
        time.sleep(0.02)
    if connections.snapshot():
        log.warning("%d DICOM connection(s) still closing at shutdown", len(connections.snapshot()))
