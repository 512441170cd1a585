"""Secondary captures and overlay PNGs: made once when a result is recorded, kept as files, served as is.

For every frame of a done instance that has findings (:func:`.selection.findings_by_frame`) the service keeps
two files: the DICOM Secondary Capture of the frame with its findings burned in (:func:`.sc.build_sc`, the
result document ``sc``) and the same pixels as a PNG (``GET /v1/results/{uid}/frames/{n}/overlay.png``).
They are made where the frame's pixels can still be had, by :meth:`CaptureMaker.make`, which reads the
instance *again*, from the spooled file (STOW-RS, C-STORE: the processor, before the spool file is
released) or the request's bytes (``/v1/detect``: the result writer): only the frames with findings are
decoded, one at a time, windowed exactly as for the model (:func:`retinaedge.runtime.frames.seen_frames`),
drawn (:func:`retinaedge.runtime.overlay.burn_in`), encoded and written. So the pipeline keeps no pixels
for them: a making holds one frame at a time.

Layout: ``<data_dir>/captures/<hash of the SOP Instance UID>/<frame number>.dcm`` and ``.png`` (frame
numbers 1-based, as in DICOM; owner-only, fsynced). A result's files are replaced as a whole
(:meth:`CaptureFiles.install`: made in a temporary directory, then renamed into place) and removed with the
result (retention: :meth:`CaptureFiles.delete`; at start: :meth:`CaptureFiles.keep_only`). The SCs carry the
patient's identity, like the identity files (:mod:`.evidence`), so they live beside them, not in the
database.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinaedge.runtime.dicomio import DEFAULT_LIMITS, Limits
from retinaedge.runtime.durable import fsync_path
from retinaedge.runtime.frames import seen_frames
from retinaedge.runtime.instance_result import Detection
from retinaedge.runtime.manifest import Manifest
from retinaedge.runtime.overlay import burn_in, png_bytes
from retinaedge.service.results.evidence import IdentityFiles, header_from_json
from retinaedge.service.results.rows import subject_key
from retinaedge.service.results.sc import NOTICE, build_sc
from retinaedge.service.results.selection import findings_by_frame
from retinaedge.service.results.storage import STORAGE_ERRORS
from retinaedge.service.results.views import InstanceView, NothingToReport, Unavailable

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from retinaedge.service.results.store import Store

log = logging.getLogger(__name__)

#: The captures' folder under the data directory.
CAPTURES = "captures"


def _detection(d: dict[str, Any]) -> Detection:
    """A stored detection (JSON) as the runtime's."""
    x1, y1, x2, y2 = (float(v) for v in d["box"])
    return Detection(str(d["label"]), int(d["class_id"]), float(d["score"]), (x1, y1, x2, y2))


def _write(path: Path, data: bytes) -> None:
    """``data`` into a new owner-only file, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class CaptureMaker:
    """Makes captures (:meth:`make`) for ``manifest``'s model within ``limits``, into ``files``."""

    def __init__(
        self,
        files: CaptureFiles,
        manifest: Manifest,
        limits: Limits = DEFAULT_LIMITS,
        identities: IdentityFiles | None = None,
    ) -> None:
        self.files = files
        self.manifest = manifest
        self.limits = limits
        self.identities = identities

    def keep(self, uid: str, source: bytes | Path, result: dict[str, Any], evidence: str | None) -> None:
        """Make and install the captures of the result ``result`` of ``uid`` (:meth:`make`), its header
        the kept ``evidence`` (DICOM JSON) with the identity file of ``uid``. Storage errors
        (:data:`.storage.STORAGE_ERRORS`) are raised, for the caller to retry; any other failure is logged
        and the result goes without captures (they are not made, and earlier ones are removed)."""
        made = None
        try:
            if evidence is not None and findings_by_frame(result):
                identity = self.identities.get(uid) if self.identities is not None else None
                made = self.make(source, result, header_from_json(evidence, identity))
        except STORAGE_ERRORS:
            raise
        except Exception as exc:  # the result stands without its captures
            log.warning("secondary captures not made: %s", type(exc).__name__)
        self.files.install(subject_key(self.manifest.name, uid), made)

    def make(self, source: bytes | Path, result: dict[str, Any], header: Dataset) -> Path | None:
        """The captures of one instance, in a new temporary directory for :meth:`CaptureFiles.install`;
        None when no frame of ``result`` (its stored ``/v1/detect`` body) has findings.

        ``source`` is the instance (its file or bytes: read again, the frames with findings decoded one at
        a time), ``header`` its kept header (:func:`.evidence.header_from_json`, with the identity).
        Raises what reading, drawing or writing raises (the temporary directory is removed then).
        """
        wanted = findings_by_frame(result)
        if not wanted:
            return None
        m = self.manifest
        sha = str(m.model_sha256)
        made = Path(tempfile.mkdtemp(dir=self.files.root, prefix=".made-"))
        try:
            for index, chw in seen_frames(source, list(wanted), m.preprocessing, m.input, self.limits):
                findings = wanted[index]
                drawn = burn_in(chw, [_detection(d) for d in findings], NOTICE)
                sc = build_sc(header, index, drawn.image, findings, m.name, sha)
                buf = io.BytesIO()
                sc.save_as(buf, enforce_file_format=True)
                _write(made / f"{index + 1}.dcm", buf.getvalue())
                _write(made / f"{index + 1}.png", png_bytes(drawn.image))
            fsync_path(made)
        except BaseException:
            shutil.rmtree(made, ignore_errors=True)
            raise
        return made


class CaptureFiles:
    """The captures of the results kept, under ``root`` (module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._installing = threading.Lock()  # one replacement at a time

    def path(self, uid: str) -> Path:
        """The directory of one instance's captures (it may not exist); ``uid`` here and below is the
        result's key (:func:`.store.subject_key`: the model and the instance)."""
        return self.root / hashlib.sha256(uid.encode()).hexdigest()[:40]

    def adopt(self, adopted: Iterable[tuple[str, str]], served: Iterable[str]) -> int:
        """Move the captures of rows written before several models (kept under the bare UID) to the key of
        the model that adopted them (``(uid, model)``, :meth:`.upkeep.Upkeep.adopt_unnamed`); returns how
        many moved. Idempotent, so an adoption a crash interrupted is finished by the next start: a folder
        already moved stays, and one an interrupted attempt moved to another of the ``served`` models (the
        settings changed in between) moves on to ``model``. Fsynced before it returns (the caller commits
        the adoption next)."""
        served = list(served)
        moved = 0
        for uid, model in adopted:
            target = self.path(subject_key(model, uid))
            if target.exists():
                continue
            sources = [uid, *(subject_key(m, uid) for m in served if m != model)]
            source = next((self.path(s) for s in sources if self.path(s).is_dir()), None)
            if source is not None:
                os.replace(source, target)
                moved += 1
        if moved:
            fsync_path(self.root)
            log.info("captures of %d instance(s) of before several models moved to their model", moved)
        return moved

    def install(self, uid: str, made: Path | None) -> None:
        """Make ``made`` (from :meth:`CaptureMaker.make`) the captures of ``uid``, replacing any it had;
        None removes them (the new result has no findings)."""
        final = self.path(uid)
        old = None
        if made is None and not final.exists():
            return
        with self._installing:
            if final.exists():
                old = Path(tempfile.mkdtemp(dir=self.root, prefix=".old-"))
                os.replace(final, old / "captures")
            if made is not None:
                os.replace(made, final)
            fsync_path(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    # -- reading ----------------------------------------------------------------------------------------
    def frames(self, uid: str) -> dict[int, Path]:
        """Frame number (1-based) -> the SC file, for each frame of ``uid`` with a capture, in order."""
        try:
            names = os.listdir(self.path(uid))
        except FileNotFoundError:
            return {}
        numbers = sorted(int(n[:-4]) for n in names if n.endswith(".dcm") and n[:-4].isdigit())
        return {n: self.path(uid) / f"{n}.dcm" for n in numbers}

    def png(self, uid: str, frame_number: int) -> Path | None:
        """The overlay PNG of frame ``frame_number`` (1-based) of ``uid``, or None when there is none."""
        path = self.path(uid) / f"{frame_number}.png"
        return path if path.is_file() else None

    # -- retention --------------------------------------------------------------------------------------
    def delete(self, uids: Iterable[str]) -> None:
        for uid in uids:
            shutil.rmtree(self.path(uid), ignore_errors=True)

    def trim(self, max_bytes: int) -> int:
        """Remove the oldest instances' captures (by when they were made) until those kept take at most
        ``max_bytes`` of disk; returns how many instances lost theirs. Their results and other documents
        stay (``?document=sc`` and the overlay route then answer 404)."""
        kept: list[tuple[float, int, Path]] = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue  # a making or a replacement under way
            try:
                files = [f.stat() for f in path.iterdir()]
                made = path.stat().st_mtime
            except FileNotFoundError:  # replaced or removed meanwhile
                continue
            kept.append((made, sum(s.st_size for s in files), path))
        total = sum(size for _made, size, _path in kept)
        removed = 0
        for _made, size, path in sorted(kept, key=lambda k: k[0]):
            if total <= max_bytes:
                break
            with self._installing:
                shutil.rmtree(path, ignore_errors=True)
            total -= size
            removed += 1
        if removed:
            log.info("captures of %d instance(s) removed: over captures_max_bytes", removed)
        return removed

    def keep_only(self, uids: Iterable[str]) -> int:
        """Remove the captures of instances the database no longer knows, and unfinished makings."""
        known = {self.path(uid).name for uid in uids}
        removed = 0
        for path in self.root.iterdir():
            if path.name in known:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("removed %d capture folder(s) of results no longer kept", removed)
        return removed


def adopt_rows(store: Store, captures: CaptureFiles, served: list[str]) -> list[tuple[str, str]]:
    """At start: give the rows written before several models a model (:meth:`.upkeep.Upkeep.adopt_unnamed`),
    their secondary captures moved to their new key *before* the adoption commits: a crash between the
    two leaves the rows unadopted and the next start finishes both (a capture already moved stays where
    it is), where moving after the commit would leave captures under a key no row has, which the sweep at
    start (:meth:`CaptureFiles.keep_only`) then deletes."""
    return store.adopt_unnamed(served, before_commit=lambda adopted: captures.adopt(adopted, served))


def sc_files(view: InstanceView, data_dir: Path) -> dict[int, Path]:
    """The stored document ``sc`` of a done instance: frame number (1-based) -> its Secondary Capture,
    for every frame with findings. :class:`.views.NothingToReport` when no frame has findings,
    :class:`.views.Unavailable` when they were not made (a result kept by an older version, or while
    too many ``/v1/detect`` bodies waited to be drawn)."""
    wanted = [i + 1 for i in findings_by_frame(view.result)]
    if not wanted:
        raise NothingToReport("no frame of this instance has findings, so there is no secondary capture")
    files = CaptureFiles(data_dir / CAPTURES).frames(view.key)
    if list(files) != wanted:
        raise Unavailable("the secondary captures of this result were not made; its other documents are")
    return files
