"""RFC 9457 problem documents: the one place errors become HTTP responses.

Every 4xx/5xx the service sends is ``application/problem+json`` built by :func:`problem`; a
:class:`~retinaedge.runtime.errors.RetinaEdgeError` raised anywhere in a handler is mapped by
:func:`on_error` (installed by ``create_app``) through its own ``http_status`` and ``type``; an
``OSError`` or SQLite error that reaches the app is a storage fault (:func:`on_storage_error`: 503 with
``Retry-After``, 507 for a full disk), never a 500.
:func:`problem_responses` declares those documents in ``/openapi.json``.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from retinaedge.runtime.errors import (
    OverloadedError,
    RetinaEdgeError,
    StorageUnavailableError,
    UnauthorizedError,
)
from retinaedge.service.http.schemas import Problem

log = logging.getLogger(__name__)

#: ``Retry-After`` (s) of a 503 for a storage error.
STORAGE_RETRY_AFTER_S = 30

PROBLEM = "application/problem+json"
PROBLEM_SCHEMA_REF = "#/components/schemas/Problem"

_DESCRIPTIONS = {
    400: "Bad request (malformed DICOM, a cut file, a malformed multipart body ...)",
    401: "Missing or wrong bearer token (when the service has one)",
    404: "Unknown, or its result has expired",
    406: "None of the media types this resource offers is acceptable (``offered`` lists them)",
    408: "The request body stopped arriving for longer than the idle timeout",
    413: "Over a size or decode budget",
    415: "Unsupported media type, transfer syntax or photometric interpretation",
    422: "Not an image (no pixel data), or outside the model's intended use (not-applicable, with the rules)",
    503: "Not ready or overloaded; see Retry-After",
    507: "The spool disk is below its reserve",
}


def problem(
    status: int,
    type_: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """An RFC 9457 problem document; ``extra`` adds extension members (e.g. ``offered``)."""
    body = {
        "type": f"urn:retinaedge:error:{type_}",
        "title": type_.replace("-", " "),
        "status": status,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def retry_after(exc: RetinaEdgeError) -> int | None:
    """The seconds after which a retry may succeed (503 overloaded or storage unavailable), or None."""
    return exc.retry_after if isinstance(exc, OverloadedError | StorageUnavailableError) else None


def _extra(exc: RetinaEdgeError) -> dict[str, Any]:
    extra = {"offered": list(offered)} if (offered := getattr(exc, "offered", None)) is not None else {}
    members = getattr(exc, "problem_members", None)  # extension members an error adds (rules, model)
    if callable(members):
        extra.update(members())
    return extra


def error_response(exc: RetinaEdgeError) -> JSONResponse:
    """The problem document of an error, with ``Retry-After`` (503 overloaded or storage unavailable) or
    ``WWW-Authenticate``."""
    retry = retry_after(exc)
    headers = {"Retry-After": str(retry)} if retry is not None else None
    if isinstance(exc, UnauthorizedError):
        headers = {"WWW-Authenticate": 'Bearer realm="retinaedge"'}
    return problem(exc.http_status, exc.type, str(exc), headers, **_extra(exc))


def error_members(exc: RetinaEdgeError) -> dict[str, Any]:
    """The members of ``exc``'s problem document as an object inside a response body (one model's error
    in a ``/v1/detect`` answer of several models), ``retry_after`` (s) among them when a retry may
    succeed."""
    retry = retry_after(exc)
    body: dict[str, Any] = {
        "type": f"urn:retinaedge:error:{exc.type}",
        "title": exc.type.replace("-", " "),
        "status": exc.http_status,
        "detail": str(exc),
        **_extra(exc),
    }
    if retry is not None:
        body["retry_after"] = retry
    return body


async def on_error(_request: Request, exc: Exception) -> JSONResponse:
    """The exception handler for :class:`RetinaEdgeError` (registered once, in ``create_app``)."""
    if not isinstance(exc, RetinaEdgeError):  # registered for RetinaEdgeError only; never expected
        raise exc
    return error_response(exc)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries documenting a problem document for each status."""
    return {
        status: {
            "description": _DESCRIPTIONS.get(status, "Error"),
            "content": {PROBLEM: {"schema": {"$ref": PROBLEM_SCHEMA_REF}}},
        }
        for status in statuses
    }


def problem_component() -> dict[str, Any]:
    """The ``Problem`` schema for ``components.schemas`` (referenced by :func:`problem_responses`)."""
    return Problem.model_json_schema(ref_template="#/components/schemas/{model}")


async def on_http_error(_request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (an unknown route, a method not allowed) as problem documents too."""
    status = int(getattr(exc, "status_code", 500))
    detail = str(getattr(exc, "detail", "") or "")
    type_ = {404: "not-found", 405: "method-not-allowed"}.get(
        status, "bad-request" if status < 500 else "internal-error"
    )
    headers = getattr(exc, "headers", None)
    return problem(status, type_, detail or type_.replace("-", " "), headers)


async def on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """A request FastAPI cannot bind to a route's parameters: 400 with what did not fit."""
    errors: list[dict[str, Any]] = getattr(exc, "errors", lambda: [])()
    where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors[:5])
    return problem(400, "bad-request", f"the request does not fit this route ({where or 'invalid'})")


async def on_storage_error(_request: Request, exc: Exception) -> JSONResponse:
    """An ``OSError`` or SQLite error no route mapped (the spool or database failed under a request): 503
    with ``Retry-After`` (507 for a full disk), one warning line, no traceback: the client retries."""
    status, type_ = 503, "storage-unavailable"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        status, type_ = 507, "insufficient-storage"
    what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    log.warning("storage failed under a request: %s: %s", type(exc).__name__, what)
    detail = f"storage is unavailable ({type(exc).__name__}: {what}); nothing was stored, retry later"
    return problem(status, type_, detail, {"Retry-After": str(STORAGE_RETRY_AFTER_S)})
