"""Series findings: ``GET /v1/series/{uid}`` and ``POST /v1/series/{uid}/complete``.

While a series is collecting (instances pending, or its quiet period not over) both answer 202 with its
status; once complete, its 3D findings in the format negotiated from ``Accept`` (:mod:`..results.formats`),
or as the result document ``?document=KIND`` names (:mod:`..results.documents`).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from retinaedge.runtime.uids import check_uid
from retinaedge.service.http.problems import problem, problem_responses
from retinaedge.service.http.schemas import SeriesCollecting, SeriesComplete
from retinaedge.service.lanes import Lane
from retinaedge.service.results.built import rows_version
from retinaedge.service.results.completion import SeriesFindings, SeriesStatus, series_findings, series_status
from retinaedge.service.results.formats import ResultFormat
from retinaedge.service.results.rows import version_of_rows
from retinaedge.service.results.views import SeriesView
from retinaedge.service.routes.picking import MODEL_QUERY, pick_one
from retinaedge.service.state import FORMATS_EXTENSION, SeriesFormat, Services, ServicesDep

log = logging.getLogger(__name__)

router = APIRouter(tags=["series"])

NOT_FOUND = "no instance of this Series Instance UID (or its results have expired)"
_RESPONSES = {
    202: {"model": SeriesCollecting, "description": "Still collecting; see Retry-After"},
    **problem_responses(400, 401, 404, 406),
}


def _series_state(
    services: Services, uid: str, lane: Lane
) -> tuple[SeriesStatus, SeriesFindings | None, str, str] | None:
    """The series' status for ``lane``'s model and, once complete, its findings, the version of its
    documents (:func:`..results.built.rows_version`) and the model version (sha256) of its newest result;
    None for an unknown series."""
    store, settings = lane.store, services.settings
    rows = store.series_rows(uid)
    if not rows:
        return None
    status = series_status(
        rows, services.clock.now(), settings.series_quiet_s, store.series_requested_at(uid)
    )
    if status.state != "complete":
        return status, None, "", ""
    sha = version_of_rows(rows) or lane.sha256
    params = settings.link_params(lane.manifest_for(sha).operating_point is not None)
    return status, series_findings(rows, params, services.identities.get), rows_version(rows), sha


async def _lane(services: Services, uid: str, model: str | None) -> Lane | None:
    """The model whose results of series ``uid`` are read (:mod:`.picking`); None for an unknown series."""
    rows = await asyncio.to_thread(services.store.series_rows_of_all, uid)
    if not rows:
        return None
    return pick_one(services, model, rows, "this series")


async def _answer(services: Services, uid: str, fmt: ResultFormat, model: str | None) -> Response:
    await services.settled()
    lane = await _lane(services, uid, model)
    if lane is None:
        return problem(404, "not-found", NOT_FOUND)
    state = await asyncio.to_thread(_series_state, services, uid, lane)
    if state is None:
        return problem(404, "not-found", NOT_FOUND)
    status, found, version, sha = state
    body = {"series_instance_uid": uid, "model": lane.name, **status.to_json()}
    if status.state != "complete":
        body["quiet_period_s"] = services.settings.series_quiet_s
        return JSONResponse(body, status_code=202, headers={"Retry-After": str(status.retry_after_s)})
    assert fmt.series is not None  # the registry offers only formats that render series
    view = SeriesView(
        uid,
        body,
        found,
        lane.name,
        sha,
        manifest=lane.manifest_for(sha),
        version=version,
    )
    response = await fmt.series(view)
    log.info(
        "series %s: complete (%s), %d finding(s), as %s",
        services.uid_hash(uid),
        status.completed_by,
        len(found.result.findings) if found is not None else 0,
        fmt.media_type,
    )
    return response


@router.get(
    "/v1/series/{series_uid}",
    response_model=SeriesComplete,
    responses=_RESPONSES,
    openapi_extra={FORMATS_EXTENSION: "series"},
)
async def series(
    series_uid: str, services: ServicesDep, fmt: SeriesFormat, model: str | None = MODEL_QUERY
) -> Response:
    """The series' 3D findings once it is complete (202 with its status until then)."""
    check_uid(series_uid, "the Series Instance UID in the path")
    return await _answer(services, series_uid, fmt, model)


@router.post(
    "/v1/series/{series_uid}/complete",
    response_model=SeriesComplete,
    responses=_RESPONSES,
    openapi_extra={FORMATS_EXTENSION: "series"},
)
async def complete_series(
    series_uid: str, services: ServicesDep, fmt: SeriesFormat, model: str | None = MODEL_QUERY
) -> Response:
    """Treat the series as complete now (its pending instances still finish first)."""
    check_uid(series_uid, "the Series Instance UID in the path")
    await services.settled()
    known = await asyncio.to_thread(services.store.series_rows_of_all, series_uid)
    if not known:
        return problem(404, "not-found", NOT_FOUND)
    pick_one(services, model, known, "this series")  # 400/404 before anything is recorded
    await asyncio.to_thread(services.store.request_series_complete, series_uid)
    return await _answer(services, series_uid, fmt, model)
