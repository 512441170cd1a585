"""Result export: ``GET /v1/exports`` (destinations and jobs), ``GET /v1/exports/{id}`` (one job and
its attempts), ``POST /v1/exports/retry`` (dead-lettered jobs queued again).

Destinations' state comes from the dispatcher's summary in memory; jobs are read from SQLite in a thread.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse, Response
from retinaedge.service.http.problems import problem, problem_responses
from retinaedge.service.http.schemas import ExportJob, ExportsRetried, ExportsStatus
from retinaedge.service.state import Services, ServicesDep

router = APIRouter(tags=["exports"])

#: Members that are service timestamps (:mod:`retinaedge.service.clock`), shown as the wall clock reads.
_TIMES = (
    "created_at",
    "next_attempt_at",
    "finished_at",
    "started_at",
    "oldest_pending_at",
    "last_delivered_at",
    "at",
)


def _shown(services: Services, item: dict[str, Any]) -> dict[str, Any]:
    """``item`` with its timestamps converted from service time to the wall clock (nested: one level)."""
    wall = services.clock.wall_of
    out = {k: wall(v) if k in _TIMES and isinstance(v, float | int | None) else v for k, v in item.items()}
    for k, v in out.items():
        if isinstance(v, dict) and k == "last_attempt":
            out[k] = _shown(services, v)
    return out


@router.get("/v1/exports", response_model=ExportsStatus, responses=problem_responses(400, 401))
async def exports(
    services: ServicesDep,
    state: Literal["pending", "delivered", "dead"] | None = Query(
        default=None, description="jobs in this state"
    ),
    destination: str | None = Query(default=None, description="jobs of this destination"),
    limit: int = Query(default=100, ge=0, le=1000, description="at most this many jobs"),
) -> Response:
    """The export destinations (state, jobs by state, attempts, duplicates) and the newest jobs."""
    dispatcher = services.dispatcher
    jobs = await asyncio.to_thread(dispatcher.outbox.jobs, state, destination, limit)
    return JSONResponse(
        {
            "destinations": [_shown(services, d) for d in dispatcher.summary()],
            "jobs": [_shown(services, j.to_json()) for j in jobs],
        }
    )


@router.get("/v1/exports/{job_id}", response_model=ExportJob, responses=problem_responses(400, 401, 404))
async def export_job(services: ServicesDep, job_id: int = Path(ge=1, le=2**62)) -> Response:
    """One job with every attempt."""
    outbox = services.dispatcher.outbox
    job = await asyncio.to_thread(outbox.job, job_id)
    if job is None:
        return problem(404, "not-found", "no export job with this id (or it has expired)")
    history = await asyncio.to_thread(outbox.attempts, job_id)
    return JSONResponse(
        {**_shown(services, job.to_json()), "history": [_shown(services, h) for h in history]}
    )


@router.post("/v1/exports/retry", response_model=ExportsRetried, responses=problem_responses(400, 401, 404))
async def retry_dead(
    services: ServicesDep,
    destination: str | None = Query(default=None, description="only this destination's dead jobs"),
) -> Response:
    """Queue dead-lettered jobs again (attempts reset), e.g. once a destination's configuration is fixed."""
    dispatcher = services.dispatcher
    names = [d.name for d in dispatcher.destinations]
    if destination is not None:
        if destination not in names:
            return problem(404, "not-found", "no export destination of this name is configured")
        names = [destination]
    n = await asyncio.to_thread(dispatcher.outbox.requeue_dead, names)
    await asyncio.to_thread(dispatcher.refresh)
    dispatcher.wake()
    return JSONResponse({"requeued": n})
