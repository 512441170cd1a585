"""Result formats: one registry (media type -> renderer) and one Accept negotiation.

A finished result is served in any format registered for its scope: ``instance`` (``GET
/v1/results/{uid}``), ``series`` (``/v1/series/{uid}``) or ``study`` (``/v1/studies/{uid}``). The defaults
(:func:`default_formats`) are JSON (first: the format when the client states no preference) and, for each
media type that has a default result document (:mod:`.documents`: for ``application/dicom`` the DICOM SR
of an instance or a series, the Key Object Selection of a study), that document. Another media
type (a CSV, say) is one :class:`ResultFormat` passed to :meth:`FormatRegistry.register` on
``app.state.services.formats``; no route changes, and ``/openapi.json`` lists it under the negotiating
routes. A document that is not the default of its media type is asked for by kind
(``?document=KIND``, :func:`document_format`).

:func:`negotiate` is the only Accept parsing in the service; :meth:`FormatRegistry.select` raises
:class:`~retinaedge.runtime.errors.NotAcceptableError` (406, listing what is offered) when nothing fits.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse, Response
from retinaedge.runtime.errors import NotAcceptableError, NotFoundError, RequestError
from retinaedge.service.http.problems import problem
from retinaedge.service.results.built import BuiltDocuments
from retinaedge.service.results.documents import DICOM, DOCUMENTS, Document, DocumentRegistry
from retinaedge.service.results.views import SCOPES, InstanceView, Scope, SeriesView, StudyView, Unavailable

log = logging.getLogger(__name__)

__all__ = [
    "DICOM",
    "JSON",
    "FormatRegistry",
    "ResultFormat",
    "default_formats",
    "document_format",
    "negotiate",
]

JSON = "application/json"

InstanceRenderer = Callable[[InstanceView], Awaitable[Response]]
SeriesRenderer = Callable[[SeriesView], Awaitable[Response]]
StudyRenderer = Callable[[StudyView], Awaitable[Response]]


@dataclass(frozen=True)
class ResultFormat:
    """One media type and how it renders an instance result, a series result and/or a study (None: not
    offered for that scope)."""

    media_type: str
    instance: InstanceRenderer | None = None
    series: SeriesRenderer | None = None
    description: str = ""
    study: StudyRenderer | None = None

    def renders(self, scope: Scope) -> bool:
        renderer = {"instance": self.instance, "series": self.series, "study": self.study}[scope]
        return renderer is not None


def _ranges(accept: str) -> list[tuple[str, str, float]]:
    """``Accept`` -> (type, subtype, q) per media range; malformed ranges are skipped."""
    out = []
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        media = media.lower()
        if media == "*":  # seen from old clients: any
            media = "*/*"
        main, slash, sub = media.partition("/")
        if not slash or not main or not sub or (main == "*" and sub != "*"):
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = -1.0
        if 0.0 <= q <= 1.0:
            out.append((main, sub, q))
    return out


def negotiate(accept: str | None, offered: Sequence[str]) -> str | None:
    """The offered media type the client prefers (RFC 9110 12.5.1), or None when none is acceptable.

    No or an empty ``Accept`` accepts anything. Each offered type takes the q of the most specific range
    that matches it (``type/subtype`` over ``type/*`` over ``*/*``); the highest q above 0 wins, ties
    going to the first offered. Media type parameters other than q are ignored.
    """
    if not offered:
        return None
    if accept is None or not accept.strip():
        return offered[0]
    ranges = _ranges(accept)
    best, best_q = None, 0.0
    for media in offered:
        main, _, sub = media.lower().partition("/")
        specificity, q = -1, 0.0
        for r_main, r_sub, r_q in ranges:
            if (r_main, r_sub) == (main, sub):
                rank = 2
            elif (r_main, r_sub) == (main, "*"):
                rank = 1
            elif (r_main, r_sub) == ("*", "*"):
                rank = 0
            else:
                continue
            if rank > specificity:
                specificity, q = rank, r_q
        if q > best_q:
            best, best_q = media, q
    return best


class FormatRegistry:
    """Result formats by media type, in order of preference (the first is the default)."""

    def __init__(self, formats: Iterable[ResultFormat] = ()) -> None:
        self._formats: dict[str, ResultFormat] = {}
        for fmt in formats:
            self.register(fmt)

    def register(self, fmt: ResultFormat) -> None:
        """Add a format (last in preference); an existing entry of the same media type is replaced."""
        self._formats[fmt.media_type.lower()] = fmt

    def __iter__(self) -> Iterator[ResultFormat]:
        return iter(list(self._formats.values()))

    def offered(self, scope: Scope) -> list[str]:
        return [f.media_type for f in self._formats.values() if f.renders(scope)]

    def select(self, scope: Scope, accept: str | None) -> ResultFormat:
        """The format to answer ``accept`` with; 406 (:class:`NotAcceptableError`) when there is none."""
        offered = self.offered(scope)
        chosen = negotiate(accept, offered)
        if chosen is None:
            raise NotAcceptableError(
                f"none of the media types offered for this {scope} is acceptable: {', '.join(offered)}",
                tuple(offered),
            )
        return self._formats[chosen.lower()]


async def _json_instance(view: InstanceView) -> Response:
    return JSONResponse({**view.result, "state": "done"})


async def _json_series(view: SeriesView) -> Response:
    body = {**view.status, "model": {"name": view.model_name, "sha256": view.model_sha256}}
    if view.found is None:
        body.update({"stack": None, "findings": [], "left_out": []})
    else:
        linked = view.found.result.to_json()
        linked.pop("series_instance_uid")
        linked.pop("instances")
        body.update({**linked, "left_out": view.found.left_out})
    return JSONResponse(body)


async def _json_study(view: StudyView) -> Response:
    return JSONResponse(
        {**view.images.to_json(), "model": {"name": view.model_name, "sha256": view.model_sha256}}
    )


async def _document_response(doc: Document, build: Callable[[], Any], scope: Scope, status: int) -> Response:
    """``build()`` (a pydicom dataset, built in a thread) as ``doc.media_type``; a problem document with
    ``status`` when it cannot be made (406 through Accept, 404 when asked for by kind)."""

    def encode() -> bytes:
        buf = io.BytesIO()
        build().save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    try:
        return Response(await asyncio.to_thread(encode), media_type=doc.media_type)
    except Exception as exc:
        return _not_built(doc, scope, status, exc)


def _not_built(doc: Document, scope: Scope, status: int, exc: Exception) -> Response:
    """The problem answer for a document that cannot be made: :class:`Unavailable` says why; any other
    exception (an SOP class highdicom cannot reference, a disk error) is logged by type."""
    if isinstance(exc, Unavailable):
        return problem(status, _STATUS_TYPES[status], str(exc))
    log.warning("%s of a %s not built: %s", doc.kind, scope, type(exc).__name__)
    return problem(
        status,
        _STATUS_TYPES[status],
        f"no {doc.title} can be built for this {scope} ({type(exc).__name__}); the JSON result is available",
    )


_STATUS_TYPES = {404: "not-found", 406: "not-acceptable"}
_A: dict[Scope, str] = {"instance": "an instance", "series": "a series", "study": "a study"}


def _instance_renderer(doc: Document, status: int, built: BuiltDocuments | None) -> InstanceRenderer:
    """Serve ``doc`` of an instance: from its file in ``built`` (built there once per result version,
    :mod:`.built`), or built for this response alone when there is no store or the view no version."""

    async def render(view: InstanceView) -> Response:
        return await _kept_response(doc, lambda: doc.build_instance(view), "instance", status, built, view)

    return render


def _series_renderer(doc: Document, status: int, built: BuiltDocuments | None) -> SeriesRenderer:
    async def render(view: SeriesView) -> Response:
        return await _kept_response(doc, lambda: doc.build_series(view), "series", status, built, view)

    return render


def _study_renderer(doc: Document, status: int, built: BuiltDocuments | None) -> StudyRenderer:
    async def render(view: StudyView) -> Response:
        return await _kept_response(doc, lambda: doc.build_study(view), "study", status, built, view)

    return render


async def _kept_response(
    doc: Document,
    build: Callable[[], Any],
    scope: Scope,
    status: int,
    built: BuiltDocuments | None,
    view: Any,
) -> Response:
    """``doc`` of ``view`` from its file in ``built`` (made there once per version of the subject,
    :mod:`.built`), or built for this response alone without a store or a version."""
    if built is None or not view.version:
        return await _document_response(doc, build, scope, status)
    try:
        path = await built.file_async(view.key, doc.kind, view.version, build)
        data = await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:  # removed meanwhile (retention): build this one
        return await _document_response(doc, build, scope, status)
    except Exception as exc:
        return _not_built(doc, scope, status, exc)
    return Response(data, media_type=doc.media_type)


def _format_of(
    docs: dict[Scope, Document | None], status: int, built: BuiltDocuments | None = None
) -> ResultFormat:
    """The format serving ``docs[scope]`` for each scope that has one (one media type); an instance's
    document is kept in ``built`` once made."""
    some = next(d for d in docs.values() if d is not None)
    instance, series, study = docs.get("instance"), docs.get("series"), docs.get("study")
    return ResultFormat(
        some.media_type,
        instance=_instance_renderer(instance, status, built) if instance is not None else None,
        series=_series_renderer(series, status, built) if series is not None else None,
        description=some.description,
        study=_study_renderer(study, status, built) if study is not None else None,
    )


def _stored_renderer(doc: Document, data_dir: Path, frame: int | None) -> InstanceRenderer:
    """Serve the stored document ``doc``'s file of part ``frame`` (the only one when None) as is."""

    async def render(view: InstanceView) -> Response:
        try:
            parts = await asyncio.to_thread(doc.parts, view, data_dir)
        except Unavailable as exc:
            return problem(404, "not-found", str(exc))
        listed = ", ".join(map(str, parts))
        if frame is None and len(parts) != 1:
            return problem(
                400,
                "bad-request",
                f"this instance has a {doc.title} of each of frames {listed}: ask for one with &frame=N",
            )
        path = parts.get(frame) if frame is not None else next(iter(parts.values()))
        if path is None:
            return problem(404, "not-found", f"frame {frame} has no {doc.title}; frames with one: {listed}")
        try:
            return Response(await asyncio.to_thread(path.read_bytes), media_type=doc.media_type)
        except FileNotFoundError:  # removed meanwhile (retention, or a newer result)
            return problem(404, "not-found", f"the {doc.title} of frame {frame} is no longer kept")

    return render


def document_format(
    documents: DocumentRegistry,
    scope: Scope,
    kind: str,
    accept: str | None,
    *,
    data_dir: Path | None = None,
    frame: int | None = None,
    built: BuiltDocuments | None = None,
) -> ResultFormat:
    """The format of ``?document=kind`` on a ``scope`` resource: 400 for a kind no document has, 404
    for a document of the other scope (and, when rendered, for one this result cannot have), 406 when
    ``accept`` excludes its media type. A stored document (:mod:`.documents`) is served from its files
    under ``data_dir``: part ``frame`` (``?frame=N``), or its only one; ``frame`` with a built document
    is a 400. A built document of an instance is kept in ``built`` once made (:mod:`.built`)."""
    doc = documents.get(kind)
    if doc is None:
        raise RequestError(
            f"no result document is called {kind!r}; {_A[scope]} has: {', '.join(documents.kinds(scope))}"
        )
    if doc.scope != scope:
        raise NotFoundError(
            f"{kind!r} is a document of {_A[doc.scope]}, not of {_A[scope]}; "
            f"{_A[scope]} has: {', '.join(documents.kinds(scope))}"
        )
    if negotiate(accept, [doc.media_type]) is None:
        raise NotAcceptableError(
            f"the {kind} document is {doc.media_type}, which this request does not accept", (doc.media_type,)
        )
    if doc.stored is not None:
        if data_dir is None:
            raise ValueError(f"{kind} is served from the data directory's files: give data_dir")
        return ResultFormat(doc.media_type, instance=_stored_renderer(doc, data_dir, frame))
    if frame is not None:
        raise RequestError(f"frame selects one frame's document; {kind} is one document for {_A[scope]}")
    return _format_of({scope: doc}, 404, built)


def default_formats(
    documents: DocumentRegistry = DOCUMENTS, built: BuiltDocuments | None = None
) -> FormatRegistry:
    """JSON (the default) for instances, series and studies, then each media type's default document
    (for ``application/dicom``: ``sr`` for instances, ``series-sr`` for series, ``kos`` for studies)."""
    formats = FormatRegistry(
        [ResultFormat(JSON, _json_instance, _json_series, "the result as JSON", study=_json_study)]
    )
    for media in documents.default_media_types():
        formats.register(_format_of({scope: documents.default(scope, media) for scope in SCOPES}, 406, built))
    return formats
