"""``POST /v1/detect``: one DICOM instance in, its detections out (synchronously, through the pipeline).

The result is also kept for ``GET /v1/results/{uid}``, from the header the pipeline already parsed, by the
background writer (:mod:`..results.writer`): nothing on the response path waits for storage. A result with
findings hands the writer the request's bytes too, for its secondary captures (drawn after the response).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from retinaedge.runtime.dicomio import DicomInput
from retinaedge.runtime.errors import (
    NotReadyError,
    OverloadedError,
    RequestError,
    RetinaEdgeError,
    UnsupportedMediaTypeError,
)
from retinaedge.runtime.intended_use import NoModelError, NotApplicableError
from retinaedge.service.http.body import check_declared_length, read_body
from retinaedge.service.http.problems import problem_responses
from retinaedge.service.http.schemas import DetectResult
from retinaedge.service.intake.ingest import kept_header_encoded, kept_header_of
from retinaedge.service.lanes import Lane
from retinaedge.service.results.evidence import EncodedHeader, KeptHeader
from retinaedge.service.results.selection import findings_by_frame
from retinaedge.service.results.writer import KeptResult
from retinaedge.service.state import Services, ServicesDep

log = logging.getLogger(__name__)

router = APIRouter(tags=["detect"])


@router.post(
    "/v1/detect",
    # Documentation only: the handler returns a JSONResponse, which FastAPI sends as is (the nested
    # detections are not validated a second time on the hot path).
    response_model=DetectResult,
    responses=problem_responses(400, 401, 408, 413, 415, 422, 503),
)
async def detect(request: Request, services: ServicesDep) -> Response:
    """Detect in every frame of one instance (a PS3.10 file as ``application/dicom``), with every model
    whose intended use takes it. With one model served, its result; with several, ``{"sop_instance_uid",
    "results": [one per model that took it], "not_applicable": [the others and their rules]}``."""
    started = time.perf_counter()
    data = await _body(request, services)
    lanes = list(services.lanes.values())
    if len(lanes) == 1:
        body = await _detect_on(lanes[0], services, data, started)
        return JSONResponse(body)
    outcomes = await asyncio.gather(
        *(_detect_on(lane, services, data, started) for lane in lanes), return_exceptions=True
    )
    for outcome in outcomes:  # an error that is not "outside the intended use" answers the request
        if isinstance(outcome, BaseException) and not isinstance(outcome, NotApplicableError):
            raise outcome
    declined = [o for o in outcomes if isinstance(o, NotApplicableError)]
    results = [o for o in outcomes if isinstance(o, dict)]
    if not results:
        raise NoModelError(declined)
    return JSONResponse(
        {
            "sop_instance_uid": results[0]["sop_instance_uid"],
            "results": results,
            "not_applicable": [d.problem_members() for d in declined],
        }
    )


@router.post(
    "/v1/models/{name}/detect",
    response_model=DetectResult,
    responses=problem_responses(400, 401, 404, 408, 413, 415, 422, 503),
)
async def detect_with(name: str, request: Request, services: ServicesDep) -> Response:
    """Detect with the model ``name`` alone (its result, as ``/v1/detect`` answers with one model)."""
    started = time.perf_counter()
    lane = services.lane(name)
    data = await _body(request, services)
    return JSONResponse(await _detect_on(lane, services, data, started))


async def _body(request: Request, services: Services) -> bytes:
    """The request's DICOM body (415 another media type, 413 beyond the limit, 400 empty)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/dicom":
        raise UnsupportedMediaTypeError(f"expected Content-Type application/dicom, got {media or 'none'!r}")
    try:
        limit = services.settings.max_body_bytes
        check_declared_length(request.headers, limit)
        data = await read_body(request.stream(), limit, services.settings.request_idle_timeout_s)
        if not data:
            raise RequestError("the request body is empty")
    except RetinaEdgeError as exc:
        services.metrics.outcome(exc.type)
        raise
    return data


class _KeepHeader:
    """The instance's header as ``/v1/results`` keeps it, from what the reader already parsed: selected
    where it was read (a reader thread, or a reader process: :func:`extract`, which encodes it there
    too), otherwise encoded by the writer thread; the pixel data is not kept."""

    extract = staticmethod(kept_header_encoded)

    def __init__(self) -> None:
        self.header: list[tuple[tuple[str, str, str, str], KeptHeader | EncodedHeader]] = []

    def __call__(self, src: DicomInput) -> None:
        self.accept(kept_header_of(src))

    def accept(self, value: tuple[tuple[str, str, str, str], KeptHeader | EncodedHeader] | str) -> None:
        if isinstance(value, str):  # the detections stand even if they cannot be kept for later
            log.warning("result not kept for /v1/results: %s", value)
        else:
            self.header.append(value)


async def _detect_on(lane: Lane, services: Services, data: bytes, started: float) -> dict[str, Any]:
    """Run ``data`` through ``lane``'s model -> its result body (kept for ``/v1/results`` by the lane's
    writer); raises what the pipeline raises (counted in the metrics)."""
    worker, metrics = lane.worker, services.metrics
    keep_header = _KeepHeader()
    header = keep_header.header

    try:
        future = worker.submit(data, on_open=keep_header)
        result = await asyncio.wrap_future(future)
    except RetinaEdgeError as exc:
        metrics.outcome(exc.type)
        if isinstance(exc, NotApplicableError):  # 422 with the rules; nothing is kept
            metrics.not_applicable_to(exc.model, [f.rule for f in exc.failures])
        if isinstance(exc, (NotReadyError, OverloadedError)):
            log.warning("refused: %s", exc.type)
        raise
    metrics.outcome("ok")
    metrics.observe(result.timings_ms)
    body = result.to_json()
    body["backend"] = worker.backend
    body["backend_reason"] = worker.backend_reason
    body["precision"] = worker.precision
    if header:  # kept for /v1/results by the writer thread (grouped commits), off this response's path
        (sop_class, uid, study, series), kept = header[0]
        source = data if findings_by_frame(body) else None  # drawn by the writer (its captures)
        # The writer encodes its own copy on its thread: this handler still adds the request's time below.
        stored = {**body, "timings_ms": dict(body["timings_ms"])}
        lane.writer.keep(KeptResult(uid, sop_class, study, series, len(data), stored, kept, source))
        services.lifecycles[lane.name].observe_soon(data, stored)  # the silent trial, if one runs
    body["timings_ms"]["request"] = round((time.perf_counter() - started) * 1e3, 3)
    log.info(
        "instance %s: model %s, %d frame(s), %d detection(s)",
        services.uid_hash(result.sop_instance_uid),
        lane.name,
        len(result.frames),
        sum(len(f.detections) for f in result.frames),
    )
    return body
