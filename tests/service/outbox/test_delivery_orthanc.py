"""Result delivery to real Orthanc peers on 127.0.0.1 (Debian's packages, ``support/peers_orthanc.py``).

Orthanc as the PACS takes the SRs by C-STORE, a second Orthanc through its DICOMweb plugin by STOW-RS
(with basic auth); what they hold reads with highdicom and references the images sent. With the PACS
down the SRs wait in the outbox, survive a restart of the appliance and are delivered once it is back.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from retinaedge.service.results.selection import frame_findings
from support.certs import self_signed
from support.clients import multipart, wait_done
from support.paths import DEMO, REPO_ROOT
from support.peers_orthanc import Orthanc
from support.polling import wait_until
from support.servers import free_port, serve, start_server

STUDY = REPO_ROOT / "examples" / "study_01"
#: Four neighbouring slices through two lesions (examples/lesions.json): findings on several slices.
FILES = [STUDY / f"IM{n:04d}.dcm" for n in (13, 14, 15, 16)]
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

pytestmark = pytest.mark.slow


def stow(client: httpx.Client, base: str, files: list[Path]) -> list[str]:
    """STOW-RS the files to the appliance; their SOP Instance UIDs."""
    body, ctype = multipart([f.read_bytes() for f in files])
    r = client.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


def exports(client: httpx.Client, base: str, **params: Any) -> dict[str, Any]:
    r = client.get(f"{base}/v1/exports", params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


def destination(body: dict[str, Any], name: str) -> dict[str, Any]:
    (d,) = [d for d in body["destinations"] if d["name"] == name]
    return d


def referenced(ds: pydicom.Dataset) -> set[str]:
    """Every SOP Instance UID an SR's content tree references (image items and region sources)."""
    out: set[str] = set()
    for item in ds.get("ContentSequence", []):
        for ref in item.get("ReferencedSOPSequence", []):
            out.add(str(ref.ReferencedSOPInstanceUID))
        out |= referenced(item)
    return out


def held_srs(
    orthanc: Orthanc, exclude: frozenset[str] = frozenset()
) -> dict[str, tuple[pydicom.Dataset, Any, str]]:
    """SR SOP Instance UID -> (dataset, highdicom SR, how it arrived) of every instance Orthanc holds
    but those whose Orthanc id is in ``exclude``."""
    import highdicom as hd

    out = {}
    for oid in orthanc.instances():
        if oid in exclude:
            continue
        data = orthanc.instance_file(oid)
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.SOPClassUID == COMPREHENSIVE_3D_SR
        out[str(ds.SOPInstanceUID)] = (ds, hd.sr.srread(io.BytesIO(data)), orthanc.origin(oid))
    return out


def check_instance_sr(ds: pydicom.Dataset, sr: Any, source: str, result: dict[str, Any]) -> None:
    """An instance's SR references exactly its source image, with one planar ROI group per finding."""
    assert {e[2] for e in sr.get_evidence()} == {source}
    assert referenced(ds) == {source}
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == sum(len(frame_findings(f)) for f in result["frames"])


def test_srs_reach_orthanc_by_c_store_and_stow_rs(orthanc_tree: Path, tmp_path: Path) -> None:
    """Two destinations: a PACS by C-STORE (instance and series SRs), a viewer by STOW-RS with basic
    auth (instance SRs). Both hold the same SR instances, which reference the right images. A third
    destination, the viewer with a wrong password, is refused (401) and dead-lettered."""
    password, wrong = tmp_path / "viewer-password", tmp_path / "wrong-password"
    password.write_text("not-a-real-password\n")
    wrong.write_text("wrong-password\n")
    pacs = Orthanc(orthanc_tree, tmp_path / "pacs", aet="PACS").start()
    viewer = Orthanc(
        orthanc_tree, tmp_path / "viewer", aet="VIEWER", users={"retinaedge": "not-a-real-password"}
    ).start()
    try:
        destinations = [
            {
                "name": "pacs",
                "type": "dimse",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.dicom_port,
                "calling_ae_title": "RETINAEDGE",
                "series_sr": True,
            },
            {
                "name": "viewer",
                "type": "stowrs",
                "url": viewer.dicomweb,
                "auth": {"type": "basic", "username": "retinaedge", "secret_file": str(password)},
            },
            {
                "name": "viewer-wrong-password",
                "type": "stowrs",
                "url": viewer.dicomweb,
                "auth": {"type": "basic", "username": "retinaedge", "secret_file": str(wrong)},
            },
        ]
        with (
            serve(
                model=DEMO,
                export_destinations=destinations,
                export_max_attempts=2,
                export_retry_initial_s=0.1,
                export_retry_max_s=0.2,
            ) as base,
            httpx.Client(timeout=60) as c,
        ):
            uids = stow(c, base, FILES)
            results = {uid: wait_done(c, base, uid) for uid in uids}
            series_uid = str(pydicom.dcmread(FILES[0], stop_before_pixels=True).SeriesInstanceUID)
            assert c.post(f"{base}/v1/series/{series_uid}/complete").status_code == 200

            def delivered() -> dict[str, Any] | None:
                body = exports(c, base)
                ok = destination(body, "pacs")["jobs"]["delivered"] == 5
                ok = ok and destination(body, "viewer")["jobs"]["delivered"] == 4
                ok = ok and destination(body, "viewer-wrong-password")["jobs"]["dead"] == 4
                return body if ok else None

            body = wait_until(
                delivered, "5 SRs at the PACS, 4 at the viewer, 4 refused", timeout=60, interval=0.2
            )
            refused = destination(body, "viewer-wrong-password")
            assert refused["attempts"]["failed"] == 8 and refused["jobs"]["delivered"] == 0
            assert "credentials were refused" in refused["last_attempt"]["detail"]
            for name in ("pacs", "viewer"):
                d = destination(body, name)
                assert d["state"] == "ok" and d["jobs"]["pending"] == d["jobs"]["dead"] == 0
                assert d["duplicates"] == {"possible": 0, "confirmed": 0}
                assert d["attempts"]["failed"] == d["attempts"]["unknown"] == 0
            assert "password" not in json.dumps(body).replace("viewer-wrong-password", "")
            jobs = {
                (j["destination"], j["kind"], j["subject_uid"]): j
                for j in body["jobs"]
                if j["destination"] != "viewer-wrong-password"
            }
            assert len(jobs) == 9
            one = c.get(f"{base}/v1/exports/{jobs[('pacs', 'series', series_uid)]['id']}").json()
            assert [a["outcome"] for a in one["history"]] == ["delivered"]

            ready = c.get(f"{base}/readyz").json()
            assert ready["status"] == "degraded"
            assert [r.split("'")[1] for r in ready["degraded"]] == ["viewer-wrong-password"]
            metrics = c.get(f"{base}/metrics").text
            assert 'retinaedge_export_jobs{destination="pacs",state="delivered"} 5.0' in metrics
            assert 'retinaedge_export_failing{destination="viewer"} 0.0' in metrics

        at_pacs, at_viewer = held_srs(pacs), held_srs(viewer)
        assert len(at_pacs) == 5 and len(at_viewer) == 4
        assert {o for _, _, o in at_pacs.values()} == {"DicomProtocol"}
        by_uid = {j["sr_sop_instance_uid"]: j for j in jobs.values()}
        for sr_uid, (ds, sr, _) in at_viewer.items():
            assert sr_uid in at_pacs  # the same SR instance went to both destinations
            source = by_uid[sr_uid]["subject_uid"]
            check_instance_sr(ds, sr, source, results[source])
        series_sr = by_uid[jobs[("pacs", "series", series_uid)]["sr_sop_instance_uid"]]
        ds, sr, _ = at_pacs[series_sr["sr_sop_instance_uid"]]
        assert {e[2] for e in sr.get_evidence()} == set(uids)
        assert sr.content.get_volumetric_roi_measurement_groups()  # 3D findings across the slices
        assert referenced(ds) <= set(uids)
        assert ds.PatientID == pydicom.dcmread(FILES[0], stop_before_pixels=True).PatientID
    finally:
        pacs.stop()
        viewer.stop()


class HoldingPeer:
    """A C-STORE SCP (pynetdicom) that takes Comprehensive 3D SRs and holds its answer to each until
    released: a PACS slow to answer, so that the appliance can be killed between sending an SR and
    recording that it was delivered."""

    def __init__(self, port: int) -> None:
        from pynetdicom import AE, evt

        self.received: list[str] = []
        self.proposed: list[tuple[str, list[str]]] = []  # the presentation contexts the SCU proposed
        self.arrived, self.release = threading.Event(), threading.Event()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(COMPREHENSIVE_3D_SR, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])

        def on_store(event: Any) -> int:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            self.proposed = [
                (str(c.abstract_syntax), [str(t) for t in c.transfer_syntax])
                for c in event.assoc.requestor.requested_contexts
            ]
            self.arrived.set()
            self.release.wait(60)
            return 0x0000

        self.server: Any = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def test_srs_wait_for_a_pacs_that_is_down_and_survive_a_crash(orthanc_tree: Path, tmp_path: Path) -> None:
    """The PACS is down: the SRs wait (pending, attempts failing, /readyz degraded with the reason,
    metrics). A slow peer takes the first SR (proposed as exactly Comprehensive 3D SR, explicit and
    implicit VR little endian) and the appliance is killed (SIGKILL) before it records the
    delivery. After the restart the PACS is back: every SR is delivered, none lost, and the one SR sent
    before the crash is the one duplicate, counted and reported."""
    pacs = Orthanc(orthanc_tree, tmp_path / "pacs", aet="PACS")  # ports chosen, not started
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(tmp_path / "data"),
                "export_destinations": [
                    {"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1",
                     "port": pacs.dicom_port, "timeout_s": 30},
                ],
                "export_retry_initial_s": 0.2,
                "export_retry_max_s": 1.0,
            }
        )
    )  # fmt: skip
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(DEMO, config, port)
    holding = None
    try:
        with httpx.Client(timeout=60) as c:
            uids = stow(c, base, FILES[:3])
            for uid in uids:
                wait_done(c, base, uid)

            def failing() -> dict[str, Any] | None:
                d = destination(exports(c, base), "pacs")
                return d if d["state"] == "failing" and d["attempts"]["failed"] >= 3 else None

            d = wait_until(failing, "failed attempts while the PACS is down", timeout=60, interval=0.2)
            assert d["jobs"] == {"pending": 3, "delivered": 0, "dead": 0}
            assert "no connection to 127.0.0.1" in d["last_attempt"]["detail"]
            ready = c.get(f"{base}/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "degraded"
            assert any("'pacs' failing: 3 SR(s) waiting" in r for r in ready.json()["degraded"])
            metrics = c.get(f"{base}/metrics").text
            assert 'retinaedge_export_jobs{destination="pacs",state="pending"} 3.0' in metrics
            assert 'retinaedge_export_failing{destination="pacs"} 1.0' in metrics

            holding = HoldingPeer(pacs.dicom_port)
            assert holding.arrived.wait(30), "the appliance did not retry"
            proc.kill()  # SIGKILL: the SR went out, its delivery is not recorded
            proc.wait(30)
            holding.stop()
            assert len(holding.received) == 1
            # exactly the SOP class it sends, in explicit and implicit VR little endian
            assert holding.proposed == [(COMPREHENSIVE_3D_SR, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])]

        proc = start_server(DEMO, config, port)
        with httpx.Client(timeout=60) as c:
            d = destination(exports(c, base), "pacs")
            assert d["jobs"]["pending"] == 3  # nothing lost in the crash
            assert d["attempts"]["interrupted"] == 1 and d["attempts"]["failed"] >= 3
            pacs.start()
            body = wait_until(
                lambda: (b := exports(c, base)) and destination(b, "pacs")["jobs"]["delivered"] == 3 and b,
                "delivery once the PACS is back",
                timeout=60,
                interval=0.2,
            )
            d = destination(body, "pacs")
            assert d["jobs"] == {"pending": 0, "delivered": 3, "dead": 0}
            assert d["duplicates"] == {"possible": 1, "confirmed": 0}
            (dup,) = [j for j in body["jobs"] if j["duplicate"]]
            assert dup["sr_sop_instance_uid"] == holding.received[0] and dup["possibly_delivered_before"]
            assert (
                'retinaedge_export_duplicates_total{destination="pacs",kind="possible"} 1.0'
                in c.get(f"{base}/metrics").text
            )
            assert c.get(f"{base}/readyz").json()["status"] == "ready"
        held = held_srs(pacs)
        assert len(held) == 3 and holding.received[0] in held  # the same SR instance, not a new one
        assert {next(iter(referenced(ds))) for ds, _, _ in held.values()} == set(uids)
    finally:
        if holding is not None:
            holding.stop()
        proc.terminate()
        proc.wait(60)
        pacs.stop()


def test_orthanc_as_the_scanner_sends_a_study_and_gets_the_srs_back(
    orthanc_tree: Path, tmp_path: Path
) -> None:
    """Orthanc as the scanner sends a study to the appliance's C-STORE SCP (``POST /modalities/appliance/
    store``); the results appear in the appliance, and its SRs go back to Orthanc by C-STORE, each
    referencing one of the images it sent."""
    from retinaedge.service.settings import Settings

    if "dimse_port" not in Settings.model_fields:
        pytest.skip(
            "the C-STORE SCP (settings dimse_port, dimse_ae_title, dimse_allowed_aets) is not in this tree"
        )
    dimse_port = free_port()
    scanner = Orthanc(
        orthanc_tree,
        tmp_path / "scanner",
        aet="SCANNER",
        modalities={"appliance": ["RETINAEDGE", "127.0.0.1", dimse_port]},
    ).start()
    try:
        sent = {}
        for f in FILES:
            r = httpx.post(f"{scanner.url}/instances", content=f.read_bytes(), timeout=30)
            assert r.status_code == 200, r.text
            sent[r.json()["ID"]] = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        back = {"name": "scanner", "type": "dimse", "ae_title": "SCANNER", "host": "127.0.0.1",
                "port": scanner.dicom_port}  # fmt: skip
        with (
            serve(
                model=DEMO,
                dimse_port=dimse_port,
                dimse_ae_title="RETINAEDGE",
                dimse_allowed_aets=["SCANNER"],
                export_destinations=[back],
            ) as base,
            httpx.Client(timeout=60) as c,
        ):
            r = httpx.post(
                f"{scanner.url}/modalities/appliance/store",
                json={"Resources": list(sent), "Synchronous": True},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            for uid in sent.values():
                assert wait_done(c, base, uid)["frames"]
            wait_until(
                lambda: destination(exports(c, base), "scanner")["jobs"]["delivered"] == len(sent),
                "the SRs back at the scanner",
                timeout=60,
                interval=0.2,
            )
        srs = held_srs(scanner, exclude=frozenset(sent))
        assert len(srs) == len(sent)
        assert {next(iter(referenced(ds))) for ds, _, _ in srs.values()} == set(sent.values())
    finally:
        scanner.stop()


def test_srs_reach_orthanc_over_dicom_tls(orthanc_tree: Path, tmp_path: Path) -> None:
    """DICOM TLS with mutual authentication: Orthanc requires a client certificate it trusts and the
    appliance verifies Orthanc's. With the certificate the SR is delivered; without it the destination
    fails (and the SR waits)."""
    server_cert, server_key = self_signed(tmp_path, "pacs")
    client_cert, client_key = self_signed(tmp_path, "appliance")
    pacs = Orthanc(
        orthanc_tree,
        tmp_path / "pacs",
        aet="PACS",
        extra={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(server_cert),
            "DicomTlsPrivateKey": str(server_key),
            "DicomTlsTrustedCertificates": str(client_cert),
            "DicomTlsRemoteCertificateRequired": True,
        },
    ).start()
    tls = {"ca_file": str(server_cert), "cert_file": str(client_cert), "key_file": str(client_key)}
    pacs_tls = {"name": "pacs-tls", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1",
                "port": pacs.dicom_port, "tls": tls}  # fmt: skip
    no_client_cert = {**pacs_tls, "name": "pacs-no-client-cert", "tls": {"ca_file": str(server_cert)}}
    try:
        with (
            serve(model=DEMO, export_destinations=[pacs_tls, no_client_cert]) as base,
            httpx.Client(timeout=60) as c,
        ):
            (uid,) = stow(c, base, FILES[1:2])
            wait_done(c, base, uid)

            def settled() -> dict[str, Any] | None:
                b = exports(c, base)
                ok = destination(b, "pacs-tls")["jobs"]["delivered"] == 1
                return b if ok and destination(b, "pacs-no-client-cert")["attempts"]["failed"] >= 1 else None

            body = wait_until(
                settled,
                "delivery over TLS, and a refusal without a client certificate",
                timeout=60,
                interval=0.2,
            )
            assert destination(body, "pacs-tls")["target"].endswith("(TLS)")
            refused = destination(body, "pacs-no-client-cert")
            assert refused["state"] == "failing" and refused["jobs"]["pending"] == 1
        (held,) = held_srs(pacs).values()
        assert referenced(held[0]) == {uid}
    finally:
        pacs.stop()


MULTIFRAME = REPO_ROOT / "examples" / "study_01_multiframe" / "MF0001.dcm"  # the same study, another series
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
DOCUMENT_KINDS = ["sr", "gsps", "sc", "kos"]


def held_documents(orthanc: Orthanc, sources: frozenset[str]) -> dict[str, list[tuple[pydicom.Dataset, str]]]:
    """SOP Class UID -> (dataset, Orthanc id) of every instance Orthanc holds but the ``sources``
    (their Orthanc ids)."""
    out: dict[str, list[tuple[pydicom.Dataset, str]]] = {}
    for oid in orthanc.instances():
        if oid not in sources:
            ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(oid)))
            out.setdefault(str(ds.SOPClassUID), []).append((ds, oid))
    return out


def test_every_document_reaches_orthanc_by_c_store_and_stow_rs(orthanc_tree: Path, tmp_path: Path) -> None:
    """The PACS (C-STORE) and the viewer (STOW-RS) each take ``documents: ["sr", "gsps", "sc", "kos"]``;
    the demo study (four slices and a multi-frame series) goes to the appliance by STOW-RS, its images
    to both Orthancs as a scanner would. Each Orthanc holds an SR per instance, a GSPS per instance with
    findings, a secondary capture per frame with findings (the same bytes the appliance serves, which
    Orthanc renders as an image) and a KOS per completed series, all of the study, each kind in its own
    new series beside the images' (``/studies/{id}/series``)."""
    from retinaedge.service.results.documents import DOCUMENTS
    from retinaedge.service.results.selection import findings_by_frame

    assert set(DOCUMENT_KINDS) <= set(DOCUMENTS.deliverable())
    sources = [*FILES, MULTIFRAME]
    password = tmp_path / "viewer-password"
    password.write_text("not-a-real-password\n")
    pacs = Orthanc(orthanc_tree, tmp_path / "pacs", aet="PACS").start()
    viewer = Orthanc(
        orthanc_tree, tmp_path / "viewer", aet="VIEWER", users={"retinaedge": "not-a-real-password"}
    ).start()
    try:
        images: dict[str, frozenset[str]] = {}
        for name, orthanc in (("pacs", pacs), ("viewer", viewer)):
            ids = set()
            for f in sources:  # the images, as the scanner sent them
                r = httpx.post(
                    f"{orthanc.url}/instances", content=f.read_bytes(), auth=orthanc._auth(), timeout=30
                )
                assert r.status_code == 200, r.text
                ids.add(r.json()["ID"])
            images[name] = frozenset(ids)
        destinations = [
            {"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port,
             "documents": DOCUMENT_KINDS},
            {"name": "viewer", "type": "stowrs", "url": viewer.dicomweb, "documents": DOCUMENT_KINDS,
             "auth": {"type": "basic", "username": "retinaedge", "secret_file": str(password)}},
        ]  # fmt: skip
        with (
            serve(model=DEMO, export_destinations=destinations, series_quiet_s=3600.0) as base,
            httpx.Client(timeout=60) as c,
        ):
            uids = stow(c, base, sources)
            results = {uid: wait_done(c, base, uid) for uid in uids}
            for f in (FILES[0], MULTIFRAME):
                series_uid = pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID
                assert c.post(f"{base}/v1/series/{series_uid}/complete").status_code == 200
            findings = {uid: findings_by_frame(r) for uid, r in results.items()}
            with_findings = [uid for uid in uids if findings[uid]]
            assert 0 < len(with_findings) < len(uids)  # an instance without findings: no GSPS, no SC
            expected = {
                COMPREHENSIVE_3D_SR: len(uids),
                GSPS: len(with_findings),
                SECONDARY_CAPTURE: sum(len(f) for f in findings.values()),
                # A KOS job per completed series; the study did not change between the two, so both send
                # the same KOS object (built once for that version of the study): Orthanc holds one.
                KOS: 1,
            }
            jobs = len(uids) + 2 * len(with_findings) + 2

            def settled() -> dict[str, Any] | None:
                body = exports(c, base, limit=500)
                done = all(destination(body, n)["jobs"]["delivered"] == jobs for n in ("pacs", "viewer"))
                return body if done else None

            body = wait_until(settled, "every document at both Orthancs", timeout=120, interval=0.25)
            for name in ("pacs", "viewer"):
                d = destination(body, name)
                assert d["jobs"] == {"pending": 0, "delivered": jobs, "dead": 0}, d
                assert d["attempts"]["failed"] == d["attempts"]["unknown"] == 0
            sc_jobs = [j for j in body["jobs"] if j["document"] == "sc" and j["destination"] == "pacs"]
            served = {}  # SOP Instance UID of each SC -> the file the appliance serves
            for job in sc_jobs:
                numbers = [i + 1 for i in findings[job["subject_uid"]]]
                assert len(job["sop_instance_uids"]) == len(numbers)
                for n, sc_uid in zip(numbers, job["sop_instance_uids"], strict=True):
                    r = c.get(
                        f"{base}/v1/results/{job['subject_uid']}", params={"document": "sc", "frame": n}
                    )
                    assert r.status_code == 200
                    served[sc_uid] = r.content

        study_uid = str(pydicom.dcmread(FILES[0], stop_before_pixels=True).StudyInstanceUID)
        for name, orthanc in (("pacs", pacs), ("viewer", viewer)):
            held = held_documents(orthanc, images[name])
            assert {k: len(v) for k, v in held.items()} == expected, name
            for ds, oid in held[SECONDARY_CAPTURE]:
                # The SC as the appliance made it, pixels and all (the File Meta is the peer's own).
                assert ds == pydicom.dcmread(io.BytesIO(served[str(ds.SOPInstanceUID)]))
                preview = httpx.get(
                    f"{orthanc.url}/instances/{oid}/preview", auth=orthanc._auth(), timeout=30
                )
                assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
            origins = {orthanc.origin(oid) for docs in held.values() for _, oid in docs}
            assert origins == ({"DicomProtocol"} if name == "pacs" else {"Plugins"}), (name, origins)
            assert all(ds.StudyInstanceUID == study_uid for docs in held.values() for ds, _ in docs)
            (study,) = orthanc.get("/studies")
            series = orthanc.get(f"/studies/{study}/series")
            modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
            # The images' two MR series, and one new series per document kind (all the SRs in one).
            assert modalities == sorted(["MR", "MR", "OT", "PR", "KO", "SR"]), (
                name,
                modalities,
            )
            documents = {str(ds.SeriesInstanceUID) for docs in held.values() for ds, _ in docs}
            listed = {s["MainDicomTags"]["SeriesInstanceUID"] for s in series}
            assert documents <= listed
    finally:
        pacs.stop()
        viewer.stop()
