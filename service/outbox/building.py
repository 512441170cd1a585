"""Builds an outbox job's document from the kept results (:mod:`.delivery` sends it).

A job names its document's kind, subject and model (:class:`~.queue.Job`); :class:`DocumentBuilder`
reads that model's rows (:class:`ModelSource`: its bound store, and the manifest of the version that
produced a result), makes the view the kind's builder takes (:mod:`retinaedge.service.results.views`)
and builds it, through the built documents the routes serve too (one SOP instance per version of its
subject), or returns a stored document's files. :class:`NoDocument` says why there is none to send;
:class:`NothingToSend` that the subject has nothing to show (dropped, not dead-lettered).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinaedge.runtime.manifest import Manifest
from retinaedge.service.outbox.records import Job
from retinaedge.service.results.built import BuiltDocuments, result_version, rows_version
from retinaedge.service.results.completion import series_findings
from retinaedge.service.results.documents import DocumentRegistry
from retinaedge.service.results.evidence import IdentityFiles
from retinaedge.service.results.key_images import study_images
from retinaedge.service.results.rows import version_of_rows
from retinaedge.service.results.store import Store
from retinaedge.service.results.views import InstanceView, NothingToReport, SeriesView, StudyView, Unavailable

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from retinaedge.service.settings import Settings


class NoDocument(Exception):
    """The job's document cannot be built (its result is gone, or cannot be represented)."""


class NothingToSend(NoDocument):
    """The job's document has nothing to show (its subject has no findings): dropped, not dead."""


@dataclass(frozen=True)
class ModelSource:
    """One model's results, as the dispatcher builds its documents: its bound store, its name and
    sha256, its manifest (class codes, operating point)."""

    store: Store
    name: str
    sha256: str
    manifest: Manifest | None = None
    #: The manifest of the version whose sha256 a result records (documents show its classes and codes).
    manifest_for: Callable[[str | None], Manifest] | None = None

    def version(self, result: dict[str, Any]) -> tuple[str, Manifest | None]:
        """(the sha256 of the version that produced ``result``, its manifest)."""
        sha = result.get("model", {}).get("sha256") or self.sha256
        return sha, self.manifest_for(sha) if self.manifest_for is not None else self.manifest


class DocumentBuilder:
    """The documents of jobs, from the results of ``sources`` (by model name)."""

    def __init__(
        self,
        settings: Settings,
        sources: Mapping[str, ModelSource],
        identities: IdentityFiles,
        documents: DocumentRegistry,
        built: BuiltDocuments | None,
    ) -> None:
        self.settings = settings
        self.sources = sources
        self.identities = identities
        self.documents = documents
        self.built = built

    def _kept(
        self, kind: str, view: Any, build: Callable[[], Dataset]
    ) -> Callable[[], Dataset | dict[int, Path]]:
        """The document ``kind`` of ``view`` as the file the routes serve too (:mod:`..results.built`:
        one SOP instance, built once per version of its subject), or built here without that store."""
        built = self.built
        if built is None or not view.version:
            return build
        return lambda: {1: built.file(view.key, kind, view.version, build)}

    def build(self, job: Job) -> Dataset | dict[int, Path]:
        """The job's document, by its kind's builder, from an instance's result or a series' findings,
        or a stored document's files by part (raises :class:`NoDocument`)."""
        doc = self.documents.get(job.document_kind)
        if doc is None:  # written by another version of the service
            raise NoDocument(f"this service cannot build a {job.document_kind!r} document")
        src = self.sources.get(job.model)
        if src is None:
            raise NoDocument(f"the model {job.model!r} whose result it shows is no longer served")
        if doc.scope == "instance":
            row = src.store.get(job.subject_uid)
            if row is None or row.state != "done":
                raise NoDocument("the instance's result is no longer kept (retention) or not done")
            identity = self.identities.get(job.subject_uid)
            result = row.result() or {}
            sha, manifest = src.version(result)
            view = InstanceView(
                uid=job.subject_uid,
                result=result,
                header_json=row.header_json,
                model_name=src.name,
                model_sha256=sha,
                identity=identity,
                manifest=manifest,
                version=result_version(row.result_json, row.header_json, identity),
            )
            data_dir = self.settings.data_dir
            build: Callable[[], Dataset | dict[int, Path]]
            if doc.stored:
                build = lambda: doc.parts(view, data_dir)  # noqa: E731
            else:
                build = self._kept(doc.kind, view, lambda: doc.build_instance(view))
        elif doc.scope == "study":
            rows = src.store.study_rows(job.subject_uid)
            if not rows:
                raise NoDocument("no instance of the study is kept (retention)")
            images = study_images(job.subject_uid, rows, self.identities.get)
            sha = version_of_rows(rows) or src.sha256  # the version of its newest result
            study = StudyView(job.subject_uid, images, src.name, sha, version=rows_version(rows))
            build = self._kept(doc.kind, study, lambda: doc.build_study(study))
        else:
            rows = src.store.series_rows(job.subject_uid)
            sha = version_of_rows(rows) or src.sha256  # the version of its newest result
            manifest = src.manifest_for(sha) if src.manifest_for is not None else src.manifest
            params = self.settings.link_params(manifest is not None and manifest.operating_point is not None)
            found = series_findings(rows, params, self.identities.get)
            if found is None:
                raise NoDocument("no instance of the series is kept that could be analysed")
            series = SeriesView(
                job.subject_uid, {}, found, src.name, sha, manifest=manifest, version=rows_version(rows)
            )
            build = self._kept(doc.kind, series, lambda: doc.build_series(series))
        try:
            return build()
        except NothingToReport as exc:
            raise NothingToSend(str(exc)) from exc
        except Unavailable as exc:
            raise NoDocument(str(exc)) from exc
        except OSError:  # writing the built file: storage, retried as writing the outbox's file is
            raise
        except Exception as exc:  # e.g. an SOP class highdicom cannot reference
            raise NoDocument(f"no {doc.title} can be built ({type(exc).__name__})") from exc
