"""``GET /v1/results/{uid}``: the result of an instance received by ``/v1/detect`` or STOW-RS.

Pending and failed instances are answered in JSON whatever the client accepts; a done one in the format
negotiated from ``Accept`` among the registered ones (:mod:`..results.formats`), or as the result
document ``?document=KIND`` names (:mod:`..results.documents`; ``&frame=N`` for one made per frame).

``GET /v1/results/{uid}/frames/{n}/overlay.png``: frame ``n`` (from 1) with its findings burned in, the
pixels of its secondary capture as a PNG (:mod:`..results.captures`), for consoles and quick checks.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from retinaedge.runtime.errors import RequestError
from retinaedge.runtime.uids import check_uid
from retinaedge.service.http.problems import problem, problem_responses
from retinaedge.service.http.schemas import (
    ResultDone,
    ResultFailed,
    ResultNotApplicable,
    ResultPending,
    ResultsOfModels,
)
from retinaedge.service.lanes import Lane
from retinaedge.service.results.built import result_version
from retinaedge.service.results.rows import Row, state_of, subject_key
from retinaedge.service.results.selection import findings_by_frame
from retinaedge.service.results.views import InstanceView
from retinaedge.service.routes.picking import MODEL_QUERY, pick, pick_one
from retinaedge.service.state import FORMATS_EXTENSION, InstanceFormat, Services, ServicesDep

router = APIRouter(tags=["results"])


async def kept_rows(uid: str, services: ServicesDep) -> list[Row] | Response:
    """Every model's stored row of instance ``uid`` once this client's own results are kept, or 404
    when there is none (unknown or expired)."""
    check_uid(uid, "the SOP Instance UID in the path")
    await services.settled()
    rows = await asyncio.to_thread(services.store.instance_rows, uid)
    if not rows:
        return problem(404, "not-found", "no instance with this SOP Instance UID (or its result has expired)")
    return rows


async def kept_row(uid: str, services: ServicesDep, model: str | None) -> tuple[Row, Lane] | Response:
    """One model's row of ``uid`` (:func:`.picking.pick_one`) and its lane, or the answer when there is
    none yet: 404 unknown or expired, 202 (with ``Retry-After``) while it is pending."""
    rows = await kept_rows(uid, services)
    if isinstance(rows, Response):
        return rows
    lane = pick_one(services, model, rows, "this instance")
    row = next((r for r in rows if r.model == lane.name), None)
    if row is None:
        return problem(404, "not-found", f"the model {lane.name!r} has no result of this instance")
    if row.state == "pending":
        return JSONResponse(
            {"sop_instance_uid": uid, "state": "pending", "model": lane.name},
            status_code=202,
            headers={"Retry-After": "1"},
        )
    return row, lane


def _not_applicable(uid: str, rows: list[Row]) -> dict[str, Any]:
    """The JSON of an instance no model took: the first model's rules, and every model's."""
    declined = [{"model": r.model, "rules": (r.result() or {}).get("rules", [])} for r in rows]
    return {"sop_instance_uid": uid, "state": "not-applicable", **declined[0], "models": declined}


def _unfinished(uid: str, row: Row) -> dict[str, Any] | None:
    """The JSON of a pending or failed row (answered whatever the client accepts), None for a done one."""
    if row.state == "pending":
        return {"sop_instance_uid": uid, "state": "pending", "model": row.model}
    if row.state == "failed":
        return {
            "sop_instance_uid": uid,
            "state": "failed",
            "model": row.model,
            "error": {"type": row.error_type, "message": row.error_message},
        }
    return None


@router.get(
    "/v1/results/{uid}",
    response_model=ResultDone | ResultFailed | ResultNotApplicable | ResultsOfModels,
    responses={
        202: {"model": ResultPending, "description": "Not processed yet; see Retry-After"},
        **problem_responses(400, 401, 404, 406),
    },
    openapi_extra={FORMATS_EXTENSION: "instance"},
)
async def result(
    uid: str, services: ServicesDep, fmt: InstanceFormat, model: str | None = MODEL_QUERY
) -> Response:
    """The detections of the instance with SOP Instance UID ``uid`` (of ``model``, or of the one model
    that took it; in JSON, every model's when several did)."""
    rows = await kept_rows(uid, services)
    if isinstance(rows, Response):
        return rows
    if model is None and not any(state_of(r) != "not_applicable" for r in rows):
        return JSONResponse(_not_applicable(uid, rows))  # no model took it
    lane = pick(services, model, rows)
    if lane is None:  # several models took it: each one's result, in JSON only
        if fmt.media_type != "application/json":
            raise RequestError(
                "this instance has results of several models: name one with ?model=NAME for a document"
            )
        return JSONResponse(
            {"sop_instance_uid": uid, "results": [await _json_of(services, uid, r) for r in rows]}
        )
    row = next((r for r in rows if r.model == lane.name), None)
    if row is None:
        return problem(404, "not-found", f"the model {lane.name!r} has no result of this instance")
    if state_of(row) == "not_applicable":
        return JSONResponse(_not_applicable(uid, [row]))
    unfinished = _unfinished(uid, row)
    if unfinished is not None:
        pending = row.state == "pending"
        return JSONResponse(
            unfinished, status_code=202 if pending else 200, headers={"Retry-After": "1"} if pending else None
        )
    assert fmt.instance is not None  # the registry offers only formats that render instances
    return await fmt.instance(await _view(services, uid, row, lane))


async def _view(services: Services, uid: str, row: Row, lane: Lane) -> InstanceView:
    identity = await asyncio.to_thread(services.identities.get, uid)
    result = row.result() or {}
    sha = result.get("model", {}).get("sha256") or lane.sha256  # the version that produced it
    return InstanceView(
        uid=uid,
        result=result,
        header_json=row.header_json,
        identity=identity,
        model_name=lane.name,
        model_sha256=sha,
        manifest=lane.manifest_for(sha),
        version=result_version(row.result_json, row.header_json, identity),
    )


async def _json_of(services: Services, uid: str, row: Row) -> dict[str, Any]:
    """One model's row of ``uid`` as its JSON result."""
    if state_of(row) == "not_applicable":
        return _not_applicable(uid, [row])
    unfinished = _unfinished(uid, row)
    if unfinished is not None or row.model not in services.lanes:
        return unfinished or {"sop_instance_uid": uid, "state": row.state, "model": row.model}
    return {**(row.result() or {}), "state": "done"}


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
    model: str | None = MODEL_QUERY,
) -> Response:
    """Frame ``n`` of the instance ``uid`` with its findings' boxes and labels burned in, as a PNG; 404
    when the frame does not exist or has no findings."""
    found = await kept_row(uid, services, model)
    if isinstance(found, Response):
        return found
    row, lane = found
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
    path = services.captures.png(subject_key(lane.name, uid), n)
    try:
        if path is None:
            raise FileNotFoundError
        return Response(await asyncio.to_thread(path.read_bytes), media_type=PNG)
    except FileNotFoundError:
        return problem(
            404, "not-found", f"no overlay was made for frame {n}; the result's other documents were"
        )
