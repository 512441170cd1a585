"""DICOMweb STOW-RS (``POST /dicomweb/studies[/{study}]``): acknowledge durably, process later.

The semantics (spool, fsync, SQLite commit before acknowledgement) live in :mod:`..intake.stow`; this router is
the HTTP side: limits from the settings, metrics and logs per rejected part, the DICOM JSON response.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from retinaedge.runtime.uids import check_uid
from retinaedge.service.http.body import check_declared_length
from retinaedge.service.http.problems import problem_responses
from retinaedge.service.http.schemas import StoreInstancesResponse
from retinaedge.service.intake.stow import receive
from retinaedge.service.state import ServicesDep
from starlette.requests import ClientDisconnect

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"


class DicomJSONResponse(JSONResponse):
    """A JSON body in the DICOM JSON model (PS3.18 F)."""

    media_type = DICOM_JSON


router = APIRouter(tags=["dicomweb"])

_STORE_RESPONSES = {
    202: {"model": StoreInstancesResponse, "description": "Some instances stored, some failed"},
    409: {"model": StoreInstancesResponse, "description": "No instance stored"},
    **problem_responses(400, 401, 408, 413, 415, 503, 507),
}


@router.post(
    "/dicomweb/studies",
    response_model=StoreInstancesResponse,
    response_class=DicomJSONResponse,
    responses=_STORE_RESPONSES,
)
@router.post(
    "/dicomweb/studies/{study}",
    response_model=StoreInstancesResponse,
    response_class=DicomJSONResponse,
    responses=_STORE_RESPONSES,
)
async def stow(request: Request, services: ServicesDep, study: str | None = None) -> Response:
    """Store instances (``multipart/related; type="application/dicom"``); each listed as stored only
    once it is on disk and recorded. With ``{study}``, instances of another study fail."""
    settings = services.settings
    if study is not None:
        check_uid(study, "the Study Instance UID in the path")
    check_declared_length(request.headers, settings.max_request_bytes)  # 413 before a byte is read
    try:
        outcome = await receive(
            request.stream(),
            request.headers.get("content-type", ""),
            spool=services.spool,
            store=services.store,
            limits=services.limits,
            max_instance_bytes=settings.max_body_bytes,
            max_request_bytes=settings.max_request_bytes,
            study_uid=study,
            enqueue=services.processor.enqueue,
            admit=services.admit,
            identities=services.identities,
            idle_timeout_s=settings.request_idle_timeout_s,
            route=services.router.for_title(None),
        )
    except ClientDisconnect:  # nothing to answer; what was acknowledged before stays acknowledged
        log.info("STOW-RS: the client disconnected; the part being received was discarded")
        return Response(status_code=400)
    for _, _, _, why in outcome.failed:
        services.metrics.outcome("stow-rejected")
        log.info("STOW-RS part rejected: %s", why.split(":")[0])
    log.info("STOW-RS: %d stored, %d failed", len(outcome.referenced), len(outcome.failed))
    base = str(request.base_url).rstrip("/") + "/v1/results"
    return JSONResponse(outcome.to_dicom_json(base), status_code=outcome.status, media_type=DICOM_JSON)
