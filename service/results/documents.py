"""Result documents: every DICOM object the service makes of a result, in one registry.

A *document* is one kind of object built from a finished result, named by its ``kind``:

- ``sr``: the instance's TID 1500 Measurement Report (Comprehensive 3D SR, :func:`.sr.instance_sr`);
- ``series-sr``: the complete series' 3D findings as a TID 1500 SR (:func:`.sr.series_sr`);
- ``gsps``: the instance's findings drawn over its image, a Grayscale Softcopy Presentation State
  (:func:`.gsps.instance_gsps`);
- ``kos``: the study's images with findings so far, a Key Object Selection (:func:`.kos.study_kos`);
- ``sc``: a DICOM Secondary Capture per frame with findings, the frame with its boxes and labels burned
  in (:mod:`.sc`, :mod:`.captures`): a *stored* document (below).

Each :class:`Document` says what it is built from (``scope``: ``instance`` for ``GET
/v1/results/{uid}``, ``series`` for ``GET /v1/series/{uid}``, ``study`` for ``GET /v1/studies/{uid}``),
its media type, whether it is the one
served for that media type through ``Accept`` (``default``: at most one per scope and media type, so a
second ``application/dicom`` document is served by ``?document=KIND`` and does not replace the SR), and
whether result delivery may send it (``deliverable``: a destination's ``documents`` names such kinds,
:mod:`..outbox.destinations`; the outbox stores the kind of each document it delivers).

Adding a document (a GSPS, a Secondary Capture, a Key Object Selection: ``gsps``, ``sc``, ``kos``) is one
entry in :data:`DOCUMENTS` plus its builder module; the routes, the Accept negotiation
(:mod:`.formats`), the destination settings and the outbox's tables take it from here.

A builder turns a view (:class:`.views.InstanceView`, :class:`.views.SeriesView` or
:class:`.views.StudyView`, as its scope says) into a pydicom Dataset; it runs in a worker thread and
raises :class:`.views.Unavailable` when the subject lacks what it needs, :class:`.views.NothingToReport`
(a kind of it) when the subject has nothing the document shows (no findings: a route answers 404, the
outbox drops the document). Any other exception means the document cannot be represented (e.g. a SOP
class highdicom cannot reference).

A *stored* document (``stored`` instead of ``build``; instance scope, asked for by kind only) needs the
frames' pixels, so it cannot be built from a view later: its files are made once, when the result is
recorded, and kept under the data directory. ``stored(view, data_dir)`` finds them: part number -> file
(for ``sc`` the frame number, from 1). A route serves one part (``?document=sc&frame=N``; the only one
without ``frame``); result delivery sends all of them as one job. It raises
:class:`.views.NothingToReport` and :class:`.views.Unavailable` as a builder does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinaedge.service.results.captures import sc_files
from retinaedge.service.results.gsps import instance_gsps
from retinaedge.service.results.kos import study_kos
from retinaedge.service.results.sr import instance_sr, series_sr
from retinaedge.service.results.views import InstanceView, Scope, SeriesView, StudyView

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DICOM = "application/dicom"
#: A document kind: lower-case letters and digits, words joined by ``-`` (it appears in URLs, settings
#: and the database).
KIND = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class Document:
    """One kind of result document (module docstring).

    ``build`` takes an :class:`InstanceView` when ``scope`` is ``instance``, a :class:`SeriesView` when
    it is ``series``, a :class:`StudyView` when it is ``study`` (use :meth:`build_instance` /
    :meth:`build_series` / :meth:`build_study`, which check it). A stored document has ``build`` None
    and ``stored`` instead (:meth:`parts`).
    """

    kind: str
    scope: Scope
    media_type: str
    build: Callable[[Any], Dataset] | None
    title: str  # what it is, for people: "DICOM SR" ("no DICOM SR can be built ...")
    description: str = ""
    default: bool = False
    deliverable: bool = False
    stored: Callable[[InstanceView, Path], dict[int, Path]] | None = None

    def __post_init__(self) -> None:
        if (self.build is None) == (self.stored is None):
            raise ValueError(f"document {self.kind!r}: give build or stored, one of them")
        if self.stored is not None and (self.scope != "instance" or self.default):
            raise ValueError(f"stored document {self.kind!r}: of an instance, asked for by kind only")

    def parts(self, view: InstanceView, data_dir: Path) -> dict[int, Path]:
        """A stored document's files by part number (module docstring)."""
        if self.stored is None:
            raise ValueError(f"{self.kind} is built, not stored")
        return self.stored(view, data_dir)

    def _built(self, scope: Scope, view: Any) -> Dataset:
        if self.scope != scope:
            raise ValueError(f"{self.kind} is built from a {self.scope}, not {_A[scope]}")
        if self.build is None:
            raise ValueError(f"{self.kind} is stored, not built")
        return self.build(view)

    def build_instance(self, view: InstanceView) -> Dataset:
        return self._built("instance", view)

    def build_series(self, view: SeriesView) -> Dataset:
        return self._built("series", view)

    def build_study(self, view: StudyView) -> Dataset:
        return self._built("study", view)


_A: dict[Scope, str] = {"instance": "an instance", "series": "a series", "study": "a study"}


class DocumentRegistry:
    """Documents by kind, in the order registered (that order is the order media types are offered)."""

    def __init__(self, documents: Iterable[Document] = ()) -> None:
        self._documents: dict[str, Document] = {}
        for doc in documents:
            self.register(doc)

    def register(self, doc: Document) -> None:
        """Add ``doc``; a kind registered twice, a malformed kind or a second default for the same scope
        and media type is a ``ValueError`` (a programming error, found at import)."""
        if not KIND.match(doc.kind):
            raise ValueError(f"a document kind is lower-case words joined by '-': {doc.kind!r}")
        if doc.kind in self._documents:
            raise ValueError(f"document {doc.kind!r} is registered twice")
        if doc.default and self.default(doc.scope, doc.media_type) is not None:
            raise ValueError(f"two default {doc.media_type} documents of a {doc.scope}")
        self._documents[doc.kind] = doc

    def __iter__(self) -> Iterator[Document]:
        return iter(list(self._documents.values()))

    def __contains__(self, kind: object) -> bool:
        return kind in self._documents

    def get(self, kind: str) -> Document | None:
        return self._documents.get(kind)

    def kinds(self, scope: Scope | None = None) -> list[str]:
        """Every kind, or those of one scope."""
        return [d.kind for d in self._documents.values() if scope is None or d.scope == scope]

    def deliverable(self) -> list[str]:
        """The kinds result delivery may send (what a destination's ``documents`` may list)."""
        return [d.kind for d in self._documents.values() if d.deliverable]

    def default(self, scope: Scope, media_type: str) -> Document | None:
        """The document served for ``media_type`` through ``Accept`` on a ``scope`` resource, if any."""
        media_type = media_type.lower()
        for d in self._documents.values():
            if d.default and d.scope == scope and d.media_type.lower() == media_type:
                return d
        return None

    def default_media_types(self) -> list[str]:
        """The media types that have a default document (of either scope), in registration order."""
        return list(dict.fromkeys(d.media_type for d in self._documents.values() if d.default))


#: The service's result documents. A new kind: one entry here, plus its builder module.
DOCUMENTS = DocumentRegistry(
    [
        Document(
            kind="sr",
            scope="instance",
            media_type=DICOM,
            build=instance_sr,
            title="DICOM SR",
            description="a DICOM SR (TID 1500 Measurement Report)",
            default=True,
            deliverable=True,
        ),
        Document(
            kind="series-sr",
            scope="series",
            media_type=DICOM,
            build=series_sr,
            title="DICOM SR",
            description="a DICOM SR (TID 1500 Measurement Report) of the series' 3D findings",
            default=True,
            deliverable=True,
        ),
        Document(
            kind="gsps",
            scope="instance",
            media_type=DICOM,
            build=instance_gsps,
            title="DICOM Grayscale Softcopy Presentation State",
            description="a DICOM Grayscale Softcopy Presentation State: the findings over the image",
            deliverable=True,
        ),
        Document(
            kind="kos",
            scope="study",
            media_type=DICOM,
            build=study_kos,
            title="DICOM Key Object Selection",
            description="a DICOM Key Object Selection (TID 2010) of the study's images with findings",
            default=True,
            deliverable=True,
        ),
        Document(
            kind="sc",
            scope="instance",
            media_type=DICOM,
            build=None,
            stored=sc_files,
            title="DICOM Secondary Capture",
            description="a DICOM Secondary Capture of one frame with findings, its boxes and labels burned "
            "in (?document=sc&frame=N, N the frame number from 1)",
            deliverable=True,
        ),
    ]
)
