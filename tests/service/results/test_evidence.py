"""What is kept of a header after the instance is gone (service/results/evidence.py): the SR evidence in the
database without patient identity, the identity in a file per instance, both gone with the result."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
from retinaedge.service.results.evidence import (
    IdentityFiles,
    header_from_json,
    migrate,
    select_header,
    split_dataset,
    split_header,
)
from retinaedge.service.results.store import Store
from support.paths import REPO_ROOT

SOURCE = REPO_ROOT / "examples" / "study_01" / "IM0001.dcm"


def _header() -> tuple[pydicom.Dataset, str, str]:
    ds = pydicom.dcmread(SOURCE)
    with open(SOURCE, "rb") as fh:
        evidence, identity = split_header(fh)
    return ds, evidence, identity


def test_the_split_keeps_what_the_sr_needs_and_nothing_that_names_the_patient() -> None:
    ds, evidence, identity = _header()
    kept = header_from_json(evidence)
    assert kept.SOPInstanceUID == ds.SOPInstanceUID and kept.FrameOfReferenceUID == ds.FrameOfReferenceUID
    assert list(kept.ImagePositionPatient) == list(ds.ImagePositionPatient)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName"):
        assert keyword not in kept
    whole = header_from_json(evidence, identity)
    assert whole.PatientID == ds.PatientID and whole.PatientName == ds.PatientName
    assert "PixelData" not in whole


def test_identity_files_are_written_once_replaced_on_request_and_pruned(tmp_path: Path) -> None:
    files = IdentityFiles(tmp_path / "identity")
    files.put("1.2.3", '{"a": 1}', replace=False)
    files.put("1.2.3", '{"a": 2}', replace=False)  # a duplicate instance: the first copy stands
    assert json.loads(files.get("1.2.3") or "") == {"a": 1}
    files.put("1.2.3", '{"a": 3}', replace=True)
    assert json.loads(files.get("1.2.3") or "") == {"a": 3}
    assert "1.2.3" not in files.path("1.2.3").name  # named by a hash, not by the UID
    assert files.path("1.2.3").stat().st_mode & 0o077 == 0
    files.put("1.2.4", "{}", replace=False)
    assert files.keep_only(["1.2.4"]) == 1 and files.get("1.2.3") is None and files.get("1.2.4") == "{}"


def test_rows_of_an_earlier_version_lose_their_identity_to_files(tmp_path: Path) -> None:
    ds = pydicom.dcmread(SOURCE, stop_before_pixels=True)
    old = json.dumps({"meta": ds.file_meta.to_json_dict(), "dataset": ds.to_json_dict()})
    store = Store(tmp_path / "state.sqlite3")
    uid = str(ds.SOPInstanceUID)
    store.put_done(uid, str(ds.SOPClassUID), "1.2", "1.2.1", 10, {"frames": []}, old)
    files = IdentityFiles(tmp_path / "identity")
    assert migrate(store, files) == 1
    row = store.get(uid)
    assert row is not None and row.header_json is not None
    assert str(ds.PatientID) not in row.header_json and '"00100010"' not in row.header_json
    assert header_from_json(row.header_json, files.get(uid)).PatientID == ds.PatientID
    assert migrate(store, files) == 0  # once
    store.close()


def test_retention_removes_the_identity_with_the_result(tmp_path: Path) -> None:
    from retinaedge.service.results.retention import Pruner

    store = Store(tmp_path / "state.sqlite3")
    files = IdentityFiles(tmp_path / "identity")
    for n in range(3):
        store.put_done(f"1.2.{n}", "1.2.840.10008.5.1.4.1.1.4", "1.2", "1.2.1", 10, {"n": "x" * 100}, None)
        files.put(f"1.2.{n}", "{}", replace=False)
    Pruner(store, files, interval_s=0, max_age_s=3600, max_bytes=250)()  # room for two results
    assert sorted(store.uids()) == ["1.2.1", "1.2.2"]  # the oldest result went
    assert sorted(p.name for p in (tmp_path / "identity").iterdir()) == sorted(
        files.path(u).name for u in ("1.2.1", "1.2.2")
    )
    store.close()


def test_concurrent_puts_of_one_uid_do_not_fail(tmp_path: Path) -> None:
    """A modality retrying while its first STOW-RS is in flight: two writers of one identity file."""
    import concurrent.futures

    files = IdentityFiles(tmp_path / "identity")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: files.put("1.2.3", f'{{"k": {k % 2}}}', replace=True), range(200)))
    assert json.loads(files.get("1.2.3") or "")["k"] in (0, 1)
    assert [p.name for p in (tmp_path / "identity").iterdir()] == [files.path("1.2.3").name]  # no .part left


def test_the_selection_converts_only_what_is_kept_and_keeps_no_pixels() -> None:
    """``select_header`` (the reader thread's part) holds no pixel data and skips what it cannot convert;
    its encoding is the split's."""
    ds = pydicom.dcmread(SOURCE)
    ds.add(pydicom.DataElement(0x00200052, "UI", "1.2.3.4"))  # FrameOfReferenceUID, in the evidence
    raw = pydicom.dataelem.RawDataElement(pydicom.tag.Tag(0x00201041), "XX", 2, b"ab", 0, False, True)
    ds._dict[raw.tag] = raw  # SliceLocation (evidence) with a VR pydicom cannot convert: left out
    ds.SliceThickness = "1.5"
    kept = select_header(ds)
    assert "7FE00010" not in kept.evidence and "7FE00010" not in kept.identity
    assert kept.evidence["00200052"]["Value"] == ["1.2.3.4"]
    assert kept.identity["00100020"]["Value"] == [ds.PatientID]
    assert "00100020" not in kept.evidence and "00201041" not in kept.evidence
    evidence, identity = kept.to_json()
    assert (evidence, identity) == split_dataset(ds)
    assert header_from_json(evidence, identity).SliceThickness == 1.5


def test_the_writer_keeps_the_group_when_one_header_cannot_be_encoded(tmp_path: Path) -> None:
    """A header that fails to encode in the writer thread drops that one result (logged), not its group."""
    from retinaedge.service.results.writer import KeptResult, ResultWriter

    class Broken:
        def to_json(self) -> tuple[str, str]:
            raise ValueError("cannot encode")

    store = Store(tmp_path / "state.sqlite3")
    files = IdentityFiles(tmp_path / "identity")
    writer = ResultWriter(store, files, gather_s=0.0)
    writer.start()
    try:
        good = select_header(pydicom.dcmread(SOURCE))
        assert writer.keep(KeptResult("1.2.3", "1.2.840.10008.5.1.4.1.1.4", "9", "9.1", 10, {}, good))
        assert writer.keep(KeptResult("1.2.4", "1.2.840.10008.5.1.4.1.1.4", "9", "9.1", 10, {}, Broken()))  # type: ignore[arg-type]
        assert writer.settle(10)
    finally:
        writer.stop()
    row = store.get("1.2.3")
    assert row is not None and row.header_json is not None and files.get("1.2.3") is not None
    assert store.get("1.2.4") is None and files.get("1.2.4") is None


def test_evidence_seen_before_is_reused_only_when_it_is_the_same_and_never_names_the_patient() -> None:
    """The slices of a series repeat their evidence: a second slice reuses the first one's DICOM JSON
    where the element is the same, and gets its own where it differs; no patient attribute is kept."""
    from retinaedge.service.results import evidence

    evidence._EVIDENCE_JSON.clear()
    first = pydicom.dcmread(SOURCE)
    second = pydicom.dcmread(SOURCE)
    second.ImagePositionPatient = [1.5, -2.25, 30.0]  # converted, as validate leaves some elements
    raw = pydicom.dataelem.RawDataElement(pydicom.tag.Tag(0x00201041), "DS", 4, b"12.5", 0, False, True)
    second._dict[raw.tag] = raw  # SliceLocation, still raw
    cold = split_dataset(first)
    assert evidence._EVIDENCE_JSON  # filled by the first slice
    kept = json.loads(split_dataset(second)[0])["dataset"]
    assert kept["00200032"]["Value"] == [1.5, -2.25, 30.0] and kept["00201041"]["Value"] == [12.5]
    assert kept["0020000D"] == json.loads(cold[0])["dataset"]["0020000D"]  # the study, reused
    assert split_dataset(pydicom.dcmread(SOURCE)) == cold  # warm gives what cold gave
    text = json.dumps(list(evidence._EVIDENCE_JSON.values()))
    assert str(first.PatientID) not in text and str(first.PatientName) not in text
    assert not any(key[0] in evidence._wanted_tags()[1] for key in evidence._EVIDENCE_JSON)


def test_the_kept_identity_and_file_meta_are_what_pydicom_encodes_of_them() -> None:
    """Each element is encoded on its own as ``Dataset.to_json_dict(suppress_invalid_tags=True)`` encodes a
    dataset of them: every file of the examples, raw and after its header was read."""
    from retinaedge.runtime.discovery import dicom_files
    from retinaedge.service.results.evidence import IDENTITY_KEYWORDS

    files = dicom_files([REPO_ROOT / "examples"])
    assert files
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        kept = select_header(ds)
        identity, meta = pydicom.Dataset(), pydicom.Dataset()
        for keyword in sorted(IDENTITY_KEYWORDS):
            if keyword in ds:
                identity.add(ds[keyword])
        for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID"):
            if keyword in ds.file_meta:
                meta.add(ds.file_meta[keyword])
        assert kept.identity == identity.to_json_dict(suppress_invalid_tags=True), path.name
        assert kept.meta == meta.to_json_dict(suppress_invalid_tags=True), path.name
        assert kept.identity and kept.meta
