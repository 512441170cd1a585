"""The ``kos`` document (service/results/kos.py, studies.py): a study's images with findings so far as a
Key Object Selection Document, built from what the service keeps (rows in ``state.sqlite3`` and identity
files) of the examples' study as the demo model reads it: slices with and without findings, the
multi-frame and the JPEG 2000 instance.

Checked: it references exactly the images with findings (and the frames with findings of the multi-frame
one), highdicom reads it back, dicom3tools' ``dciodvfy`` finds nothing to say.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.multival import MultiValue
from retinaedge.runtime.detector import Detector
from retinaedge.service.results.dicomdoc import document_series_uid
from retinaedge.service.results.evidence import IdentityFiles, split_header
from retinaedge.service.results.key_images import StudyImages, study_images
from retinaedge.service.results.kos import study_kos
from retinaedge.service.results.selection import findings_by_frame
from retinaedge.service.results.store import Store
from retinaedge.service.results.views import NothingToReport, StudyView
from support.paths import DEMO, EXAMPLES

SOURCES = [
    EXAMPLES / "study_01" / "IM0001.dcm",  # no finding
    EXAMPLES / "study_01" / "IM0015.dcm",
    EXAMPLES / "study_01" / "IM0014.dcm",
    EXAMPLES / "study_01_multiframe" / "MF0001.dcm",
    EXAMPLES / "compressed" / "study_01_IM0016_J2K.dcm",
]
KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


class Kept:
    """The study as the service keeps it: the store, the identity files, what the model found."""

    def __init__(self, root: Path) -> None:
        self.store = Store(root / "state.sqlite3")
        self.identities = IdentityFiles(root / "identity")
        self.results: dict[str, dict[str, object]] = {}
        self.study = ""
        with Detector.open(DEMO, threads=1) as det:
            manifest = det.bundle.manifest
            self.model_name, self.model_sha256 = manifest.name, str(manifest.model_sha256)
            for source in SOURCES:
                ds = pydicom.dcmread(source, stop_before_pixels=True)
                result = det.detect(source).to_json()
                with open(source, "rb") as fh:
                    evidence, identity = split_header(fh)
                uid = str(ds.SOPInstanceUID)
                self.identities.put(uid, identity, replace=True)
                self.store.put_done(
                    uid, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, 1, result, evidence
                )
                self.results[uid] = result
                self.study = str(ds.StudyInstanceUID)

    def images(self) -> StudyImages:
        return study_images(self.study, self.store.study_rows(self.study), self.identities.get)

    def view(self) -> StudyView:
        return StudyView(self.study, self.images(), self.model_name, self.model_sha256)


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kept]:
    kept = Kept(tmp_path_factory.mktemp("kos"))
    yield kept
    kept.store.close()


def test_it_references_exactly_the_images_with_findings_and_their_frames(kept: Kept) -> None:
    from highdicom.ko import KeyObjectSelectionDocument

    with_findings = {uid: findings_by_frame(r) for uid, r in kept.results.items() if findings_by_frame(r)}
    assert 0 < len(with_findings) < len(SOURCES)  # some images have findings, some none
    kos = KeyObjectSelectionDocument.from_dataset(study_kos(kept.view()))
    refs = kos.content.get_references()
    assert sorted(r.referenced_sop_instance_uid for r in refs) == sorted(with_findings)
    headers = {h.SOPInstanceUID: h for h in (pydicom.dcmread(s, stop_before_pixels=True) for s in SOURCES)}
    for ref in refs:
        frames = ref.ReferencedSOPSequence[0].get("ReferencedFrameNumber")
        header = headers[ref.referenced_sop_instance_uid]
        expected = [i + 1 for i in with_findings[ref.referenced_sop_instance_uid]]
        if int(header.get("NumberOfFrames", 1)) > 1:
            assert [int(f) for f in (frames if isinstance(frames, MultiValue) else [frames])] == expected
            assert len(expected) < int(header.NumberOfFrames)  # a frame selection, not every frame
        else:
            assert frames is None
        assert ref.referenced_sop_class_uid == header.SOPClassUID
        assert kos.resolve_reference(ref.referenced_sop_instance_uid) == (
            header.StudyInstanceUID,
            header.SeriesInstanceUID,
            header.SOPInstanceUID,
        )
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113000",
        "DCM",
        "Of Interest",
    )


def test_it_is_a_new_instance_in_the_study_s_kos_series_with_its_identity(kept: Kept) -> None:
    first, second = study_kos(kept.view()), study_kos(kept.view())
    source = pydicom.dcmread(SOURCES[1], stop_before_pixels=True)
    assert (first.SOPClassUID, first.Modality) == (KOS_SOP_CLASS, "KO")
    assert (
        first.SeriesInstanceUID
        == second.SeriesInstanceUID
        == document_series_uid("kos", kept.study, kept.model_sha256)
    )
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.Manufacturer == "retinaedge" and first.ManufacturerModelName == kept.model_name
    assert first.ContentDate and first.ContentTime
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "StudyInstanceUID",
        "AccessionNumber",
        "StudyID",
    ):
        assert str(first.get(keyword)) == str(source.get(keyword)), keyword


def test_a_study_without_findings_has_no_kos_and_what_cannot_be_referenced_is_left_out(kept: Kept) -> None:
    images = kept.images()
    none = StudyImages(images.study_instance_uid, images.counts, (), ())
    with pytest.raises(NothingToReport):
        study_kos(StudyView(kept.study, none, kept.model_name, kept.model_sha256))
    rows = kept.store.study_rows(kept.study)
    with_findings = [i for i, r in enumerate(rows) if findings_by_frame(r.result() or {})]
    headless = [replace(r, header_json=None) if i == with_findings[0] else r for i, r in enumerate(rows)]
    partial = study_images(kept.study, headless, kept.identities.get)
    assert len(partial.images) == len(with_findings) - 1
    assert [x["reason"] for x in partial.left_out] == ["no header was kept"]
    assert partial.counts == {
        "received": len(SOURCES),
        "pending": 0,
        "done": len(SOURCES),
        "failed": 0,
        "not_applicable": 0,
    }


DCIODVFY = shutil.which("dciodvfy")


@pytest.mark.skipif(DCIODVFY is None, reason="needs dicom3tools' dciodvfy (installed by .ci/run)")
def test_dciodvfy_has_nothing_to_say(tmp_path: Path, kept: Kept) -> None:
    path = tmp_path / "kos.dcm"
    study_kos(kept.view()).save_as(path, enforce_file_format=True)
    out = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "KeyObjectSelectionDocument" in text, text[:500]  # it recognised the IOD it checked
    assert not [ln for ln in text.splitlines() if ln.startswith(("Error", "Warning"))], text
