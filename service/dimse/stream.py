"""The SCP's DIMSE provider: C-STORE data sets streamed to the spool, other messages bounded, malformed
ones answered with an A-ABORT and one log line, and an association thread that sleeps while idle.

pynetdicom's :class:`~pynetdicom.dimse.DIMSEServiceProvider` decodes the P-DATA of each association on its
DUL thread. :class:`StreamingDIMSE` hands it one presentation data value (PDV) at a time, so that it
sees the moment a C-STORE-RQ's command set is complete: it then attaches an
:class:`~.incoming.IncomingInstance` as the message's data set file, and pynetdicom writes every data
fragment into it (its own chunked-receive path, pointed at the spool instead of a temporary file).

Limits (bytes): a command set at most :data:`MAX_COMMAND`, the data set of any other message at most
:data:`MAX_OTHER_DATASET` (the SCP serves C-ECHO and C-STORE only). A message beyond them, or one
pynetdicom cannot decode (a malformed command set, an unknown command, a presentation context that was
not accepted), aborts the association with a warning that names the peer's address and the error's type,
never a value or a traceback.

The association thread's reactor polls for messages every millisecond in pynetdicom; here its poll
(:meth:`StreamingDIMSE.get_msg`) waits on the association's event, which every message, every primitive
from the DUL and the DUL's end set, for at most :data:`~.reader.IDLE_WAIT_S`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.pdu_primitives import P_DATA
from retinaedge.service.dimse.incoming import IncomingInstance
from retinaedge.service.dimse.reader import IDLE_WAIT_S

if TYPE_CHECKING:
    from retinaedge.service.dimse.guard import GuardedAssociation

log = logging.getLogger(__name__)

#: The largest command set accepted (bytes; a C-STORE-RQ's is about 200).
MAX_COMMAND = 64 * 1024
#: The largest data set of a message other than a C-STORE-RQ (bytes).
MAX_OTHER_DATASET = 64 * 1024
#: CommandDataSetType (0000,0800) value meaning "no data set".
NO_DATASET = 0x0101


class MalformedMessage(Exception):
    """A DIMSE message the SCP does not accept (the association is aborted)."""


class NotifyingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that sets ``event`` on every put (wakes the association thread)."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__()
        self.event = event

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.event.set()


class StreamingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider for one SCP association (see the module docstring)."""

    def __init__(
        self, assoc: GuardedAssociation, open_instance: Callable[[str, str, str], IncomingInstance]
    ) -> None:
        super().__init__(assoc)
        self.guarded = assoc
        self.open_instance = open_instance
        self.msg_queue = NotifyingQueue(assoc.wake)
        assoc.dul.to_user_queue = NotifyingQueue(assoc.wake)

    # -- the association thread -----------------------------------------------------------------------
    def get_msg(self, block: bool = False) -> Any:
        """pynetdicom's, but a non-blocking call on an idle association waits for the association's
        event (at most :data:`~.reader.IDLE_WAIT_S`) first."""
        assoc = self.guarded
        if not block and self.msg_queue.empty() and assoc.dul.to_user_queue.empty() and not assoc._kill:
            if assoc.dul.is_alive():
                assoc.wake.wait(IDLE_WAIT_S)
            assoc.wake.clear()  # then every queue is looked at again by the caller's loop
        return super().get_msg(block)

    # -- the DUL thread -------------------------------------------------------------------------------
    def receive_primitive(self, primitive: Any) -> None:
        """Decode ``primitive``'s PDVs one at a time, checking the limits and attaching the spool file."""
        try:
            for context_id, data in list(primitive.presentation_data_value_list):
                self._check(data)
                one = P_DATA()
                one.presentation_data_value_list = [[context_id, data]]  # type: ignore[list-item]
                super().receive_primitive(one)
                self._attach()
        except Exception as exc:
            self._malformed(exc)

    def _check(self, data: bytes) -> None:
        if not data:
            raise MalformedMessage("an empty presentation data value")
        message = self.message
        if data[0] & 1:  # a command fragment
            held = message.encoded_command_set.tell() if message is not None else 0
            if held + len(data) > MAX_COMMAND:
                raise MalformedMessage(f"a command set above {MAX_COMMAND} bytes")
        elif message is None or message._data_set_file is None:
            held = message.data_set.tell() if message is not None and message.data_set is not None else 0
            if held + len(data) > MAX_OTHER_DATASET:
                raise MalformedMessage(f"a data set above {MAX_OTHER_DATASET} bytes outside a C-STORE")

    def _attach(self) -> None:
        """Once a C-STORE-RQ's command set is decoded: its data set goes to an IncomingInstance."""
        message = self.message
        if not isinstance(message, C_STORE_RQ) or message._data_set_file is not None:
            return
        command = message.command_set
        if command.CommandDataSetType == NO_DATASET:
            return
        context = self.guarded._accepted_cx.get(int(message.context_id or 0))
        if context is None:
            raise MalformedMessage("a C-STORE on a presentation context that was not accepted")
        incoming = self.open_instance(
            str(command.AffectedSOPClassUID or ""),
            str(command.AffectedSOPInstanceUID or ""),
            str(context.transfer_syntax[0]),
        )
        message._data_set_file = incoming  # type: ignore[assignment]
        message._data_set_path = incoming.path

    def _malformed(self, exc: Exception) -> None:
        address = self.guarded.requestor.address_info
        log.warning(
            "DICOM association with %s aborted: malformed DIMSE message (%s)",
            address.address if address is not None else "?",
            str(exc) if isinstance(exc, MalformedMessage) else type(exc).__name__,
        )
        self.discard_partial()
        self.message = None
        self.dul.event_queue.put("Evt19")  # pynetdicom's "invalid PDU": A-ABORT, then the connection closes

    def discard_partial(self) -> None:
        """Remove the spool parts no handler will take: the data set being received and those of
        complete messages still queued (the association ended before it served them)."""
        pending: list[Any] = [self.message]
        while True:
            try:
                pending.append(self.msg_queue.get_nowait()[1])
            except queue.Empty:
                break
        for item in pending:
            incoming = getattr(item, "_data_set_file", None) or getattr(item, "_dataset_file", None)
            if isinstance(incoming, IncomingInstance):
                incoming.close()
