"""The models of one appliance: a :class:`Lane` per bundle, and the routing of an instance to them.

Each model of the ``models`` setting (or the one of ``model``) gets its own lane: its bundle, its
detector opener and inference worker (own backend, batching and warm-up), its view of the results store
(:meth:`~retinaedge.service.results.store.Store.bound`: results are per instance and model), its writer
of ``/v1/detect`` results and its maker of secondary captures. A lane is named by its manifest's name,
which every result, document and export job of it carries; two bundles of one name are refused.

:class:`Router` decides, from an instance's header alone, which lanes take it: every lane whose intended
use accepts it (:mod:`retinaedge.runtime.intended_use`), among the lanes the called AE title is bound to
(``dimse_ae_titles``, a model's ``ae_titles``; ``dimse_ae_title`` and HTTP reach every lane). The others
record it as ``not-applicable`` with the rules they failed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from retinaedge.runtime.backends.tensorrt.planning import Probe
from retinaedge.runtime.bundle import Bundle, load_bundle
from retinaedge.runtime.dicomio import Limits
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.intended_use import Failure, NotApplicableError
from retinaedge.runtime.manifest import Manifest
from retinaedge.runtime.signing import TrustedKey
from retinaedge.service.intake.ingest import Routing
from retinaedge.service.pipeline.batching import BatchPolicy
from retinaedge.service.pipeline.opener import DetectorOpener
from retinaedge.service.pipeline.stages import InferenceWorker
from retinaedge.service.results.captures import CaptureMaker
from retinaedge.service.results.rows import Declined
from retinaedge.service.results.store import Store
from retinaedge.service.results.writer import ResultWriter
from retinaedge.service.settings import Settings

log = logging.getLogger(__name__)

#: What a model's name may be: it names a folder under ``data_dir/models`` and a path segment of the API.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class Lane:
    """One model of the appliance and what runs it (module docstring)."""

    name: str
    bundle: Bundle
    opener: DetectorOpener
    worker: InferenceWorker
    store: Store  # bound to this model
    writer: ResultWriter
    captures: CaptureMaker | None  # None: captures=never
    ae_titles: tuple[str, ...] = ()  # the extra AE titles bound to it
    #: A capture maker for a version's manifest (None: captures=never).
    make_captures: Callable[[Manifest], CaptureMaker | None] = lambda _m: None
    #: The manifest of every version that served here since start, by model sha256 (documents of a
    #: result are built with the manifest of the version that produced it).
    manifests: dict[str, Manifest] = field(default_factory=dict)

    _makers: dict[str, CaptureMaker | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.manifests[self.sha256] = self.bundle.manifest
        self.writer.captures_for = self.captures_for

    @property
    def sha256(self) -> str:
        return str(self.bundle.manifest.model_sha256)

    #: Finds the manifest of a version not served since start (the model's versions; set by its lifecycle).
    lookup: Callable[[str], Manifest | None] = lambda _sha: None

    def manifest_for(self, sha256: str | None) -> Manifest:
        """The manifest of the version ``sha256`` (a result's ``model.sha256``): documents show that
        version's classes and codes. The active one's only when the version is no longer kept (logged)."""
        if not sha256 or sha256 == self.sha256:
            return self.bundle.manifest
        found = self.manifests.get(sha256) or self.lookup(sha256)
        if found is None:
            log.warning("model %s: version %s is no longer kept; its documents use the active version's "
                        "manifest", self.name, sha256[:12])  # fmt: skip
            return self.bundle.manifest
        self.manifests[sha256] = found
        return found

    def captures_for(self, result: dict[str, Any]) -> CaptureMaker | None:
        """The capture maker of the version that produced ``result`` (a ``/v1/detect`` body): its frames
        are drawn with that version's preprocessing and labelled with its name and sha256."""
        sha = result.get("model", {}).get("sha256")
        if self.captures is None or not sha or sha == self.sha256:
            return self.captures
        maker = self._makers.get(sha)
        if maker is None:
            maker = self._makers[sha] = self.make_captures(self.manifest_for(sha))
        return maker

    def swap(
        self, bundle: Bundle, opener: DetectorOpener, worker: InferenceWorker
    ) -> tuple[DetectorOpener, InferenceWorker]:
        """Serve ``bundle`` with ``worker`` (started and ready) from now on; returns the old opener and
        worker (still finishing what they admitted)."""
        old = self.opener, self.worker
        captures = self.make_captures(bundle.manifest)
        self.manifests[str(bundle.manifest.model_sha256)] = bundle.manifest
        self.bundle, self.opener, self.worker, self.captures = bundle, opener, worker, captures
        self.writer.captures = captures
        return old

    def failures(self, ds: Any) -> list[Failure]:
        """The intended-use rules the header ``ds`` fails for this model (none: it takes the instance)."""
        use = self.bundle.manifest.intended_use
        return [] if use is None else use.check(ds)


def load_bundles(settings: Settings, trusted: list[TrustedKey] | None) -> list[Bundle]:
    """Every bundle of the settings, signatures checked; ConfigError for two bundles of one name."""
    bundles = [load_bundle(entry.path, trusted=trusted) for entry in settings.bundles()]
    names = [b.manifest.name for b in bundles]
    unsafe = [n for n in names if not SAFE_NAME.fullmatch(n)]
    if unsafe:
        raise ConfigError(
            f"model name {unsafe[0]!r} cannot name a model here (its folder under data_dir/models and its "
            "/v1/models/{name} path): use letters, digits, '.', '_' or '-', at most 64, export it again "
            "with --name"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(
            f"models: more than one bundle is named {', '.join(twice)}; a model is known by its manifest's "
            "name (results, documents, /v1/models): export them under distinct names"
        )
    return bundles


def new_worker(settings: Settings, opener: DetectorOpener) -> InferenceWorker:
    """A lane's inference worker with the settings' queue, batching and reader pool."""
    worker = InferenceWorker(
        opener,
        queue_size=settings.queue_size,
        max_age_s=settings.queue_max_age_s,
        retry_after_s=settings.retry_after_s,
        policy=BatchPolicy(
            max_batch_size=settings.max_batch_size,
            delay_s=settings.batch_delay_ms / 1e3,
            preferred=tuple(sorted(set(settings.preferred_batch_sizes))),
        ),
        prepare_threads=settings.prepare_threads,
        max_frames_in_flight=settings.max_frames_in_flight,
        reader_processes=settings.reader_processes,
    )
    opener.attach(worker)
    return worker


def bound_titles(settings: Settings, names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """AE title -> the models it runs (``dimse_ae_titles`` and each model's ``ae_titles``); ConfigError
    for a title bound to a model that is not served."""
    titles: dict[str, tuple[str, ...]] = {}
    for title, models in settings.dimse_ae_titles.items():
        unknown = [m for m in models if m not in names]
        if unknown or not models:
            raise ConfigError(
                f"dimse_ae_titles: {title.strip()!r} is bound to {unknown or 'no model'}; the models served "
                f"are {', '.join(names)}"
            )
        titles[title.strip()] = tuple(dict.fromkeys(models))
    for name, entry in zip(names, settings.bundles(), strict=True):
        for title in entry.ae_titles:
            titles[title.strip()] = (*titles.get(title.strip(), ()), name)
    return titles


class Router:
    """Which lanes take an instance (module docstring); ``on_declined(model, rules)`` counts a model's
    refusal (the metrics)."""

    def __init__(
        self,
        lanes: Mapping[str, Lane],
        titles: Mapping[str, tuple[str, ...]],
        on_declined: Callable[[NotApplicableError], None] = lambda _e: None,
    ) -> None:
        self.lanes = lanes
        self.titles = dict(titles)
        self.on_declined = on_declined

    def candidates(self, called_ae: str | None) -> list[str]:
        """The lanes a C-STORE to ``called_ae`` may reach (None, or the SCP's own title: all)."""
        if called_ae is not None and called_ae.strip() in self.titles:
            return list(self.titles[called_ae.strip()])
        return list(self.lanes)

    def route(self, ds: Any, called_ae: str | None = None) -> Routing:
        """``(the models that take it, {model: why not})`` from the header ``ds`` (nothing decoded)."""
        accepted: list[str] = []
        declined: dict[str, Declined] = {}
        for name in self.candidates(called_ae):
            failures = self.lanes[name].failures(ds)
            if not failures:
                accepted.append(name)
                continue
            exc = NotApplicableError(name, failures)
            self.on_declined(exc)
            declined[name] = Declined(str(exc), {"model": name, "rules": [f.to_json() for f in failures]})
        return accepted, declined

    def for_title(self, called_ae: str | None) -> Callable[[Any], Routing]:
        """:meth:`route` for instances sent to ``called_ae``."""
        return lambda ds: self.route(ds, called_ae)


def build_lane(
    settings: Settings,
    bundle: Bundle,
    store: Store,
    limits: Limits,
    probe: Probe,
    make_writer: Callable[[Store, CaptureMaker | None], ResultWriter],
    make_captures: Callable[[Manifest], CaptureMaker | None],
    ae_titles: tuple[str, ...] = (),
) -> Lane:
    """One lane, nothing started."""
    name = bundle.manifest.name
    opener = DetectorOpener(settings, bundle, limits, probe)
    worker = new_worker(settings, opener)
    bound = store.bound(name)
    captures = make_captures(bundle.manifest)
    writer = make_writer(bound, captures)
    return Lane(name, bundle, opener, worker, bound, writer, captures, ae_titles, make_captures)
