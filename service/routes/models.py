"""``GET /v1/models``: the models this appliance serves, each with its state, intended use and counts;
each model's versions: staging, activation, rollback and the silent trial (:mod:`..lifecycle`).

``POST /v1/models/{name}/detect`` (one model alone) lives with ``/v1/detect`` in :mod:`.detect`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from retinaedge.runtime.errors import ForbiddenError, UnsupportedMediaTypeError
from retinaedge.service.http.body import check_declared_length, idle_timeout
from retinaedge.service.http.problems import problem_responses
from retinaedge.service.http.schemas import ModelsList, ServedModel
from retinaedge.service.lanes import Lane
from retinaedge.service.lifecycle import Lifecycle
from retinaedge.service.state import Services, ServicesDep
from retinaedge.service.versions.registry import MODELS, UPLOADS
from retinaedge.service.versions.upload import Room, receive, unpack_archive

log = logging.getLogger(__name__)

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


# -- versions: staging, activation, rollback, the silent trial ------------------------------------------
TAR_TYPES = ("application/x-tar", "application/gzip", "application/x-gzip", "application/tar+gzip")


def _lifecycle(services: Services, name: str) -> Lifecycle:
    services.lane(name)  # 404 unknown-model
    return services.lifecycles[name]


def _changing(services: Services, name: str) -> Lifecycle:
    """The model's lifecycle for a request that changes what runs (stage, activate, rollback, trial):
    403 unless an API token is configured, which then guards it (the middleware)."""
    lifecycle = _lifecycle(services, name)
    if services.settings.api_token is None:
        raise ForbiddenError(
            "changing a model's versions over HTTP needs an API token (set api_token); the token guards "
            "what runs next to the scanner"
        )
    return lifecycle


@router.get("/v1/models/{name}/versions", responses=problem_responses(401, 404))
async def versions(name: str, services: ServicesDep) -> Response:
    """The model's versions: the active one, the previous one, the one on trial, each with its check."""
    return JSONResponse(_lifecycle(services, name).describe())


@router.post(
    "/v1/models/{name}/versions",
    status_code=202,
    responses=problem_responses(400, 401, 403, 404, 408, 413, 415, 422, 507),
)
async def stage(name: str, request: Request, services: ServicesDep) -> Response:
    """Stage a new version: the body is the bundle directory as a tar archive (gzip or not). Its signature
    is checked (with trusted_keys), it is moved in, then loaded and self-tested in the background (its
    ``check`` in ``GET .../versions``). Needs an API token to be configured. It takes at most the archive
    and its unpacked files on the data volume (507 before either would eat into the disk reserve:
    :mod:`..versions.upload`)."""
    lifecycle = _changing(services, name)
    settings = services.settings
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in TAR_TYPES:
        raise UnsupportedMediaTypeError(
            f"expected a tar archive ({', '.join(TAR_TYPES)}), got {media or 'none'!r}"
        )
    declared = check_declared_length(request.headers, settings.max_bundle_bytes)
    work = settings.data_dir / MODELS / UPLOADS
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    room = Room(work, settings.min_free_bytes)
    room.check(declared or 0, "the archive")  # 507 before a byte is written (the unpacked files: below)
    folder = Path(tempfile.mkdtemp(dir=work))
    try:
        archive = folder / "bundle.tar"
        chunks = idle_timeout(request.stream(), settings.request_idle_timeout_s)
        await receive(chunks, archive, settings.max_bundle_bytes, room)
        bundle = folder / "bundle"
        bundle.mkdir()
        await asyncio.to_thread(unpack_archive, archive, bundle, settings.max_bundle_bytes, room)
        version = await asyncio.to_thread(lifecycle.stage, bundle, True)
    finally:
        await asyncio.to_thread(shutil.rmtree, folder, True)
    log.info("model %s: version %s staged over HTTP", name, version)
    return JSONResponse(
        {"model": name, "version": version, "check": lifecycle.checks.get(version)}, status_code=202
    )


@router.post("/v1/models/{name}/activate", responses=problem_responses(400, 401, 404, 409))
async def activate(
    name: str, services: ServicesDep, version: str = Query(min_length=1, max_length=64)
) -> Response:
    """Serve ``version`` from now on: it is warmed beside the active one, then takes every later instance;
    instances in flight finish on the old version."""
    lifecycle = _changing(services, name)
    return JSONResponse(await asyncio.to_thread(lifecycle.activate, version))


@router.post("/v1/models/{name}/rollback", responses=problem_responses(401, 404, 409))
async def rollback(name: str, services: ServicesDep) -> Response:
    """Serve the previously active version again, the same way as ``activate``."""
    lifecycle = _changing(services, name)
    return JSONResponse(await asyncio.to_thread(lifecycle.rollback))


@router.post("/v1/models/{name}/shadow", responses=problem_responses(400, 401, 404, 409))
async def start_trial(
    name: str, services: ServicesDep, version: str = Query(min_length=1, max_length=64)
) -> Response:
    """Run ``version`` silently beside the active one on the same instances (its results are compared,
    never returned, exported or kept as results)."""
    lifecycle = _changing(services, name)
    return JSONResponse(await asyncio.to_thread(lifecycle.set_shadow, version))


@router.delete("/v1/models/{name}/shadow", responses=problem_responses(401, 404))
async def end_trial(name: str, services: ServicesDep) -> Response:
    """End the trial."""
    lifecycle = _changing(services, name)
    return JSONResponse(await asyncio.to_thread(lifecycle.set_shadow, None))


@router.get("/v1/models/{name}/shadow", responses=problem_responses(401, 404))
async def trial_report(name: str, services: ServicesDep) -> Response:
    """How the version on trial agrees with the active one: the share of frames whose boxes match by the
    export's parity rule, detections gained and lost per class, latency."""
    return JSONResponse(_lifecycle(services, name).report())
