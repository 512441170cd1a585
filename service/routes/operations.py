"""Operations: liveness, readiness, Prometheus metrics and the model in use."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from retinaedge.service.http.problems import problem, problem_responses
from retinaedge.service.http.schemas import Health, ModelInfo, Ready
from retinaedge.service.state import ServicesDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
async def healthz() -> dict[str, str]:
    """The process is alive (open: no bearer token needed)."""
    return {"status": "alive"}


@router.get("/readyz", response_model=Ready, responses=problem_responses(401, 503))
async def readyz(services: ServicesDep) -> Response:
    """Ready to take instances: model loaded, golden self-test passed, spool and database writable and the
    disk above the reserve, results being recorded (else 503 with the reason); ``degraded`` (still 200) lists export
    problems."""
    worker, retry = services.worker, {"Retry-After": str(services.settings.retry_after_s)}
    several = len(services.lanes) > 1
    for lane in services.lanes.values():  # ready when every model is
        named = f"model {lane.name}: " if several else ""
        if lane.worker.state != "ready":
            return problem(503, "not-ready", f"{named}{lane.worker.reason}", retry)
        if (down := lane.opener.unavailable()) is not None:
            return problem(503, "not-ready", f"{named}{down}", retry)
    unwritable = (
        await asyncio.to_thread(services.spool.unwritable_reason)
        or await asyncio.to_thread(services.store.unwritable_reason)
        or services.spool.reserve_reason()
        or services.processor.problem
        or next((lane.writer.problem for lane in services.lanes.values() if lane.writer.problem), None)
    )
    unwritable = unwritable or services.dimse.not_ready_reason
    if unwritable is not None:
        return problem(503, "not-ready", unwritable, retry)
    degraded = services.dispatcher.degraded()  # still takes instances; results wait in the outbox
    damage = services.store.damage
    if damage is not None:  # found at start, rebuilt: said until the next start
        degraded = [damage.describe(), *degraded]
    dimse = services.dimse.describe()
    return JSONResponse(
        {
            **({"dimse": dimse} if dimse is not None else {}),
            "status": "degraded" if degraded else "ready",
            "degraded": degraded,
            "backend": worker.backend,
            "backend_reason": worker.backend_reason,
            "precision": worker.precision,
            "reason": worker.reason,
            "self_test": worker.self_test,
            "engine": services.opener.describe(),
            "model": services.model_name,
            "models": {
                name: {"backend": lane.worker.backend, "precision": lane.worker.precision}
                for name, lane in services.lanes.items()
            },
            "clock": services.clock.describe(),
            **({"database": damage.to_json()} if damage is not None else {}),
        }
    )


@router.get("/v1/model", response_model=ModelInfo, responses=problem_responses(401))
async def model(services: ServicesDep) -> Response:
    """The bundle's manifest and the backend serving it."""
    worker = services.worker
    body: dict[str, Any] = {
        **services.bundle.manifest.to_dict(),
        "backend": {
            "name": worker.backend,
            "state": worker.state,
            "reason": worker.backend_reason or worker.reason,
            "precision": worker.precision,
            "engine": services.opener.describe(),
        },
    }
    return JSONResponse(body)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
        },
        **problem_responses(401),
    },
)
async def prometheus(services: ServicesDep) -> Response:
    """Per-stage latency, queue depth, instances by outcome and the backend in use."""
    worker = services.worker
    state = "unavailable" if worker.state == "ready" and services.opener.unavailable() else worker.state
    services.metrics.set_backend(worker.backend, state)
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
