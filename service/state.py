"""What the routes share: one :class:`Services` per app, on ``app.state.services``.

``create_app`` builds it (:func:`build_services`); a route gets it through the ``ServicesDep``
dependency, never from a module global, so several apps can live in one process (as the tests run them).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from retinaedge.runtime.backends.tensorrt.planning import Probe
from retinaedge.runtime.bundle import Bundle
from retinaedge.runtime.dicomio import Limits
from retinaedge.runtime.errors import RequestError, UnknownModelError
from retinaedge.runtime.intended_use import NotApplicableError
from retinaedge.runtime.manifest import Manifest
from retinaedge.runtime.signing import TrustedKey
from retinaedge.service.clock import CLOCK_FILE, ServiceClock
from retinaedge.service.dimse.receive import Receiver
from retinaedge.service.dimse.scp import DimseServer
from retinaedge.service.http.metrics import Metrics
from retinaedge.service.intake.spool import Spool
from retinaedge.service.intake.stow import backlog_admission
from retinaedge.service.lanes import Lane, Router, bound_titles, build_lane, load_bundles, new_worker
from retinaedge.service.lifecycle import Lifecycle
from retinaedge.service.outbox.building import ModelSource
from retinaedge.service.outbox.delivery import Dispatcher
from retinaedge.service.outbox.metrics import DeliveryCollector
from retinaedge.service.pipeline.opener import DetectorOpener
from retinaedge.service.pipeline.processor import Processor
from retinaedge.service.pipeline.stages import InferenceWorker
from retinaedge.service.results.built import BUILT, BuiltDocuments
from retinaedge.service.results.captures import CAPTURES, CaptureFiles, CaptureMaker, adopt_rows
from retinaedge.service.results.documents import DOCUMENTS, DocumentRegistry
from retinaedge.service.results.evidence import IdentityFiles, migrate
from retinaedge.service.results.formats import FormatRegistry, ResultFormat, default_formats, document_format
from retinaedge.service.results.retention import Pruner
from retinaedge.service.results.store import Store
from retinaedge.service.results.views import Scope
from retinaedge.service.results.writer import ResultWriter
from retinaedge.service.settings import Settings
from retinaedge.service.versions.registry import MODELS, ModelVersions, active_bundle

log = logging.getLogger(__name__)


@dataclass
class Services:
    """The models (:class:`~retinaedge.service.lanes.Lane`, one per bundle) and everything around them,
    for one app. ``bundle``, ``opener``, ``worker``, ``store`` and ``writer`` are the first model's (the
    one of ``GET /v1/model``)."""

    settings: Settings
    lanes: dict[str, Lane]
    lifecycles: dict[str, Lifecycle]  # each model's versions, trial and switches (service/lifecycle.py)
    router: Router
    limits: Limits
    metrics: Metrics
    spool: Spool
    identities: IdentityFiles
    prune: Pruner
    processor: Processor
    formats: FormatRegistry  # media type -> renderer, for Accept (service/results/formats.py)
    documents: DocumentRegistry  # the result documents by kind (service/results/documents.py)
    admit: Callable[[], None]  # raises OverloadedError while the STOW-RS backlog is full
    dispatcher: (
        Dispatcher  # result delivery: the outbox and its delivery threads (service/outbox/delivery.py)
    )
    dimse: DimseServer  # the C-STORE SCP (idle when dimse_port is 0)
    captures: CaptureFiles  # the secondary captures and overlay PNGs (service/results/captures.py)
    built: BuiltDocuments  # the SRs and GSPSs built once per result (service/results/built.py)
    clock: ServiceClock  # service time: retention, back-off, series quiet periods (service/clock.py)
    uid_key: bytes = field(default_factory=lambda: secrets.token_bytes(16), repr=False)

    @property
    def first(self) -> Lane:
        return next(iter(self.lanes.values()))

    @property
    def bundle(self) -> Bundle:
        return self.first.bundle

    @property
    def opener(self) -> DetectorOpener:
        return self.first.opener

    @property
    def worker(self) -> InferenceWorker:
        return self.first.worker

    @property
    def store(self) -> Store:
        return self.first.store

    @property
    def writer(self) -> ResultWriter:
        return self.first.writer

    @property
    def model_name(self) -> str:
        return self.bundle.manifest.name

    @property
    def model_sha256(self) -> str:
        return str(self.bundle.manifest.model_sha256)

    def lane(self, name: str) -> Lane:
        """The model ``name`` (404 ``unknown-model`` naming those served)."""
        lane = self.lanes.get(name)
        if lane is None:
            raise UnknownModelError(
                f"no model {name!r} is served here; the models are {', '.join(self.lanes)}"
            )
        return lane

    async def settled(self) -> None:
        """Wait (10 s at most) until the /v1/detect results kept so far are committed: a route that reads
        results calls it first, so that a client reads its own writes."""
        for lane in self.lanes.values():
            if not lane.writer.settle(0):
                await asyncio.to_thread(lane.writer.settle, 10.0)

    def uid_hash(self, uid: str) -> str:
        """A keyed hash for logs: correlates requests without writing the UID itself."""
        return hmac.new(self.uid_key, uid.encode(), hashlib.sha256).hexdigest()[:12]


def log_operating_point(manifest: Manifest) -> None:
    """Say at start-up at which operating point the model is read (docs/models.md, "Operating point")."""
    point = manifest.operating_point
    if point is None:
        log.info(
            "model %s has no operating point: every detection (down to its score threshold %.2f) is a "
            "finding and every result document shows it; set one with retinaedge eval "
            "--choose-operating-point",
            manifest.name,
            manifest.postprocess.score_thresh,
        )
        return
    thresholds = ", ".join(f"{c} {t:.3f}" for c, t in point.score_thresholds.items())
    log.info("model %s: findings at its operating point (%s)", manifest.name, thresholds)


def log_signatures(trusted: list[TrustedKey] | None) -> None:
    """Say once at start-up whether model bundles must be signed (docs/models.md, "Signed bundles")."""
    if not trusted:
        log.info("model signatures are not checked (no trusted_keys): any bundle in the models volume runs")
        return
    log.info("the model bundle's signature verified; bundles must be signed by one of %d trusted key(s): %s",
             len(trusted), ", ".join(k.fingerprint for k in trusted))  # fmt: skip


def log_intended_use(manifest: Manifest) -> None:
    """Say once at start-up which images the model is run on (docs/models.md, "Intended use")."""
    use = manifest.intended_use
    if use is None:
        log.info(
            "model %s declares no intended use: it infers every image it can read; set one with "
            "retinaedge intended-use --set",
            manifest.name,
        )
        return
    log.info("model %s takes only images within its intended use (%s)", manifest.name,
             ", ".join(r.name for r in use.rules))  # fmt: skip


def import_document_libraries() -> None:
    """Import what the result documents and the captures import lazily (highdicom, OpenCV, pydicom's
    encoders), on this thread, before the threads that build them run: the first import of one package
    from several threads at once can fail (importlib's ``_DeadlockError``, or an ``ImportError`` from a
    partly initialised module), seen with the export threads and the processor making captures."""
    import cv2  # noqa: F401
    import highdicom  # noqa: F401
    import pydicom.pixels.encoders  # noqa: F401


def build_services(settings: Settings, probe: Probe) -> Services:
    """Load the bundles and wire each model's lane, the spool, store, processor and delivery (nothing is
    started here)."""
    import_document_libraries()
    trusted = settings.trusted()
    bundles = load_bundles(settings, trusted)
    log_signatures(trusted)
    for bundle in bundles:
        log_operating_point(bundle.manifest)
        log_intended_use(bundle.manifest)
    limits = Limits(
        max_frames=settings.max_frames,
        max_frame_bytes=settings.max_frame_bytes,
        max_decoded_bytes=settings.max_decoded_bytes,
        max_file_bytes=settings.max_body_bytes,
    )
    spool = Spool(settings.data_dir / "spool", settings.min_free_bytes)
    store = Store(settings.data_dir / "state.sqlite3")
    floor = store.latest_time()
    clock = ServiceClock(settings.data_dir / CLOCK_FILE, floor=floor if floor is not None else -math.inf)
    store.clock = clock
    identities = IdentityFiles(settings.data_dir / "identity")
    migrate(store, identities)
    captures = CaptureFiles(settings.data_dir / CAPTURES)
    adopt_rows(store, captures, [b.manifest.name for b in bundles])  # rows of the one model there was
    identities.keep_only(store.uids())  # files of results pruned or never recorded (a crash between)
    captures.keep_only(store.keys())  # likewise, and makings a crash interrupted
    built = BuiltDocuments(settings.data_dir / BUILT)
    built.keep_only(store.subjects())
    prune = Pruner(
        store,
        identities,
        settings.prune_interval_s,
        settings.results_max_age_s,
        settings.results_max_bytes,
        captures,
        settings.captures_max_bytes,
        built,
    )

    def make_captures(manifest: Manifest) -> CaptureMaker | None:
        # Secondary captures cost about an inference per frame with findings: made only when asked for.
        if settings.captures != "always":
            return None
        return CaptureMaker(captures, manifest, limits, identities)

    titles = bound_titles(settings, [b.manifest.name for b in bundles])
    registries = {
        b.manifest.name: ModelVersions(settings.data_dir / MODELS / b.manifest.name, b.manifest.name,
                                       settings.model_versions_kept)
        for b in bundles
    }  # fmt: skip
    bundles = [
        active_bundle(registries[b.manifest.name], entry.path, b, trusted)
        for entry, b in zip(settings.bundles(), bundles, strict=True)
    ]
    served = {
        b.manifest.name: settings.for_model(entry)
        for entry, b in zip(settings.bundles(), bundles, strict=True)
    }
    lanes = {
        b.manifest.name: build_lane(
            served[b.manifest.name],
            b,
            store,
            limits,
            probe,
            lambda bound, drawing: ResultWriter(bound, identities, prune, captures=drawing),
            make_captures,
            tuple(t for t, names in titles.items() if b.manifest.name in names),
        )
        for b in bundles
    }
    metrics = Metrics(lambda: sum(lane.worker.depth for lane in lanes.values()))
    for lane in lanes.values():
        lane.worker.on_batch = metrics.batch_frames.observe

    def declined(exc: NotApplicableError) -> None:
        metrics.not_applicable_to(exc.model, [f.rule for f in exc.failures])

    router = Router(lanes, titles, on_declined=declined)

    def worker_maker(own: Settings) -> Callable[[Bundle], tuple[DetectorOpener, InferenceWorker]]:
        def make(bundle: Bundle) -> tuple[DetectorOpener, InferenceWorker]:
            opener = DetectorOpener(own, bundle, limits, probe)
            worker = new_worker(own, opener)
            worker.on_batch = metrics.batch_frames.observe
            return opener, worker

        return make

    lifecycles = {
        name: Lifecycle(lane, registries[name], worker_maker(served[name]), trusted)
        for name, lane in lanes.items()
    }

    async def after_result(model: str, path: Path, body: dict[str, Any]) -> None:
        await lifecycles[model].observe(path, body)  # the silent trial of another version, if any

    documents = DOCUMENTS
    first = bundles[0].manifest
    dispatcher = Dispatcher(
        settings,
        store,
        identities,
        first.name,
        str(first.model_sha256),
        documents,
        manifest=first,
        built=built,
        clock=clock,
        sources={
            name: ModelSource(lane.store, name, lane.sha256, lane.bundle.manifest, lane.manifest_for)
            for name, lane in lanes.items()
        },
    )
    metrics.registry.register(DeliveryCollector(dispatcher))

    def on_outcome(outcome: str) -> None:
        metrics.outcome(outcome)
        dispatcher.wake()  # the result's export jobs were enqueued with it (service/outbox/queue.py)

    processor = Processor(
        store,
        spool,
        lanes,
        on_outcome=on_outcome,
        after_each=prune,
        concurrency=(settings.processing_concurrency or settings.max_batch_size) * len(lanes),
        on_not_applicable=declined,
        limits=limits,
        identities=identities,
        route=router.for_title(None),
        after_result=after_result,
    )
    admit = backlog_admission(
        store, settings.max_pending_instances, settings.max_pending_bytes, settings.retry_after_s
    )
    receiver = Receiver(
        spool,
        store,
        limits,
        identities,
        admit,
        settings.max_body_bytes,
        enqueue=processor.enqueue,
        route_for=router.for_title,
        titles=frozenset(titles),
    )
    return Services(
        settings=settings,
        lanes=lanes,
        lifecycles=lifecycles,
        router=router,
        limits=limits,
        metrics=metrics,
        spool=spool,
        identities=identities,
        prune=prune,
        processor=processor,
        captures=captures,
        built=built,
        formats=default_formats(documents, built),
        documents=documents,
        admit=admit,
        dispatcher=dispatcher,
        dimse=DimseServer(settings, receiver, metrics.registry),
        clock=clock,
    )


def services_of(request: Request) -> Services:
    """This app's :class:`Services`."""
    services: Services = request.app.state.services
    return services


async def get_services(request: Request) -> Services:
    """The dependency: this app's :class:`Services`. ``async``: FastAPI runs a plain ``def`` dependency
    in its thread pool, a thread hop on every request for an attribute lookup."""
    return services_of(request)


ServicesDep = Annotated[Services, Depends(get_services)]


FORMATS_EXTENSION = "x-result-formats"
"""The OpenAPI operation member naming the scope of result a route negotiates (see ``negotiated``)."""


def negotiated(scope: Scope) -> Callable[..., Awaitable[ResultFormat]]:
    """A dependency: the registered format the request's ``Accept`` asks for (406 when none fits), or,
    with ``?document=KIND``, that result document (400 unknown kind, 404 not one of this ``scope``, 406
    its media type not accepted).

    A route using it declares ``openapi_extra={FORMATS_EXTENSION: scope}``, so ``/openapi.json`` lists
    the formats registered when the schema is generated.
    """
    kinds = ", ".join(DOCUMENTS.kinds(scope))
    described = Query(
        default=None,
        max_length=64,
        description=f"this result document ({kinds}) in its own media type, instead of the format "
        "negotiated from Accept",
    )

    def choose(request: Request, document: str | None, frame: int | None) -> ResultFormat:
        services = services_of(request)
        accept = request.headers.get("accept")
        if document is None:
            if frame is not None:
                raise RequestError("frame goes with ?document=KIND (a document made per frame: sc)")
            return services.formats.select(scope, accept)
        return document_format(
            services.documents,
            scope,
            document,
            accept,
            data_dir=services.settings.data_dir,
            frame=frame,
            built=services.built,
        )

    async def dependency(  # async: no thread hop (see get_services)
        request: Request, document: str | None = described
    ) -> ResultFormat:
        return choose(request, document, None)

    async def per_frame(
        request: Request,
        document: str | None = described,
        frame: int | None = Query(
            default=None,
            ge=1,
            le=2**31 - 1,
            description="with a document made per frame (sc): the frame's, by its number from 1",
        ),
    ) -> ResultFormat:
        return choose(request, document, frame)

    return per_frame if scope == "instance" else dependency


InstanceFormat = Annotated[ResultFormat, Depends(negotiated("instance"))]
SeriesFormat = Annotated[ResultFormat, Depends(negotiated("series"))]
StudyFormat = Annotated[ResultFormat, Depends(negotiated("study"))]
