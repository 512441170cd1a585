"""Spool files the database has no row for: instances to recover from their own bytes, never deleted
silently.

The database can be lost while the spool is not (emptied, truncated or replaced by garbage while the
service was stopped, then moved aside and rebuilt: :mod:`retinaedge.service.database`). A ``*.dcm`` in
the spool is complete (written to ``*.part``, fsynced and renamed), so its header gives everything its
``pending`` row held: the UIDs, the SR evidence and the patient identity. :func:`adopt_orphans` reads each
such file as intake does (:func:`.ingest.inspect`, nothing decoded) and records it again:

- ``recovered``: a new pending row (processed like any other; a file renamed just before a crash, never
  acknowledged, is processed too: a result nobody waits for is harmless, a lost instance is not);
- ``known``: its SOP Instance UID has a row already (a file left behind after its outcome was
  recorded): removed, with a log line;
- ``quarantined``: the header cannot be read: moved to ``spool/quarantine/`` with a log line saying why.

Anything in the spool that is not a regular file (a directory called ``*.dcm``) is left alone with a
warning. Log lines carry no UID or other DICOM value.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from retinaedge.runtime.dicomio import Limits
from retinaedge.runtime.errors import DicomInputError, RequestError
from retinaedge.service.intake.ingest import Header, Route, inspect_routed
from retinaedge.service.intake.spool import Spool
from retinaedge.service.results.evidence import IdentityFiles
from retinaedge.service.results.store import Store

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"


def adopt_orphans(
    paths: Iterable[Path],
    *,
    spool: Spool,
    store: Store,
    limits: Limits,
    identities: IdentityFiles | None,
    route: Route | None = None,
) -> Counter[str]:
    """Recover, drop or quarantine each spool file in ``paths`` (files no row names); returns how many
    went each way (``recovered``, ``known``, ``quarantined``). Storage errors are raised (the caller
    retries the start)."""
    outcomes: Counter[str] = Counter()
    for path in paths:
        outcomes[
            adopt(path, spool=spool, store=store, limits=limits, identities=identities, route=route)
        ] += 1
    if outcomes["recovered"]:
        log.warning(
            "%d spool file(s) had no database row (the database was lost or rebuilt): recovered from "
            "their own bytes as pending instances",
            outcomes["recovered"],
        )
    if outcomes["known"]:
        log.info("%d spool file(s) of instances already recorded were removed", outcomes["known"])
    return outcomes


def adopt(
    path: Path,
    *,
    spool: Spool,
    store: Store,
    limits: Limits,
    identities: IdentityFiles | None,
    route: Route | None = None,
) -> str:
    """One spool file without a row -> ``recovered``, ``known`` or ``quarantined`` (module docstring);
    ``route`` gives it to the models that take it (:func:`..intake.ingest.store_spooled`)."""
    try:
        found, routing = inspect_routed(path, limits, route)
        header = Header(*found)
    except (DicomInputError, RequestError) as exc:
        quarantine(spool, path, f"{exc.type}: {exc}")
        return "quarantined"
    if store.instance_rows(header.sop_instance):  # recorded (its file outlived its rows): not routed again,
        spool.discard(path)  # so no model the instance was not sent to takes it now
        return "known"
    size = path.stat().st_size
    add = (
        header.sop_instance,
        header.sop_class,
        header.study,
        header.series,
        path.name,
        size,
        header.evidence,
    )
    accepted, declined = routing if routing is not None else ([store.model], {})
    if identities is None:
        inserted = store.add_instance(*add, accepted=accepted, declined=declined)
    else:
        with identities.lock:
            identities.put(header.sop_instance, header.identity, replace=False)
            inserted = store.add_instance(*add, accepted=accepted, declined=declined)
    if inserted:
        return "recovered"
    spool.discard(path)
    return "known"


def quarantine(spool: Spool, path: Path, why: str) -> Path:
    """Move ``path`` to ``<spool>/quarantine/`` and say so (the file is kept for a person to look at)."""
    target_dir = spool.root / QUARANTINE
    target_dir.mkdir(exist_ok=True)
    target = target_dir / path.name
    os.replace(path, target)
    log.warning("spool file %s cannot be read as an instance (%s): moved to %s", path.name, why, target)
    return target
