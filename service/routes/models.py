"""``GET /v1/models``: the models this appliance serves, each with its state, intended use and counts.

``POST /v1/models/{name}/detect`` (one model alone) lives with ``/v1/detect`` in :mod:`.detect`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from retinaedge.service.http.problems import problem_responses
from retinaedge.service.http.schemas import ModelsList, ServedModel
from retinaedge.service.lanes import Lane
from retinaedge.service.state import ServicesDep

router = APIRouter(tags=["models"])


def describe(lane: Lane, counts: dict[str, int]) -> dict[str, Any]:
    """One model as ``GET /v1/models`` lists it."""
    manifest = lane.bundle.manifest
    worker = lane.worker
    state = "unavailable" if worker.state == "ready" and lane.opener.unavailable() else worker.state
    return {
        "name": lane.name,
        "sha256": lane.sha256,
        "state": state,
        "reason": worker.reason,
        "backend": worker.backend,
        "precision": worker.precision,
        "class_names": list(manifest.class_names),
        "intended_use": manifest.intended_use.to_dict() if manifest.intended_use is not None else None,
        "operating_point": manifest.operating_point is not None,
        "ae_titles": list(lane.ae_titles),
        "instances": {k: counts.get(k, 0) for k in ("pending", "done", "failed", "not_applicable")},
    }


@router.get("/v1/models", response_model=ModelsList, responses=problem_responses(401))
async def models(services: ServicesDep) -> Response:
    """Every model served, in the order of the settings (the first is ``GET /v1/model``'s)."""
    counts = [await asyncio.to_thread(lane.store.counts) for lane in services.lanes.values()]
    listed = [describe(lane, c) for lane, c in zip(services.lanes.values(), counts, strict=True)]
    return JSONResponse({"models": listed})


@router.get("/v1/models/{name}", response_model=ServedModel, responses=problem_responses(401, 404))
async def one_model(name: str, services: ServicesDep) -> Response:
    """One model, as ``GET /v1/models`` lists it (404 ``unknown-model``)."""
    lane = services.lane(name)
    return JSONResponse(describe(lane, await asyncio.to_thread(lane.store.counts)))
