"""What is kept of an instance's header once the instance is gone, and where.

A DICOM SR of a result (``GET /v1/results/{uid}`` with ``Accept: application/dicom``, the series SR) is
built later from the source instance's header. Two parts of it are kept, each only as long as the
result (retention, ``results_max_age_s`` / ``results_max_bytes``):

- the **evidence** (:data:`EVIDENCE_KEYWORDS`: SOP, study, series and frame-of-reference UIDs, study
  date and time, modality, body part and laterality, the image geometry and pixel layout, the image's
  own grey-scale pipeline (rescale, window, Presentation LUT Shape: what a presentation state repeats so
  that the image shows as the site reads it), multi-frame functional groups), as DICOM JSON in the
  SQLite database (``header_json``). Nothing that names the patient.
- the **identity** (:data:`IDENTITY_KEYWORDS`: patient name, ID and its issuer, birth date, sex,
  accession number, referring physician; what the SR's patient and study modules repeat so that a PACS
  files it with its images), in one small file per instance under ``<data_dir>/identity/`` named by a
  hash of the SOP Instance UID (owner-only permissions).

Everything else in the header (institution, operators, addresses, descriptions, private elements) is
not kept at all. The database thus holds no patient name, ID or birth date, and removing an instance's
result removes its identity file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

#: Non-identifying attributes the result documents need (copied into them, or used for geometry,
#: references and the presentation state's grey-scale pipeline: PS3.3 C.11.1, C.11.2, C.11.6).
EVIDENCE_KEYWORDS = frozenset(
    {
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "SeriesInstanceUID",
        "SeriesNumber",
        "Modality",
        "BodyPartExamined",
        "Laterality",
        "ImageLaterality",
        "FrameOfReferenceUID",
        "PositionReferenceIndicator",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "SpacingBetweenSlices",
        "SliceLocation",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
        "WindowCenterWidthExplanation",
        "VOILUTFunction",
        "PresentationLUTShape",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
    }
)

#: What identifies the patient and the order: kept apart from the database (module docstring).
IDENTITY_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "ReferringPhysicianName",
    }
)


def split_header(fileobj: BinaryIO) -> tuple[str, str]:
    """The header of a PS3.10 file (read up to the pixel data) -> ``(evidence, identity)``, each DICOM
    JSON text (:func:`split_dataset`)."""
    import pydicom

    fileobj.seek(0)
    return split_dataset(pydicom.dcmread(fileobj, stop_before_pixels=True, force=False))


@functools.cache
def _wanted_tags() -> tuple[frozenset[int], frozenset[int]]:
    """(evidence tags, identity tags) as integers, from :data:`EVIDENCE_KEYWORDS` and
    :data:`IDENTITY_KEYWORDS`."""
    from pydicom.datadict import tag_for_keyword

    def tags(keywords: frozenset[str]) -> frozenset[int]:
        return frozenset(int(t) for t in map(tag_for_keyword, keywords) if t is not None)

    return tags(EVIDENCE_KEYWORDS), tags(IDENTITY_KEYWORDS)


#: The File Meta elements kept: media storage SOP class and instance, transfer syntax.
_META_TAGS = (0x00020002, 0x00020003, 0x00020010)
#: Those that repeat from instance to instance (the SOP class, the transfer syntax): looked up as evidence.
_CACHED_META_TAGS = frozenset({0x00020002, 0x00020010})


#: DICOM JSON of evidence elements already seen, by what determines it (:func:`_cached_json`): the
#: slices of a series repeat most of their evidence (study, frame of reference, geometry, pixel layout),
#: and their SOP class and transfer syntax. Only those: no patient identity stays in memory beyond its
#: request.
_EVIDENCE_JSON: dict[tuple[Any, ...], dict[str, Any]] = {}
_EVIDENCE_JSON_MAX = 4096


@dataclass(frozen=True)
class KeptHeader:
    """The parts of a header that are kept (:func:`select_header`), each as DICOM JSON already
    (``{"GGGGEEEE": element}``): ``evidence``, ``identity`` and ``meta`` (the kept File Meta elements). It
    holds no pixel data and no pydicom object, so it can wait in memory for a writer thread;
    :meth:`to_json` encodes it as text."""

    evidence: dict[str, Any]
    identity: dict[str, Any]
    meta: dict[str, Any]

    def to_json(self) -> tuple[str, str]:
        """``(evidence, identity)`` as DICOM JSON text (the evidence with its File Meta)."""
        return json.dumps({"meta": self.meta, "dataset": self.evidence}), json.dumps(self.identity)


@dataclass(frozen=True)
class EncodedHeader:
    """A :class:`KeptHeader` encoded already (where it was read: a reader process), as its
    :meth:`KeptHeader.to_json` gives it."""

    evidence: str
    identity: str

    def to_json(self) -> tuple[str, str]:
        return self.evidence, self.identity


@functools.cache
def _plain_evidence_tags() -> frozenset[int]:
    """Evidence tags whose dictionary VR is one VR (not ``US or SS``, whose value depends on the rest of
    the dataset) and not a sequence."""
    from pydicom.datadict import dictionary_VR

    return frozenset(
        t for t in _wanted_tags()[0] if " or " not in dictionary_VR(t) and dictionary_VR(t) != "SQ"
    )


def _simple(value: Any) -> bool:
    """A converted value whose ``repr`` is all its JSON depends on: text, numbers, or a list of them."""
    if isinstance(value, str | int | float):
        return True
    return isinstance(value, _pydicom()[2]) and all(isinstance(v, str | int | float) for v in value)


@functools.cache
def _pydicom() -> tuple[Any, Any, Any]:
    """pydicom's ``config``, ``RawDataElement`` and ``MultiValue`` (imported once, on first use)."""
    from pydicom import config
    from pydicom.dataelem import RawDataElement
    from pydicom.multival import MultiValue

    return config, RawDataElement, MultiValue


def _encoded(ds: Any, tags: Iterable[int]) -> dict[str, Any]:
    """The elements ``tags`` of ``ds`` present, as ``Dataset.to_json_dict(suppress_invalid_tags=True)``
    writes them (``{"GGGGEEEE": element}``, in the order given): converted as pydicom reads them, then
    encoded under strict reading (once for all of them); an element that fails either is left out."""
    config = _pydicom()[0]
    converted = []
    for tag in tags:
        try:
            converted.append((tag, ds[tag]))  # converts a raw element: an unknown VR raises here
        except Exception:  # pydicom raises NotImplementedError, ValueError ... for what it cannot read
            continue
    out: dict[str, Any] = {}
    with config.strict_reading():
        for tag, element in converted:
            try:
                out[f"{tag:08X}"] = element.to_json_dict(
                    bulk_data_element_handler=None, bulk_data_threshold=1024
                )
            except Exception:
                continue
    return out


def _cached_json(ds: Any, tag: int, item: Any, charset: str) -> dict[str, Any] | None:
    """One element of ``ds`` that names no patient (evidence, or File Meta that repeats: ``item`` as the
    dataset holds it, raw or converted) as pydicom writes it in DICOM JSON (:func:`_encoded`), or None
    when it cannot be converted. An element of a plain VR is looked up first: a raw one by its tag, VR,
    bytes, encoding and character set (``charset``: the ``repr`` of the dataset's), a converted one by its
    tag, VR and value (:func:`_simple`), which is all its JSON depends on."""
    raw_type = _pydicom()[1]
    key: tuple[Any, ...] | None = None
    plain = tag in _plain_evidence_tags() or tag in _CACHED_META_TAGS
    if plain and isinstance(item, raw_type) and item.value is not None and item.VR != "SQ":
        key = (tag, item.VR, bytes(item.value), item.is_little_endian, item.is_implicit_VR, charset)
    elif plain and not isinstance(item, raw_type) and _simple(item.value):
        key = (tag, item.VR, type(item.value).__name__, repr(item.value))  # converted already (validate)
    if key is not None:
        cached = _EVIDENCE_JSON.get(key)
        if cached is not None:
            return cached
    out = _encoded(ds, (tag,)).get(f"{tag:08X}")
    if key is not None and out is not None:
        if len(_EVIDENCE_JSON) >= _EVIDENCE_JSON_MAX:
            _EVIDENCE_JSON.clear()
        _EVIDENCE_JSON[key] = out
    return out


@functools.cache
def _wanted_in_order() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(evidence tags, identity tags), each ascending, as plain integers."""
    evidence_tags, identity_tags = _wanted_tags()
    return tuple(sorted(evidence_tags)), tuple(sorted(identity_tags))


def select_header(ds: Any) -> KeptHeader:
    """Select what is kept of a dataset (with its File Meta), each element encoded as DICOM JSON at once;
    everything else is dropped and never converted (a deferred value such as the pixel data is not read).
    Elements pydicom cannot convert or encode are left out rather than failing the instance. The dataset's
    elements are looked up once, by plain integer tags (pydicom's tags compare in Python)."""
    evidence_tags, identity_tags = _wanted_in_order()
    elements = {int(tag): item for tag, item in ds.items()}  # raw or converted: nothing converted here
    charset = repr(ds.original_character_set)
    evidence: dict[str, Any] = {}
    for tag in evidence_tags:
        item = elements.get(tag)
        if item is not None and (element_json := _cached_json(ds, tag, item, charset)) is not None:
            evidence[f"{tag:08X}"] = element_json
    identity = _encoded(ds, [tag for tag in identity_tags if tag in elements])
    meta: dict[str, Any] = {}
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        held = {int(tag): item for tag, item in file_meta.items()}
        for tag in _META_TAGS:
            item = held.get(tag)
            if item is None:
                continue
            element_json = (
                _cached_json(file_meta, tag, item, charset)
                if tag in _CACHED_META_TAGS
                else _encoded(file_meta, (tag,)).get(f"{tag:08X}")
            )
            if element_json is not None:
                meta[f"{tag:08X}"] = element_json
    return KeptHeader(evidence, identity, meta)


def split_dataset(ds: Any) -> tuple[str, str]:
    """A dataset (with its File Meta) -> ``(evidence, identity)`` as DICOM JSON text
    (:func:`select_header`, then :meth:`KeptHeader.to_json`)."""
    return select_header(ds).to_json()


def migrate(store: Any, identities: IdentityFiles) -> int:
    """Rows kept by an earlier version hold the whole header: split each, identity to its file."""
    moved = 0
    for uid, text in store.headers_with(IDENTITY_TAGS):
        try:
            evidence, identity = split_dataset(header_from_json(text))
        except Exception as exc:  # an unreadable old header: drop it (the SR of that result is lost)
            log.warning("an old kept header could not be split (%s); dropped", type(exc).__name__)
            evidence, identity = None, None
        if identity is not None:
            identities.put(uid, identity, replace=False)
        store.set_header(uid, evidence)
        moved += 1
    if moved:
        log.info("moved the patient identity of %d kept header(s) out of the database", moved)
    return moved


#: The DICOM JSON keys of the identity attributes (to find old rows that still hold them).
IDENTITY_TAGS = ("00100010", "00100020", "00100030", "00080050")


def header_from_json(evidence: str, identity: str | None = None) -> Any:
    """The kept header as a pydicom Dataset with its File Meta: the evidence, plus the identity when given."""
    from pydicom.dataset import Dataset, FileMetaDataset

    doc = json.loads(evidence)
    ds = Dataset.from_json(doc["dataset"])
    ds.file_meta = FileMetaDataset(Dataset.from_json(doc["meta"]))
    if identity:
        for element in Dataset.from_json(json.loads(identity)):
            ds.add(element)
    return ds


class IdentityFiles:
    """One file per instance under ``root``: its identity attributes (DICOM JSON), fsynced when written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        #: Held across "write an identity + insert its row" and "prune rows + delete their identities",
        #: so a retention pass cannot delete the identity of a row that is being inserted again.
        self.lock = threading.Lock()

    def path(self, uid: str) -> Path:
        return self.root / f"{hashlib.sha256(uid.encode()).hexdigest()[:40]}.json"

    def put(self, uid: str, identity: str, *, replace: bool) -> None:
        """Write ``uid``'s identity durably; with ``replace=False`` an existing file stands (a duplicate
        instance: the first copy stands, as its row does)."""
        final = self.path(uid)
        if not replace and final.exists():
            return
        fd, part = tempfile.mkstemp(dir=self.root, suffix=".part")  # unique: concurrent puts of one UID
        try:
            try:
                os.write(fd, identity.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(part, final)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise

    def get(self, uid: str) -> str | None:
        try:
            return self.path(uid).read_text()
        except FileNotFoundError:
            return None

    def delete(self, uids: Iterable[str]) -> None:
        for uid in uids:
            self.path(uid).unlink(missing_ok=True)

    def keep_only(self, uids: Iterable[str]) -> int:
        """Remove the files of instances the database no longer knows (and stale ``.part`` files)."""
        known = {self.path(uid).name for uid in uids}
        removed = 0
        for path in self.root.iterdir():
            if path.name not in known:
                path.unlink(missing_ok=True)
                removed += 1
        return removed
