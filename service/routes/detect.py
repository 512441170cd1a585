"""``POST /v1/detect``: one DICOM instance in, its detections out (synchronously, through the pipeline).

The result is also kept for ``GET /v1/results/{uid}``, from the header the pipeline already parsed, by the
background writer (:mod:`..results.writer`): nothing on the response path waits for storage. A result with
findings hands the writer the request's bytes too, for its secondary captures (drawn after the response).

With several models, each one that takes the instance runs it on its own worker, and the answer says what
each one did (:func:`several`): 200 when every one produced its result; 207 when some did and others
refused (a full queue, a model not ready...): their results, each refusal as a problem object under
``errors`` (``retry_after`` when a retry may succeed, the largest in ``Retry-After``), since the results
computed are kept and a client must see them; the error itself (503...) only when no model produced a
result; 422 ``not-applicable`` when none takes the instance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
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
from retinaedge.service.http.problems import error_members, problem_responses, retry_after
from retinaedge.service.http.schemas import DetectResult, ModelRules
from retinaedge.service.intake.ingest import kept_header_encoded, kept_header_of
from retinaedge.service.lanes import Lane
from retinaedge.service.results.evidence import EncodedHeader, KeptHeader
from retinaedge.service.results.selection import findings_by_frame
from retinaedge.service.results.writer import KeptResult
from retinaedge.service.state import Services, ServicesDep

log = logging.getLogger(__name__)

router = APIRouter(tags=["detect"])


class ModelError(BaseModel):
    """One model's refusal of an instance other models processed: its problem document's members."""

    model: str
    type: str
    title: str
    status: int
    detail: str
    retry_after: int | None = Field(default=None, description="seconds after which a retry may succeed")


class SeveralResults(BaseModel):
    """``POST /v1/detect`` with several models: each model's result, refusal (``errors``) or rules."""

    sop_instance_uid: str
    results: list[dict[str, Any]] = Field(description="the result of each model that produced one")
    not_applicable: list[ModelRules]
    errors: list[ModelError] = Field(description="each model that took the instance but refused it")


@router.post(
    "/v1/detect",
    # Documentation only: the handler returns a JSONResponse, which FastAPI sends as is (the nested
    # detections are not validated a second time on the hot path).
    response_model=DetectResult,
    responses={
        **problem_responses(400, 401, 408, 413, 415, 422, 503),
        207: {
            "model": SeveralResults,
            "description": "Several models: some produced their result, others refused the instance "
            "(``errors``; ``Retry-After`` when a retry may succeed). With several models a 200 has this "
            "shape too, ``errors`` empty.",
        },
    },
)
async def detect(request: Request, services: ServicesDep) -> Response:
    """Detect in every frame of one instance (a PS3.10 file as ``application/dicom``), with every model
    whose intended use takes it. With one model served, its result; with several, ``{"sop_instance_uid",
    "results": [one per model that produced it], "not_applicable": [the others and their rules], "errors":
    [each model that refused it]}``, 207 when ``errors`` is not empty (module docstring)."""
    started = time.perf_counter()
    data = await _body(request, services)
    lanes = list(services.lanes.values())
    if len(lanes) == 1:
        body = await _detect_on(lanes[0], services, data, started)
        return JSONResponse(body)
    outcomes = await asyncio.gather(
        *(_detect_on(lane, services, data, started) for lane in lanes), return_exceptions=True
    )
    return several(services, [lane.name for lane in lanes], outcomes)


def several(services: Services, names: list[str], outcomes: list[Any]) -> Response:
    """The answer of several models (module docstring) from each one's outcome: its result body, or what
    it raised."""
    results: list[dict[str, Any]] = []
    declined: list[NotApplicableError] = []
    refused: list[tuple[str, RetinaEdgeError]] = []
    for name, outcome in zip(names, outcomes, strict=True):
        if isinstance(outcome, NotApplicableError):
            declined.append(outcome)
        elif isinstance(outcome, RetinaEdgeError):
            refused.append((name, outcome))
        elif isinstance(outcome, BaseException):  # not an error of the request's: a fault (500)
            raise outcome
        else:
            results.append(outcome)
    if not results:
        if refused:  # nothing was computed: the error itself (a retry of the whole request is right)
            raise refused[0][1]
        raise NoModelError(declined)
    body = {
        "sop_instance_uid": results[0]["sop_instance_uid"],
        "results": results,
        "not_applicable": [d.problem_members() for d in declined],
        "errors": [{"model": name, **error_members(exc)} for name, exc in refused],
    }
    if not refused:
        return JSONResponse(body)
    waits = [w for _name, exc in refused if (w := retry_after(exc)) is not None]
    log.warning(
        "instance %s: answered 207: result of %s; refused by %s",
        services.uid_hash(body["sop_instance_uid"]),
        ", ".join(r["model"]["name"] for r in results),
        ", ".join(f"{name} ({exc.type})" for name, exc in refused),
    )
    return JSONResponse(body, status_code=207, headers={"Retry-After": str(max(waits))} if waits else None)


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
