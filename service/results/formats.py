"""Result formats: one registry (media type -> renderer) and one Accept negotiation.

A finished result is served in any format registered for its kind: ``instance`` (``GET
/v1/results/{uid}``) or ``series`` (``/v1/series/{uid}``). The defaults are JSON (first: the format when
the client states no preference) and DICOM SR. A new format (a GSPS, say) is one :class:`ResultFormat`
passed to :meth:`FormatRegistry.register` on ``app.state.services.formats``; no route changes, and
``/openapi.json`` lists it under the negotiating routes.

:func:`negotiate` is the only Accept parsing in the service; :meth:`FormatRegistry.select` raises
:class:`~retinaedge.runtime.errors.NotAcceptableError` (406, listing what is offered) when nothing fits.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse, Response
from retinaedge.runtime.errors import NotAcceptableError
from retinaedge.service.http.problems import problem
from retinaedge.service.results.completion import SeriesFindings
from retinaedge.service.results.evidence import header_from_json
from retinaedge.service.results.sr import build_series_sr, build_sr

log = logging.getLogger(__name__)

Kind = Literal["instance", "series"]
JSON = "application/json"
DICOM = "application/dicom"


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
    ``completed_by``, ``instances``); ``found`` its findings, None when no instance could be used."""

    uid: str
    status: dict[str, Any]
    found: SeriesFindings | None
    model_name: str
    model_sha256: str


InstanceRenderer = Callable[[InstanceView], Awaitable[Response]]
SeriesRenderer = Callable[[SeriesView], Awaitable[Response]]


@dataclass(frozen=True)
class ResultFormat:
    """One media type and how it renders an instance result and/or a series result (None: not offered)."""

    media_type: str
    instance: InstanceRenderer | None = None
    series: SeriesRenderer | None = None
    description: str = ""

    def renders(self, kind: Kind) -> bool:
        return (self.instance if kind == "instance" else self.series) is not None


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

    def offered(self, kind: Kind) -> list[str]:
        return [f.media_type for f in self._formats.values() if f.renders(kind)]

    def select(self, kind: Kind, accept: str | None) -> ResultFormat:
        """The format to answer ``accept`` with; 406 (:class:`NotAcceptableError`) when there is none."""
        offered = self.offered(kind)
        chosen = negotiate(accept, offered)
        if chosen is None:
            raise NotAcceptableError(
                f"none of the media types offered for this {kind} is acceptable: {', '.join(offered)}",
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


async def sr_response(build: Callable[[], Any], what: str) -> Response:
    """``build()`` (a pydicom SR dataset, built in a thread) as ``application/dicom``; 406 when the
    source headers cannot be represented in an SR (e.g. an unknown SOP class)."""

    def encode() -> bytes:
        buf = io.BytesIO()
        build().save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    try:
        return Response(await asyncio.to_thread(encode), media_type=DICOM)
    except Exception as exc:
        log.warning("DICOM SR of a %s not built: %s", what, type(exc).__name__)
        return problem(
            406,
            "not-acceptable",
            f"no DICOM SR can be built for this {what} ({type(exc).__name__}); the JSON result is available",
        )


async def _sr_instance(view: InstanceView) -> Response:
    if not view.header_json:
        return problem(406, "not-acceptable", "no source header was kept for this instance")
    header_json = view.header_json
    return await sr_response(
        lambda: build_sr(
            header_from_json(header_json, view.identity), view.result, view.model_name, view.model_sha256
        ),
        "instance",
    )


async def _sr_series(view: SeriesView) -> Response:
    found = view.found
    if found is None:
        return problem(406, "not-acceptable", "no instance of this series could be analysed")
    return await sr_response(
        lambda: build_series_sr(found.headers, found.result, view.model_name, view.model_sha256), "series"
    )


def default_formats() -> FormatRegistry:
    """JSON (the default) and DICOM SR (TID 1500, Comprehensive 3D SR) for instances and series."""
    return FormatRegistry(
        [
            ResultFormat(JSON, _json_instance, _json_series, "the result as JSON"),
            ResultFormat(DICOM, _sr_instance, _sr_series, "a DICOM SR (TID 1500 Measurement Report)"),
        ]
    )
