"""``POST /v1/detect``: one DICOM instance in, its detections out (synchronously, through the pipeline).

The result is also kept for ``GET /v1/results/{uid}``, from the header the pipeline already parsed, by the
background writer (:mod:`..results.writer`): nothing on the response path waits for storage. A result with
findings hands the writer the request's bytes too, for its secondary captures (drawn after the response).
"""

from __future__ import annotations

import asyncio
import logging
import time

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
from retinaedge.runtime.intended_use import NotApplicableError
from retinaedge.service.http.body import check_declared_length, read_body
from retinaedge.service.http.problems import problem_responses
from retinaedge.service.http.schemas import DetectResult
from retinaedge.service.intake.ingest import header_uids
from retinaedge.service.results.evidence import KeptHeader, select_header
from retinaedge.service.results.selection import findings_by_frame
from retinaedge.service.results.writer import KeptResult
from retinaedge.service.state import ServicesDep

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
    """Detect in every frame of one instance (a PS3.10 file as ``application/dicom``)."""
    started = time.perf_counter()
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/dicom":
        raise UnsupportedMediaTypeError(f"expected Content-Type application/dicom, got {media or 'none'!r}")
    worker, metrics = services.worker, services.metrics
    try:
        limit = services.settings.max_body_bytes
        check_declared_length(request.headers, limit)
        data = await read_body(request.stream(), limit, services.settings.request_idle_timeout_s)
        if not data:
            raise RequestError("the request body is empty")
        header: list[tuple[tuple[str, str, str, str], KeptHeader]] = []

        def keep_header(src: DicomInput) -> None:  # in the reader thread, from what it already parsed
            try:  # selected here (the pixel data is not kept), encoded by the writer thread
                header.append((header_uids(src), select_header(src.ds)))
            except Exception as exc:  # the detections stand even if they cannot be kept for later
                log.warning("result not kept for /v1/results: %s", type(exc).__name__)

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
        services.writer.keep(KeptResult(uid, sop_class, study, series, len(data), stored, kept, source))
    body["timings_ms"]["request"] = round((time.perf_counter() - started) * 1e3, 3)
    log.info(
        "instance %s: %d frame(s), %d detection(s)",
        services.uid_hash(result.sop_instance_uid),
        len(result.frames),
        sum(len(f.detections) for f in result.frames),
    )
    return JSONResponse(body)
