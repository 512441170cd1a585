"""The FastAPI application: ``create_app(settings)``, a short factory.

It builds the app's :class:`~retinaedge.service.state.Services` (model bundle, worker, spool, store,
processor, result formats) onto ``app.state``, a lifespan that starts and stops them, the bearer-token and
request-log middleware, the one exception handler (problem documents, :mod:`.http.problems`), and includes the
routers of :mod:`.routes` (``POST /v1/detect`` is answered by a middleware inside those two,
:mod:`.routes.direct`). Transport, limits, auth, metrics and error mapping live in the service; image
logic stays in the runtime.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Response
from fastapi.exceptions import RequestValidationError
from retinaedge.runtime import logsafety
from retinaedge.runtime.backends.tensorrt.planning import Probe, default_probe
from retinaedge.runtime.errors import RetinaEdgeError, UnauthorizedError
from retinaedge.service.http.problems import (
    STORAGE_RETRY_AFTER_S,
    error_response,
    on_error,
    on_http_error,
    on_storage_error,
    on_validation_error,
    problem,
    problem_component,
)
from retinaedge.service.intake.spool import Spool
from retinaedge.service.outbox.destinations import TYPE_NAMES
from retinaedge.service.results.documents import DocumentRegistry
from retinaedge.service.routes import ROUTERS
from retinaedge.service.routes.direct import DirectDetect
from retinaedge.service.settings import Settings
from retinaedge.service.state import FORMATS_EXTENSION, Services, build_services
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz"})


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the inference worker, the STOW-RS processor (queueing what a restart left pending) and the
    C-STORE SCP; stop them in reverse order."""
    services: Services = app.state.services
    lanes = list(services.lanes.values())
    for lane in lanes:
        lane.worker.start()  # each loads its model and runs its self-test on its own thread
    try:
        for lane in lanes:
            lane.writer.start()
        recovered = services.processor.recover()
        if recovered:
            log.info("recovered %d pending instance(s) from the spool", recovered)
        for lifecycle in services.lifecycles.values():
            lifecycle.resume_shadow()  # a trial under way goes on
        services.processor.start()
        await asyncio.to_thread(services.dispatcher.start)
        services.dimse.start(asyncio.get_running_loop())  # after recover: its rows are enqueued as stored
    except BaseException:
        # Start-up failed: no thread of ours may outlive the interpreter (the inference thread alive at
        # exit ended in SIGABRT), so everything started is stopped before the error goes on.
        await services.processor.stop()
        await asyncio.to_thread(services.dispatcher.stop)
        await _stop_lanes(services)
        raise
    yield
    await asyncio.to_thread(services.dimse.stop)
    await services.processor.stop()
    await asyncio.to_thread(services.dispatcher.stop)
    await _stop_lanes(services)
    await asyncio.to_thread(services.built.close)
    services.clock.close()
    services.store.close()


async def _stop_lanes(services: Services) -> None:
    """Stop every model's trial, opener (a background build), worker and writer."""
    for lifecycle in services.lifecycles.values():
        await asyncio.to_thread(lifecycle.stop)
    for lane in services.lanes.values():
        await asyncio.to_thread(lane.opener.stop)
        await asyncio.to_thread(lane.worker.stop)
        await asyncio.to_thread(lane.writer.stop)


class AuthAndLog:
    """Bearer token on every path but :data:`OPEN_PATHS` (when one is configured); one log line each.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` cost a task group and a memory stream per
    request (about 0.4 ms of a trivial request's 0.6 ms, measured in-process on this appliance's CPU).
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        token = settings.api_token
        self.expected = None if token is None else f"Bearer {token.get_secret_value()}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        if self.expected is not None and scope["path"] not in OPEN_PATHS:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(UnauthorizedError("missing or wrong bearer token"))
                await response(scope, receive, send)
                self._log(scope, response.status_code, start)
                return
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._log(scope, status[0], start)

    @staticmethod
    def _log(scope: Scope, status: int, start: float) -> None:
        route = scope.get("route")
        log.info(
            "%s %s -> %d in %.1f ms",
            scope["method"],
            getattr(route, "path", "(unmatched)"),
            status,
            (time.perf_counter() - start) * 1e3,
        )


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's schema plus the ``Problem`` component, on each negotiating route the media types of the
    formats registered (in ``app.state.services.formats``) when it is first generated, and the names the
    registries hold (destination types, document kinds) as enums of the members that carry them."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = problem_component()
        formats = app.state.services.formats
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                kind = operation.get(FORMATS_EXTENSION) if isinstance(operation, dict) else None
                if kind is None:
                    continue
                content = operation["responses"]["200"].setdefault("content", {})
                for media in formats.offered(kind):
                    content.setdefault(media, {"schema": {"type": "string", "format": "binary"}})
        _registry_enums(schema["components"]["schemas"], app.state.services.documents)
        app.openapi_schema = schema
        return schema

    return openapi


def _registry_enums(components: dict[str, Any], documents: DocumentRegistry) -> None:
    """The response models (service/http/schemas.py, below the rooms) type these members as strings;
    their values come from the registries: destination types and document kinds."""
    enums = {
        ("ExportDestinationStatus", "type"): list(TYPE_NAMES),
        ("ExportJob", "document"): documents.kinds(),
    }
    for (model, member), values in enums.items():
        prop = components.get(model, {}).get("properties", {}).get(member)
        if prop is not None:
            prop["enum"] = values
    items = components.get("ExportDestinationStatus", {}).get("properties", {}).get("documents", {})
    if isinstance(items.get("items"), dict):
        items["items"]["enum"] = documents.deliverable()


def unavailable_app(settings: Settings, reason: str) -> FastAPI:
    """The app served when the data volume cannot be used at start (read-only, I/O errors): ``/healthz``
    answers (the process is alive), ``/readyz`` and every other path 503 with the ``reason`` and
    ``Retry-After``, as docs/operations.md says; nothing is stored, nothing crashes in a loop."""
    app = FastAPI(title="retinaedge (storage unavailable)", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.unavailable = reason
    app.add_middleware(AuthAndLog, settings=settings)
    retry = {"Retry-After": str(STORAGE_RETRY_AFTER_S)}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> Response:
        return problem(503, "not-ready", reason, retry)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])
    async def anything(path: str) -> Response:
        return problem(503, "storage-unavailable", reason, retry)

    return app


def create_app(settings: Settings, *, probe: Probe = default_probe) -> FastAPI:
    """Build the app; the model loads in the worker thread when the lifespan starts.

    ``probe`` returns this device's fingerprint and capabilities for the backend choice (the real
    TensorRT/pycuda probe by default; tests pass a fixed fingerprint).
    """
    logsafety.install()  # no dependency's log line carries a DICOM value (also when embedded)
    try:
        services = build_services(settings, probe)
    except (OSError, sqlite3.Error) as exc:  # the data volume is read-only or failing: 503, no crash loop
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        try:
            volume = Spool(settings.data_dir / "spool", 0).unwritable_reason()
        except OSError as probed:
            volume = f"the spool cannot be made ({probed.strerror or type(probed).__name__})"
        found = f"{type(exc).__name__}: {what}" + (f"; {volume}" if volume else "")
        reason = (
            f"the data directory {settings.data_dir} cannot be used ({found}): nothing is taken until the "
            "volume is fixed and the service restarted"
        )
        log.error("storage unavailable at start: %s", reason)
        return unavailable_app(settings, reason)
    version = str(services.bundle.manifest.exporter.get("version", ""))
    app = FastAPI(title="retinaedge", version=version, lifespan=lifespan)
    app.state.services = services
    # Shortcuts kept for callers that reach into a running app (tests, the TensorRT drills).
    app.state.settings = settings
    app.state.worker = services.worker
    app.state.opener = services.opener
    app.state.store = services.store
    app.add_middleware(DirectDetect)  # added first: it runs inside the auth and the request log
    app.add_middleware(AuthAndLog, settings=settings)
    app.add_exception_handler(RetinaEdgeError, on_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    for storage_error in (OSError, sqlite3.Error):  # the spool or database failed: 503, retried
        app.add_exception_handler(storage_error, on_storage_error)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app
