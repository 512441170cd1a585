"""The service's routes, one router per concern; ``create_app`` includes :data:`ROUTERS` in this order.

* :mod:`.operations`: ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/model``
* :mod:`.detect`: ``POST /v1/detect`` (synchronous inference of one instance)
* :mod:`.dicomweb`: ``POST /dicomweb/studies[/{study}]`` (STOW-RS, processed in the background)
* :mod:`.results`: ``GET /v1/results/{uid}`` (JSON or any registered format)
* :mod:`.series`: ``/v1/series/{uid}`` and ``POST /v1/series/{uid}/complete`` (3D findings)
* :mod:`.studies`: ``GET /v1/studies/{uid}`` (the study so far: its images with findings, the KOS)
* :mod:`.deliveries`: ``GET /v1/exports[/{id}]``, ``POST /v1/exports/retry`` (result delivery, the outbox)

A new route goes in the router of its concern (or a new module listed here), takes what it needs from
``ServicesDep`` (:mod:`retinaedge.service.state`), raises
:class:`~retinaedge.runtime.errors.RetinaEdgeError` for errors, and declares its response model.
"""

from __future__ import annotations

from fastapi import APIRouter
from retinaedge.service.routes import (
    deliveries,
    detect,
    dicomweb,
    models,
    operations,
    results,
    series,
    studies,
)

ROUTERS: tuple[APIRouter, ...] = (
    operations.router,
    detect.router,
    models.router,
    dicomweb.router,
    results.router,
    series.router,
    studies.router,
    deliveries.router,
)

__all__ = ["ROUTERS"]
