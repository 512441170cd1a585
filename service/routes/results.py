"""``GET /v1/results/{uid}``: the result of an instance received by ``/v1/detect`` or STOW-RS.

Pending and failed instances are answered in JSON whatever the client accepts; a done one in the format
negotiated from ``Accept`` among the registered ones (:mod:`..results.formats`), or as the result
document ``?document=KIND`` names (:mod:`..results.documents`; ``&frame=N`` for one made per frame).

``GET /v1/results/{uid}/frames/{n}/overlay.png``: frame ``n`` (from 1) with its findings burned in, the
pixels of its secondary capture as a PNG (:mod:`..results.captures`), for consoles and quick checks.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from retinaedge.runtime.uids import check_uid
from retinaedge.service.http.problems import problem, problem_responses
from retinaedge.service.http.schemas import ResultDone, ResultFailed, ResultNotApplicable, ResultPending
from retinaedge.service.results.built import result_version
from retinaedge.service.results.selection import findings_by_frame
from retinaedge.service.results.store import Row
from retinaedge.service.results.views import InstanceView
from retinaedge.service.state import FORMATS_EXTENSION, InstanceFormat, ServicesDep

router = APIRouter(tags=["results"])


async def kept_row(uid: str, services: ServicesDep) -> Row | Response:
    """The stored row of instance ``uid`` once this client's own results are kept, or the answer when
    there is none yet: 404 unknown or expired, 202 (with ``Retry-After``) while it is pending."""
    check_uid(uid, "the SOP Instance UID in the path")
    await services.settled()
    row = await asyncio.to_thread(services.store.get, uid)
    if row is None:
        return problem(404, "not-found", "no instance with this SOP Instance UID (or its result has expired)")
    if row.state == "pending":
        return JSONResponse(
            {"sop_instance_uid": uid, "state": "pending"}, status_code=202, headers={"Retry-After": "1"}
        )
    return row


@router.get(
    "/v1/results/{uid}",
    response_model=ResultDone | ResultFailed | ResultNotApplicable,
    responses={
        202: {"model": ResultPending, "description": "Not processed yet; see Retry-After"},
        **problem_responses(400, 401, 404, 406),
    },
    openapi_extra={FORMATS_EXTENSION: "instance"},
)
async def result(uid: str, services: ServicesDep, fmt: InstanceFormat) -> Response:
    """The detections of the instance with SOP Instance UID ``uid``."""
    row = await kept_row(uid, services)
    if isinstance(row, Response):
        return row
    if row.state == "failed" and row.error_type == "not-applicable":
        outcome = row.result() or {}
        return JSONResponse(
            {
                "sop_instance_uid": uid,
                "state": "not-applicable",
                "model": outcome.get("model", services.model_name),
                "rules": outcome.get("rules", []),
            }
        )
    if row.state == "failed":
        return JSONResponse(
            {
                "sop_instance_uid": uid,
                "state": "failed",
                "error": {"type": row.error_type, "message": row.error_message},
            }
        )
    assert fmt.instance is not None  # the registry offers only formats that render instances
    identity = await asyncio.to_thread(services.identities.get, uid)
    view = InstanceView(
        uid=uid,
        result=row.result() or {},
        header_json=row.header_json,
        identity=identity,
        model_name=services.model_name,
        model_sha256=services.model_sha256,
        manifest=services.bundle.manifest,
        version=result_version(row.result_json, row.header_json, identity),
    )
    return await fmt.instance(view)


PNG = "image/png"


@router.get(
    "/v1/results/{uid}/frames/{n}/overlay.png",
    response_class=Response,
    responses={
        200: {
            "description": "The frame with its findings burned in (the pixels of its secondary capture)",
            "content": {PNG: {"schema": {"type": "string", "format": "binary"}}},
        },
        202: {"model": ResultPending, "description": "Not processed yet; see Retry-After"},
        **problem_responses(400, 401, 404),
    },
)
async def overlay(
    uid: str,
    services: ServicesDep,
    n: int = PathParam(ge=1, le=2**31 - 1, description="the frame number, from 1"),
) -> Response:
    """Frame ``n`` of the instance ``uid`` with its findings' boxes and labels burned in, as a PNG; 404
    when the frame does not exist or has no findings."""
    row = await kept_row(uid, services)
    if isinstance(row, Response):
        return row
    if row.state == "failed":
        return problem(
            404, "not-found", f"the instance was not processed ({row.error_type}): it has no overlay"
        )
    result = row.result() or {}
    frames = int(result.get("image", {}).get("frames", len(result.get("frames", []))))
    if n > frames:
        return problem(404, "not-found", f"there is no frame {n}: the instance has {frames} frame(s)")
    if n - 1 not in findings_by_frame(result):
        return problem(404, "not-found", f"frame {n} has no findings, so no overlay")
    if services.settings.captures == "never":
        return problem(404, "not-found", "overlays are not made here (the setting captures is never)")
    path = services.captures.png(uid, n)
    try:
        if path is None:
            raise FileNotFoundError
        return Response(await asyncio.to_thread(path.read_bytes), media_type=PNG)
    except FileNotFoundError:
        return problem(
            404, "not-found", f"no overlay was made for frame {n}; the result's other documents were"
        )
