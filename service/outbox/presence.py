"""Ask a destination whether it already holds a document, before sending it again.

An attempt that got no answer (the peer was slower than ``timeout_s``, or the connection broke after
sending) may have stored the document all the same: a slow PACS answers after the sender gave up. Sending
again would store it again, and giving up after ``export_max_attempts`` such attempts would dead-letter a
document the PACS holds. So before the next attempt the dispatcher asks, where the protocol allows:

- DIMSE: a C-FIND in the Study Root Query/Retrieve Information Model at the IMAGE level for each SOP
  Instance UID, with its study and series (PS3.4 C.6.2). A peer that accepts no such context, or refuses
  the association, cannot be asked;
- STOW-RS: a QIDO-RS search of the instance, ``GET {url}/studies/{study}/series/{series}/instances?
  SOPInstanceUID={uid}`` (PS3.18 10.6), with the destination's credentials and CA: 204 or an empty
  array is "not held". An origin that answers with an HTTP error (no QIDO-RS there) cannot be asked.

:func:`holds` answers True when every instance is found, False when one is not, and None when the peer
cannot be asked (the caller then sends again, as before). It never raises for the peer's or the network's
failures, and logs no UID.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from retinaedge.service.outbox.destinations import Destination, DimseDestination, StowRsDestination
from retinaedge.service.outbox.senders import Instance, basic_or_bearer, client_tls

log = logging.getLogger(__name__)

#: Study Root Query/Retrieve Information Model - FIND (PS3.4 C.6.2.1).
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
#: C-FIND statuses meaning a match follows (Pending, and Pending with optional keys unsupported).
PENDING = frozenset({0xFF00, 0xFF01})


#: The destination types that can be asked.
ASKABLE: tuple[type[Destination], ...] = (DimseDestination, StowRsDestination)


@dataclass(frozen=True)
class Subject:
    """What a search needs of one instance: its study, series and SOP Instance UIDs (from its file)."""

    study: str
    series: str
    sop: str


def _subjects(instances: Sequence[Instance]) -> list[Subject] | None:
    """The UIDs of each instance, read from its header; None when a file cannot be read."""
    import pydicom

    out = []
    for instance in instances:
        try:
            ds = pydicom.dcmread(
                instance.path,
                stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
            )
            out.append(Subject(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)))
        except (OSError, AttributeError, ValueError, pydicom.errors.InvalidDicomError):
            return None
    return out


def holds(dest: Destination, instances: Sequence[Instance], timeout_s: float) -> bool | None:
    """Whether ``dest`` holds every one of ``instances`` (module docstring); None: it cannot be asked."""
    subjects = _subjects(instances)
    if not subjects:
        return None
    if isinstance(dest, DimseDestination):
        return _dimse_holds(dest, subjects, timeout_s)
    return _qido_holds(dest, subjects, timeout_s)


def _dimse_holds(dest: DimseDestination, subjects: Sequence[Subject], timeout_s: float) -> bool | None:
    from pydicom.dataset import Dataset
    from pynetdicom import AE

    ae = AE(ae_title=dest.calling_ae_title)
    ae.add_requested_context(STUDY_ROOT_FIND)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    try:
        tls_args = client_tls(dest)
    except (OSError, ssl.SSLError):
        return None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return None
    try:
        if not assoc.accepted_contexts:
            return None
        for subject in subjects:
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = subject.study
            query.SeriesInstanceUID = subject.series
            query.SOPInstanceUID = subject.sop
            found, answered = False, False
            for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
                code = getattr(status, "Status", None)
                if code is None:  # no answer, or the association went away
                    return None
                answered = True
                if code in PENDING and identifier is not None:
                    found = found or str(getattr(identifier, "SOPInstanceUID", "")) == subject.sop
                elif code != 0x0000:  # a failure or a cancel: the peer did not search
                    return None
            if not answered:
                return None
            if not found:
                return False
        return True
    finally:
        if assoc.is_established:
            assoc.release()


def _qido_holds(dest: StowRsDestination, subjects: Sequence[Subject], timeout_s: float) -> bool | None:
    try:
        headers = {"Accept": "application/dicom+json", **basic_or_bearer(dest)}
    except ValueError:  # the secret cannot be read now
        return None
    context = None
    if dest.url.startswith("https://"):
        context = ssl.create_default_context(cafile=str(dest.ca_file) if dest.ca_file else None)
    for subject in subjects:
        path = "/".join(
            ["studies", urllib.parse.quote(subject.study), "series", urllib.parse.quote(subject.series)]
        )
        query = urllib.parse.urlencode({"SOPInstanceUID": subject.sop})
        request = urllib.request.Request(f"{dest.url}/{path}/instances?{query}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError:  # no QIDO-RS here, or it failed: this origin cannot be asked
            return None
        except (OSError, ValueError):
            return None
        if status == 204 or not payload:
            return False
        try:
            matches = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(matches, list):
            return None
        sops = {(m.get("00080018", {}).get("Value") or [None])[0] for m in matches if isinstance(m, dict)}
        if subject.sop not in sops:
            return False
    return True
