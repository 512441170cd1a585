"""``POST /v1/detect`` without FastAPI's per-request machinery: the hot path of the appliance.

FastAPI still declares the route (its OpenAPI document, every other method and path). This plain ASGI
middleware, inside the auth and request-log middleware, answers ``POST /v1/detect`` itself: it calls the
same endpoint function (:func:`~.detect.detect`) with the same ``Request`` and the app's ``Services``, and
turns an exception into a response with the app's own exception handlers, looked up by the exception's
class as Starlette's exception middleware looks them up. An exception no handler takes goes on out, to
the server-error middleware, as it would from the router. The answers are the route's, byte for byte;
what is skipped is route matching over every route, the dependency resolution (one attribute lookup
here), and two middleware layers per request. Measured in the service at saturation, about 0.1 ms of
the event loop's CPU a request on a 2-vCPU Xeon (docs/operations.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fastapi.routing import APIRoute
from retinaedge.service.routes.detect import detect, router
from retinaedge.service.state import services_of
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

#: The one path served directly, and its method.
PATH, METHOD = "/v1/detect", "POST"

Handler = Callable[[Request, Exception], Any]


class DirectDetect:
    """ASGI middleware: ``POST /v1/detect`` straight to its endpoint (module docstring); anything else to
    ``app``. Add it before the auth and log middleware (so that it runs inside them)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._route: APIRoute | None = None
        self._handlers: dict[Any, Handler] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != METHOD:
            await self.app(scope, receive, send)
            return
        if self._handlers is None:
            self._learn(scope["app"])
        scope["route"] = self._route  # as the router sets it (the request log names the route)
        request = Request(scope, receive, send)
        try:
            response = await detect(request, services_of(request))
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            if inspect.iscoroutinefunction(handler):
                response = await handler(request, exc)
            else:  # as Starlette runs a plain function handler: in its thread pool
                response = await run_in_threadpool(handler, request, exc)
        await response(scope, receive, send)

    def _learn(self, app: Any) -> None:
        """The route :mod:`.detect` declares for the path, and the app's exception handlers (once)."""
        self._route = next(
            (
                r
                for r in router.routes
                if isinstance(r, APIRoute) and r.path == PATH and METHOD in (r.methods or ())
            ),
            None,
        )
        # 500 and Exception go to the server-error middleware, outside (as Starlette builds its stack).
        self._handlers = {k: h for k, h in app.exception_handlers.items() if k not in (500, Exception)}

    def _handler_for(self, exc: Exception) -> Handler | None:
        """The handler Starlette's exception middleware would take: one registered for the status of an
        ``HTTPException``, else the one of the nearest class of ``exc`` in its MRO."""
        assert self._handlers is not None
        if isinstance(exc, HTTPException) and exc.status_code in self._handlers:
            return self._handlers[exc.status_code]
        for cls in type(exc).__mro__:
            if cls in self._handlers:
                return self._handlers[cls]
        return None
