"""What a result is rendered and built from: a done instance, or a complete series.

The routes render these (JSON, or a document of :mod:`.documents`); the document builders and the outbox
build DICOM objects from them. A document's *scope* says which of the two it is made of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from retinaedge.service.results.completion import SeriesFindings

#: What a document or format is made of: one instance's result, or one complete series' findings.
Scope = Literal["instance", "series"]
SCOPES: tuple[Scope, ...] = ("instance", "series")


class Unavailable(Exception):
    """The document cannot be made for this subject: what it needs is not kept (a source header) or
    there is nothing to report. The message says why (it is shown to clients)."""


@dataclass(frozen=True)
class InstanceView:
    """A done instance: its stored ``/v1/detect`` body, its SR evidence and patient identity (DICOM
    JSON, :mod:`.evidence`; None when not kept)."""

    uid: str
    result: dict[str, Any]
    header_json: str | None
    model_name: str
    model_sha256: str
    identity: str | None = None


@dataclass(frozen=True)
class SeriesView:
    """A complete series: ``status`` is the JSON of its state (``series_instance_uid``, ``state``,
    ``completed_by``, ``instances``; only the JSON rendering reads it); ``found`` its findings, None when
    no instance could be used."""

    uid: str
    status: dict[str, Any]
    found: SeriesFindings | None
    model_name: str
    model_sha256: str
