"""What a result is rendered and built from: a done instance, a complete series, or a study so far.

The routes render these (JSON, or a document of :mod:`.documents`); the document builders and the outbox
build DICOM objects from them. A document's *scope* says which of the three it is made of.

Documents show *findings*, not every detection (:mod:`.selection` holds that rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from retinaedge.service.results.completion import SeriesFindings
from retinaedge.service.results.rows import subject_key

if TYPE_CHECKING:
    from retinaedge.runtime.manifest import Manifest
    from retinaedge.service.results.key_images import StudyImages

#: What a document or format is made of: one instance's result, one complete series' findings, or the
#: images with findings of one study so far.
Scope = Literal["instance", "series", "study"]
SCOPES: tuple[Scope, ...] = ("instance", "series", "study")


class Unavailable(Exception):
    """The document cannot be made for this subject: what it needs is not kept (a source header) or
    there is nothing to report. The message says why (it is shown to clients)."""


class NothingToReport(Unavailable):
    """The subject has nothing this document shows (no findings): not a failure. A route answers it as
    any :class:`Unavailable` (404); the outbox drops the document instead of dead-lettering it."""


@dataclass(frozen=True)
class InstanceView:
    """A done instance: its stored ``/v1/detect`` body, its SR evidence and patient identity (DICOM
    JSON, :mod:`.evidence`; None when not kept). ``version``: the digest of those three
    (:func:`.built.result_version`) under which its built documents are kept on disk; empty: build
    without keeping (a view made outside the service)."""

    uid: str
    result: dict[str, Any]
    header_json: str | None
    model_name: str
    model_sha256: str
    identity: str | None = None
    manifest: Manifest | None = None
    version: str = ""

    @property
    def key(self) -> str:
        """What its documents are kept under (:func:`.store.subject_key`: the model and the subject)."""
        return subject_key(self.model_name, self.uid)


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
    manifest: Manifest | None = None
    version: str = ""  # of its documents on disk (:func:`.built.rows_version`); empty: not kept

    @property
    def key(self) -> str:
        """What its documents are kept under (:func:`.store.subject_key`: the model and the subject)."""
        return subject_key(self.model_name, self.uid)


@dataclass(frozen=True)
class StudyView:
    """A study as far as it has been received: ``images`` its done instances with findings and their
    kept headers (:mod:`.studies`)."""

    uid: str
    images: StudyImages
    model_name: str
    model_sha256: str
    manifest: Manifest | None = None
    version: str = ""  # of its documents on disk (:func:`.built.rows_version`); empty: not kept

    @property
    def key(self) -> str:
        """What its documents are kept under (:func:`.store.subject_key`: the model and the subject)."""
        return subject_key(self.model_name, self.uid)
