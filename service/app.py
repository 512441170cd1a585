"""The FastAPI application: ``create_app(settings)`` with a lifespan that starts the inference worker.

Transport, limits, auth, metrics and error mapping live here; image logic stays in the runtime.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from retinaedge.runtime.bundle import load_bundle
from retinaedge.runtime.dicomio import Limits
from retinaedge.runtime.errors import (
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    RequestError,
    RetinaEdgeError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)

from .engines import Probe, default_probe
from .metrics import Metrics
from .opener import DetectorOpener
from .processor import Processor
from .series import SeriesFindings, SeriesStatus, series_findings, series_status
from .settings import Settings
from .spool import Spool
from .sr import build_series_sr, build_sr
from .store import Store
from .stow import backlog_admission, header_from_json, inspect, receive
from .worker import InferenceWorker

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
OPEN_PATHS = frozenset({"/healthz"})


def problem(status: int, type_: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An RFC 9457 problem document."""
    body = {
        "type": f"urn:retinaedge:error:{type_}",
        "title": type_.replace("-", " "),
        "status": status,
        "detail": detail,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def error_response(exc: RetinaEdgeError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, OverloadedError) else None
    if isinstance(exc, UnauthorizedError):
        headers = {"WWW-Authenticate": 'Bearer realm="retinaedge"'}
    return problem(exc.http_status, exc.type, str(exc), headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) from Content-Length alone when it declares more than ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError("Content-Length is not a number")
        if int(declared) > limit:
            raise PayloadTooLargeError(f"body of {declared} bytes exceeds the {limit}-byte limit")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLargeError(f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: Settings, *, probe: Probe = default_probe) -> FastAPI:
    """Build the app; the model loads in the worker thread when the lifespan starts.

    ``probe`` returns this device's fingerprint and capabilities for the backend choice (the real
    TensorRT/pycuda probe by default; tests pass a fixed fingerprint).
    """
    bundle = load_bundle(settings.model)
    limits = Limits(
        max_frames=settings.max_frames,
        max_frame_bytes=settings.max_frame_bytes,
        max_decoded_bytes=settings.max_decoded_bytes,
        max_file_bytes=settings.max_body_bytes,
    )
    uid_key = secrets.token_bytes(16)

    opener = DetectorOpener(settings, bundle, limits, probe)
    worker = InferenceWorker(
        opener,
        queue_size=settings.queue_size,
        max_age_s=settings.queue_max_age_s,
        retry_after_s=settings.retry_after_s,
    )
    opener.attach(worker)
    metrics = Metrics(lambda: worker.depth)
    spool = Spool(settings.data_dir / "spool", settings.min_free_bytes)
    store = Store(settings.data_dir / "state.sqlite3")

    last_prune = [-math.inf]  # time.monotonic() of the last retention pass

    def prune() -> None:
        """Retention, at most once per ``prune_interval_s``: a pass reads every kept result's size, too
        much work for every request."""
        now = time.monotonic()
        if now - last_prune[0] < settings.prune_interval_s:
            return
        last_prune[0] = now
        store.prune(settings.results_max_age_s, settings.results_max_bytes)

    processor = Processor(store, spool, worker, on_outcome=metrics.outcome, after_each=prune)
    admit = backlog_admission(
        store, settings.max_pending_instances, settings.max_pending_bytes, settings.retry_after_s
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        recovered = processor.recover()
        if recovered:
            log.info("recovered %d pending instance(s) from the spool", recovered)
        processor.start()
        yield
        await processor.stop()
        await asyncio.to_thread(opener.stop)
        await asyncio.to_thread(worker.stop)
        store.close()

    app = FastAPI(
        title="retinaedge", version=str(bundle.manifest.exporter.get("version", "")), lifespan=lifespan
    )
    app.state.worker = worker
    app.state.opener = opener
    app.state.store = store
    app.state.settings = settings

    def uid_hash(uid: str) -> str:
        """A keyed hash for logs: correlates requests without writing the UID itself."""
        return hmac.new(uid_key, uid.encode(), hashlib.sha256).hexdigest()[:12]

    @app.middleware("http")
    async def auth_and_log(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        token = settings.api_token
        if token is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {token.get_secret_value()}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return error_response(UnauthorizedError("missing or wrong bearer token"))
        response: Response = await call_next(request)
        route = request.scope.get("route")
        log.info(
            "%s %s -> %d in %.1f ms",
            request.method,
            getattr(route, "path", "(unmatched)"),
            response.status_code,
            (time.perf_counter() - start) * 1e3,
        )
        return response

    @app.exception_handler(RetinaEdgeError)
    async def on_error(_request: Request, exc: RetinaEdgeError) -> JSONResponse:
        return error_response(exc)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> Response:
        if worker.state != "ready":
            return problem(503, "not-ready", worker.reason, {"Retry-After": str(settings.retry_after_s)})
        unwritable = await asyncio.to_thread(spool.unwritable_reason) or processor.problem
        if unwritable is not None:
            return problem(503, "not-ready", unwritable, {"Retry-After": str(settings.retry_after_s)})
        return JSONResponse(
            {
                "status": "ready",
                "backend": worker.backend,
                "backend_reason": worker.backend_reason,
                "reason": worker.reason,
                "self_test": worker.self_test,
                "engine": opener.describe(),
                "model": bundle.manifest.name,
            }
        )

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        return {
            **bundle.manifest.to_dict(),
            "backend": {
                "name": worker.backend,
                "state": worker.state,
                "reason": worker.backend_reason or worker.reason,
                "engine": opener.describe(),
            },
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.set_backend(worker.backend, worker.state)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _record(data: bytes, body: dict[str, Any]) -> None:
        """Keep a /v1/detect result retrievable at /v1/results/{uid} (JSON and SR)."""
        sop_class, uid, study, series, header = inspect(data, limits)
        store.put_done(uid, sop_class, study, series, len(data), body, header)
        prune()

    @app.post("/v1/detect")
    async def detect(request: Request) -> Response:
        started = time.perf_counter()
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/dicom":
            raise UnsupportedMediaTypeError(
                f"expected Content-Type application/dicom, got {media or 'none'!r}"
            )
        try:
            data = await read_body(request, settings.max_body_bytes)
            if not data:
                raise RequestError("the request body is empty")
            future = worker.submit(data)
            result = await asyncio.wrap_future(future)
        except RetinaEdgeError as exc:
            metrics.outcome(exc.type)
            if isinstance(exc, (NotReadyError, OverloadedError)):
                log.warning("refused: %s", exc.type)
            raise
        metrics.outcome("ok")
        metrics.observe(result.timings_ms)
        body = result.to_json()
        body["backend"] = worker.backend
        body["backend_reason"] = worker.backend_reason
        try:
            await asyncio.to_thread(_record, data, body)
        except Exception as exc:  # the detections stand even if they cannot be kept for later retrieval
            log.warning("result not kept for /v1/results: %s", type(exc).__name__)
        body["timings_ms"]["request"] = round((time.perf_counter() - started) * 1e3, 3)
        log.info(
            "instance %s: %d frame(s), %d detection(s)",
            uid_hash(result.sop_instance_uid),
            len(result.frames),
            sum(len(f.detections) for f in result.frames),
        )
        return JSONResponse(body)

    @app.post("/dicomweb/studies")
    @app.post("/dicomweb/studies/{study}")
    async def stow(request: Request, study: str | None = None) -> Response:
        outcome = await receive(
            request.stream(),
            request.headers.get("content-type", ""),
            spool=spool,
            store=store,
            limits=limits,
            max_instance_bytes=settings.max_body_bytes,
            max_request_bytes=settings.max_request_bytes,
            study_uid=study,
            enqueue=processor.enqueue,
            admit=admit,
            idle_timeout_s=settings.request_idle_timeout_s,
        )
        for _, _, _, why in outcome.failed:
            metrics.outcome("stow-rejected")
            log.info("STOW-RS part rejected: %s", why.split(":")[0])
        log.info("STOW-RS: %d stored, %d failed", len(outcome.referenced), len(outcome.failed))
        base = str(request.base_url).rstrip("/") + "/v1/results"
        return JSONResponse(
            outcome.to_dicom_json(base), status_code=outcome.status, media_type="application/dicom+json"
        )

    async def sr_response(build: Callable[[], Any], what: str) -> Response:
        """``build()`` (a pydicom SR dataset, built in a thread) as ``application/dicom``; 406 when the
        source headers cannot be represented in an SR (e.g. an unknown SOP class)."""

        def encode() -> bytes:
            buf = io.BytesIO()
            build().save_as(buf, enforce_file_format=True)
            return buf.getvalue()

        try:
            return Response(await asyncio.to_thread(encode), media_type="application/dicom")
        except Exception as exc:
            log.warning("DICOM SR of a %s not built: %s", what, type(exc).__name__)
            return problem(
                406,
                "not-acceptable",
                f"no DICOM SR can be built for this {what} ({type(exc).__name__}); the JSON result is available",
            )

    @app.get("/v1/results/{uid}")
    async def results(uid: str, request: Request) -> Response:
        accept = request.headers.get("accept", "application/json").lower()
        want_sr = "application/dicom" in accept and "json" not in accept
        row = await asyncio.to_thread(store.get, uid)
        if row is not None and row.state == "done" and want_sr:
            if not row.header_json:
                return problem(406, "not-acceptable", "no source header was kept for this instance")
            header_json = row.header_json
            return await sr_response(
                lambda: build_sr(
                    header_from_json(header_json),
                    row.result() or {},
                    bundle.manifest.name,
                    str(bundle.manifest.model_sha256),
                ),
                "instance",
            )
        if row is None:
            return problem(
                404, "not-found", "no instance with this SOP Instance UID (or its result has expired)"
            )
        if row.state == "pending":
            return JSONResponse(
                {"sop_instance_uid": uid, "state": "pending"}, status_code=202, headers={"Retry-After": "1"}
            )
        if row.state == "failed":
            return JSONResponse(
                {
                    "sop_instance_uid": uid,
                    "state": "failed",
                    "error": {"type": row.error_type, "message": row.error_message},
                }
            )
        return JSONResponse({**(row.result() or {}), "state": "done"})

    def _series_state(uid: str) -> tuple[SeriesStatus, SeriesFindings | None] | None:
        """The series' status and, once complete, its findings; None for an unknown series."""
        rows = store.series_rows(uid)
        if not rows:
            return None
        status = series_status(rows, time.time(), settings.series_quiet_s, store.series_requested_at(uid))
        if status.state != "complete":
            return status, None
        return status, series_findings(rows, settings.link_params())

    async def _series_answer(uid: str, request: Request) -> Response:
        state = await asyncio.to_thread(_series_state, uid)
        if state is None:
            return problem(
                404, "not-found", "no instance of this Series Instance UID (or its results have expired)"
            )
        status, found = state
        body: dict[str, Any] = {"series_instance_uid": uid, **status.to_json()}
        if status.state != "complete":
            body["quiet_period_s"] = settings.series_quiet_s
            return JSONResponse(body, status_code=202, headers={"Retry-After": str(status.retry_after_s)})
        accept = request.headers.get("accept", "application/json").lower()
        if "application/dicom" in accept and "json" not in accept:
            if found is None:
                return problem(406, "not-acceptable", "no instance of this series could be analysed")
            return await sr_response(
                lambda: build_series_sr(
                    found.headers, found.result, bundle.manifest.name, str(bundle.manifest.model_sha256)
                ),
                "series",
            )
        body["model"] = {"name": bundle.manifest.name, "sha256": str(bundle.manifest.model_sha256)}
        if found is None:
            body.update({"stack": None, "findings": [], "left_out": []})
        else:
            linked = found.result.to_json()
            linked.pop("series_instance_uid")
            linked.pop("instances")
            body.update({**linked, "left_out": found.left_out})
        log.info(
            "series %s: complete (%s), %d finding(s)",
            uid_hash(uid),
            status.completed_by,
            len(body["findings"]),
        )
        return JSONResponse(body)

    @app.get("/v1/series/{series_uid}")
    async def series(series_uid: str, request: Request) -> Response:
        return await _series_answer(series_uid, request)

    @app.post("/v1/series/{series_uid}/complete")
    async def complete_series(series_uid: str, request: Request) -> Response:
        """Treat the series as complete now (its pending instances still finish first)."""
        known = await asyncio.to_thread(store.series_rows, series_uid)
        if not known:
            return problem(
                404, "not-found", "no instance of this Series Instance UID (or its results have expired)"
            )
        await asyncio.to_thread(store.request_series_complete, series_uid)
        return await _series_answer(series_uid, request)

    return app
