"""A study so far: ``GET /v1/studies/{uid}``.

A study has no complete state (its series do, :mod:`.series`): the answer is always what has been
received so far (200 while instances are still pending): its instances by state and the images with
findings (JSON, :mod:`..results.studies`), or in the format negotiated from ``Accept``
(:mod:`..results.formats`; ``application/dicom``: the Key Object Selection of those images), or as the
result document ``?document=KIND`` names (``kos``; :mod:`..results.documents`).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response
from retinaedge.runtime.uids import check_uid
from retinaedge.service.http.problems import problem, problem_responses
from retinaedge.service.http.schemas import StudyResult
from retinaedge.service.lanes import Lane
from retinaedge.service.results.built import rows_version
from retinaedge.service.results.key_images import StudyImages, study_images
from retinaedge.service.results.rows import version_of_rows
from retinaedge.service.results.views import StudyView
from retinaedge.service.routes.picking import MODEL_QUERY, pick_one
from retinaedge.service.state import FORMATS_EXTENSION, Services, ServicesDep, StudyFormat

router = APIRouter(tags=["studies"])

NOT_FOUND = "no instance of this Study Instance UID (or its results have expired)"


def _study(services: Services, uid: str, model: str | None) -> tuple[StudyImages, str, Lane, str] | None:
    """The study's key images so far of one model (:mod:`.picking`), the version of its documents
    (:func:`..results.built.rows_version`) and that model's lane; None for an unknown study."""
    every = services.store.study_rows_of_all(uid)
    if not every:
        return None
    lane = pick_one(services, model, every, "this study")
    rows = lane.store.study_rows(uid)
    sha = version_of_rows(rows) or lane.sha256  # the version of its newest result
    return study_images(uid, rows, services.identities.get), rows_version(rows), lane, sha


@router.get(
    "/v1/studies/{study_uid}",
    response_model=StudyResult,
    responses=problem_responses(400, 401, 404, 406),
    openapi_extra={FORMATS_EXTENSION: "study"},
)
async def study(
    study_uid: str, services: ServicesDep, fmt: StudyFormat, model: str | None = MODEL_QUERY
) -> Response:
    """The study's instances so far and those with findings."""
    check_uid(study_uid, "the Study Instance UID in the path")
    await services.settled()
    found = await asyncio.to_thread(_study, services, study_uid, model)
    if found is None:
        return problem(404, "not-found", NOT_FOUND)
    images, version, lane, sha = found
    assert fmt.study is not None  # the registry offers only formats that render studies
    view = StudyView(study_uid, images, lane.name, sha, version=version)
    return await fmt.study(view)
