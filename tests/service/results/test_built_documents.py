"""An instance's built documents (SR, GSPS) are built once per result and served from disk
(service/results/built.py): through the routes, and by the store itself (concurrency, versions,
retention, a failing build)."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from retinaedge.service.results.built import BuiltDocuments, result_version
from retinaedge.service.results.rows import subject_key
from support.paths import EXAMPLES
from support.servers import demo_app, ready_client

SINGLE = EXAMPLES / "study_01" / "IM0015.dcm"


@pytest.fixture(scope="module")
def app() -> FastAPI:
    return demo_app("retinaedge-built-")


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with ready_client(app) as c:
        yield c


def _detect(client: TestClient) -> str:
    r = client.post("/v1/detect", content=SINGLE.read_bytes(), headers={"Content-Type": "application/dicom"})
    assert r.status_code == 200, r.text
    assert any(d["finding"] for f in r.json()["frames"] for d in f["detections"])
    return str(r.json()["sop_instance_uid"])


def _counting(built: BuiltDocuments, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each document the store writes (a build) by its file name."""
    writes: list[str] = []
    original = built._write

    def write(path: Path, ds: Dataset) -> None:
        writes.append(path.name)
        original(path, ds)

    monkeypatch.setattr(built, "_write", write)
    return writes


@pytest.mark.parametrize("kind", ["sr", "gsps"])
def test_a_document_is_built_once_per_result_and_the_same_object_each_time(
    app: FastAPI, client: TestClient, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    writes = _counting(app.state.services.built, monkeypatch)
    uid = _detect(client)
    url = f"/v1/results/{uid}?document={kind}"
    with ThreadPoolExecutor(3) as pool:  # three clients ask for a document never built: one build
        answers = list(pool.map(lambda _: client.get(url, headers={"Accept": "application/dicom"}), range(3)))
    again = client.get(url)
    assert [a.status_code for a in [*answers, again]] == [200] * 4
    assert len({a.content for a in [*answers, again]}) == 1  # one object, one SOP Instance UID
    assert len(writes) == 1 and writes[0].startswith(f"{kind}-")
    first = pydicom.dcmread(io.BytesIO(again.content)).SOPInstanceUID
    # A new result of the instance (detected again: other timings) gets a document of its own.
    _detect(client)
    newer = client.get(url)
    assert newer.status_code == 200 and pydicom.dcmread(io.BytesIO(newer.content)).SOPInstanceUID != first
    assert len(writes) == 2
    folder = app.state.services.built.folder(subject_key(app.state.services.model_name, uid))
    assert [p.name for p in folder.iterdir() if p.name.startswith(f"{kind}-")] == [writes[1]]


def test_the_default_sr_through_accept_is_the_same_file(app: FastAPI, client: TestClient) -> None:
    uid = _detect(client)
    by_accept = client.get(f"/v1/results/{uid}", headers={"Accept": "application/dicom"})
    by_kind = client.get(f"/v1/results/{uid}?document=sr")
    assert by_accept.status_code == by_kind.status_code == 200
    assert by_accept.content == by_kind.content


def _dataset(uid: str) -> Dataset:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.SOPInstanceUID = uid
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    return ds


def test_store_builds_once_under_concurrency_and_keeps_nothing_of_a_failed_build(tmp_path: Path) -> None:
    built = BuiltDocuments(tmp_path / "documents")
    calls = 0
    gate = threading.Event()

    def slow() -> Dataset:
        nonlocal calls
        calls += 1
        gate.wait(5)
        return _dataset("1.2.3.4")

    version = result_version('{"frames": []}', None, None)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(built.file, "1.2.3", "sr", version, slow) for _ in range(4)]
        gate.set()
        paths = {f.result(timeout=10) for f in futures}
    assert calls == 1 and len(paths) == 1
    assert pydicom.dcmread(next(iter(paths))).SOPInstanceUID == "1.2.3.4"

    def broken() -> Any:
        raise ValueError("cannot be represented")

    with pytest.raises(ValueError):
        built.file("1.2.3", "gsps", version, broken)
    assert sorted(p.name for p in built.folder("1.2.3").iterdir()) == [f"sr-{version}.dcm"]
    built.close()


def test_versions_retention_and_start_up_clean_up(tmp_path: Path) -> None:
    built = BuiltDocuments(tmp_path / "documents")
    v1, v2 = result_version("a", "h", None), result_version("b", "h", None)
    assert v1 != v2 and result_version("a", "h", "id") != v1  # an identity change is a new version
    built.file("1.2.3", "sr", v1, lambda: _dataset("1.9.1"))
    built.file("1.2.3", "gsps", v1, lambda: _dataset("1.9.2"))
    built.file("1.2.3", "sr", v2, lambda: _dataset("1.9.3"))  # the newer result replaces v1's SR only
    assert sorted(p.name for p in built.folder("1.2.3").iterdir()) == [f"gsps-{v1}.dcm", f"sr-{v2}.dcm"]
    built.file("1.2.4", "sr", v1, lambda: _dataset("1.9.4"))
    built.delete(["1.2.3"])  # retention
    assert not built.folder("1.2.3").exists() and built.folder("1.2.4").exists()
    assert built.keep_only(["1.2.5"]) == 1  # at start: results no longer kept
    assert list((tmp_path / "documents").iterdir()) == []
    built.close()


def test_the_srs_of_a_study_form_one_series_per_model() -> None:
    """Every instance SR of a study by one model is in one SR series (not one series per SR), the same on
    every build; another model makes another series."""
    from retinaedge.runtime.detector import Detector
    from retinaedge.service.results.evidence import header_from_json, split_header
    from retinaedge.service.results.sr import build_sr
    from support.paths import DEMO

    srs = []
    with Detector.open(DEMO, threads=1) as det:
        for name in ("IM0015.dcm", "IM0016.dcm"):
            source = EXAMPLES / "study_01" / name
            result = det.detect(source).to_json()
            with open(source, "rb") as fh:
                evidence, identity = split_header(fh)
            header = header_from_json(evidence, identity)
            srs.append(build_sr(header, result, "demo", "a" * 64))
        other = build_sr(header, result, "demo", "b" * 64)
    assert srs[0].SeriesInstanceUID == srs[1].SeriesInstanceUID != header.SeriesInstanceUID
    assert srs[0].SOPInstanceUID != srs[1].SOPInstanceUID
    assert other.SeriesInstanceUID != srs[0].SeriesInstanceUID


def test_series_sr_and_kos_are_built_once_per_version_of_their_series_and_study(
    app: FastAPI, client: TestClient
) -> None:
    """The series SR of a complete series and the KOS of a study: the same object on every GET while
    nothing changes; a new instance of the study gives a new KOS."""
    first = EXAMPLES / "study_01" / "IM0016.dcm"
    for path in (SINGLE, first):
        r = client.post(
            "/v1/detect", content=path.read_bytes(), headers={"Content-Type": "application/dicom"}
        )
        assert r.status_code == 200
    header = pydicom.dcmread(SINGLE, stop_before_pixels=True)
    series, study = str(header.SeriesInstanceUID), str(header.StudyInstanceUID)
    assert client.post(f"/v1/series/{series}/complete").status_code == 200
    dicom = {"Accept": "application/dicom"}
    srs = [client.get(f"/v1/series/{series}", headers=dicom) for _ in range(2)]
    koss = [client.get(f"/v1/studies/{study}", headers=dicom) for _ in range(2)]
    assert [r.status_code for r in [*srs, *koss]] == [200] * 4
    assert srs[0].content == srs[1].content and koss[0].content == koss[1].content
    third = EXAMPLES / "study_01" / "IM0017.dcm"
    r = client.post("/v1/detect", content=third.read_bytes(), headers={"Content-Type": "application/dicom"})
    assert r.status_code == 200
    newer = client.get(f"/v1/studies/{study}", headers=dicom)
    assert newer.status_code == 200 and newer.content != koss[0].content
    uids = {pydicom.dcmread(io.BytesIO(k.content)).SOPInstanceUID for k in (koss[0], newer)}
    assert len(uids) == 2
