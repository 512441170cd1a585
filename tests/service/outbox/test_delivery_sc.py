"""Result export of the secondary captures (``sc``): a document of several SOP instances, one job.

Through the Dispatcher's threads on a real SQLite database with a stand-in sender: an instance's
captures (one per frame with findings) go out together in one job, an instance without findings has
none (its job is dropped as skipped), and the files sent are the outbox's own (retention removing the
result's captures meanwhile changes nothing). Then the two real senders: C-STORE proposes exactly the
SOP class of each instance (a pynetdicom peer records what was proposed) and reports a document stored
in part as ``unknown``; STOW-RS sends one request with a part per instance, its Content-Length exact.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Sequence
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from retinaedge.runtime.detector import Detector
from retinaedge.service.outbox.delivery import Dispatcher
from retinaedge.service.outbox.destinations import DimseDestination, StowRsDestination
from retinaedge.service.outbox.senders import (
    DUPLICATE,
    Delivery,
    DimseSender,
    Instance,
    StowRsSender,
    _stow_outcome,
)
from retinaedge.service.results.captures import CaptureFiles, CaptureMaker
from retinaedge.service.results.evidence import IdentityFiles, split_header
from retinaedge.service.results.selection import findings_by_frame
from retinaedge.service.results.store import Store
from retinaedge.service.settings import load_settings
from support.paths import DEMO, EXAMPLES
from support.polling import wait_until
from support.servers import free_port

MULTI = EXAMPLES / "study_01_multiframe" / "MF0001.dcm"
NO_FINDINGS = EXAMPLES / "study_01" / "IM0001.dcm"
SC = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
DESTINATION = {"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}


class Keeper:
    """A sender that refuses its first ``refuse`` attempts (``failed``, this document only), then
    keeps what it is given."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.sent: list[list[Dataset]] = []
        self.tried = threading.Event()

    def send(self, instances: Sequence[Instance], timeout_s: float | None = None) -> Delivery:
        self.tried.set()
        if self.refuse:
            self.refuse -= 1
            return Delivery("failed", "refused for the test", destination_wide=False)
        self.sent.append([pydicom.dcmread(i.path) for i in instances])
        return Delivery("delivered", "kept")


def receive(det: Detector, store: Store, maker: CaptureMaker, source: Path) -> dict[str, Any]:
    """``source`` as STOW-RS records it (pending with its kept header), then its result with its captures,
    as the processor records them."""
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    with open(source, "rb") as fh:
        evidence, identity = split_header(fh)
    uid = str(ds.SOPInstanceUID)
    assert maker.identities is not None
    maker.identities.put(uid, identity, replace=True)
    assert store.add_pending(
        uid, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, "x.dcm", 1, evidence
    )
    result = det.detect(source).to_json()
    maker.keep(uid, source, result, evidence)
    store.done(uid, result)
    return result


def test_the_captures_of_an_instance_go_out_as_one_job(tmp_path: Path) -> None:
    settings = load_settings(
        model=DEMO,
        data_dir=tmp_path,
        export_destinations=[{**DESTINATION, "documents": ["sc"]}],
        export_retry_initial_s=0.05,
        export_retry_max_s=0.1,
    )
    store = Store(tmp_path / "state.sqlite3")
    keeper = Keeper(refuse=1)
    with Detector.open(DEMO, threads=1) as det:
        manifest = det.bundle.manifest
        identities = IdentityFiles(tmp_path / "identity")
        maker = CaptureMaker(CaptureFiles(tmp_path / "captures"), manifest, identities=identities)
        dispatcher = Dispatcher(settings, store, identities, manifest.name, str(manifest.model_sha256))
        dispatcher._senders["pacs"] = keeper
        dispatcher.start()
        try:
            result = receive(det, store, maker, MULTI)
            receive(det, store, maker, NO_FINDINGS)
            uid = result["sop_instance_uid"]
            dispatcher.wake()
            assert keeper.tried.wait(30)  # the document is built (linked into the outbox), then refused
            maker.files.delete([uid])  # retention takes the result's captures meanwhile
            jobs = wait_until(
                lambda: [j.to_json() for j in dispatcher.outbox.jobs(None, None, 100)],
                "the captures delivered, the instance without findings skipped",
                lambda js: len(js) == 1 and js[0]["state"] == "delivered",
                timeout=30,
                interval=0.05,
            )
            wait_until(
                lambda: not list((tmp_path / "outbox").iterdir()),
                "the outbox folder released",
                timeout=30,
                interval=0.1,
            )
            (status,) = dispatcher.summary()
        finally:
            dispatcher.stop()
    (job,) = jobs
    (sent,) = keeper.sent
    numbers = [i + 1 for i in findings_by_frame(result)]
    assert len(sent) == len(numbers) > 1
    assert [ds.SourceImageSequence[0].ReferencedFrameNumber for ds in sent] == numbers
    assert {ds.SOPClassUID for ds in sent} == {SC} and len({ds.SeriesInstanceUID for ds in sent}) == 1
    assert job["document"] == "sc" and job["subject_uid"] == uid and job["attempts"] == 2
    assert job["sop_instance_uids"] == [ds.SOPInstanceUID for ds in sent]
    assert job["sr_sop_instance_uid"] == sent[0].SOPInstanceUID
    assert status["skipped"] == 1 and status["jobs"]["dead"] == 0
    store.close()


def instance_file(tmp_path: Path, sop_class: str) -> Instance:
    """A minimal DICOM file of ``sop_class`` (the peers here store whatever they are given)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.PatientID = "retinaedge-test"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        sop_class,
        ds.SOPInstanceUID,
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return Instance(path, sop_class, str(ds.SOPInstanceUID))


class RecordingPeer:
    """A C-STORE SCP (pynetdicom) taking ``classes``; records the contexts proposed and what it stored."""

    def __init__(self, classes: Sequence[str]) -> None:
        from pynetdicom import AE, evt

        self.port = free_port()
        self.stored: list[str] = []
        self.proposed: list[tuple[str, list[str]]] = []
        ae = AE(ae_title="PACS")
        for c in classes:
            ae.add_supported_context(c, TRANSFER_SYNTAXES)

        def on_store(event: Any) -> int:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
            self.proposed = [
                (str(c.abstract_syntax), [str(t) for t in c.transfer_syntax])
                for c in event.assoc.requestor.requested_contexts
            ]
            return 0x0000

        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("accepts_sc", [True, False], ids=["peer-takes-sc", "peer-takes-sr-only"])
def test_c_store_proposes_exactly_each_instance_s_sop_class(tmp_path: Path, accepts_sc: bool) -> None:
    instances = [
        instance_file(tmp_path, COMPREHENSIVE_3D_SR),
        instance_file(tmp_path, SC),
        instance_file(tmp_path, SC),
    ]
    peer = RecordingPeer([COMPREHENSIVE_3D_SR, SC] if accepts_sc else [COMPREHENSIVE_3D_SR])
    try:
        dest = DimseDestination.model_validate({**DESTINATION, "port": peer.port, "timeout_s": 10})
        delivery = DimseSender(dest).send(instances)
    finally:
        peer.stop()
    assert peer.proposed == [(COMPREHENSIVE_3D_SR, TRANSFER_SYNTAXES), (SC, TRANSFER_SYNTAXES)]
    if accepts_sc:
        assert delivery.outcome == "delivered" and delivery.detail.startswith("3 instances"), delivery
        assert peer.stored == [i.sop_instance_uid for i in instances]
    else:  # the SR went in, the captures could not: part of the document reached the peer
        assert delivery.outcome == "unknown" and not delivery.destination_wide, delivery
        assert (
            "1 of 3 instances stored" in delivery.detail
            and "Secondary Capture Image Storage" in delivery.detail
        )
        assert peer.stored == [instances[0].sop_instance_uid]


def test_stow_rs_sends_one_request_with_a_part_per_instance(tmp_path: Path) -> None:
    instances = [instance_file(tmp_path, SC) for _ in range(3)]
    received: list[tuple[dict[str, str], bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = StowRsDestination.model_validate(
            {
                "name": "viewer",
                "type": "stowrs",
                "url": f"http://127.0.0.1:{server.server_address[1]}/dicom-web",
            }
        )
        delivery = StowRsSender(dest).send(instances)
    finally:
        server.shutdown()
    assert delivery.outcome == "delivered", delivery
    ((headers, body),) = received
    assert int(headers["Content-Length"]) == len(body)
    message = BytesParser().parsebytes(f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body)
    parts = [p.get_payload(decode=True) for p in message.get_payload()]
    assert parts == [i.path.read_bytes() for i in instances]


def test_stow_rs_outcomes_of_a_document_of_several_instances() -> None:
    uids = ["1.2.3.1", "1.2.3.2"]

    def failed(*pairs: tuple[str, int]) -> bytes:
        items = [
            {"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [r]}} for u, r in pairs
        ]
        return json.dumps({"00081198": {"vr": "SQ", "Value": items}}).encode()

    assert _stow_outcome(200, b"", uids).outcome == "delivered"
    partial = _stow_outcome(202, failed(("1.2.3.2", 0xA700)), uids)
    assert (
        partial.outcome == "unknown"
        and partial.destination_wide
        and "1 of 2 instances stored" in partial.detail
    )
    refused = _stow_outcome(409, failed(("1.2.3.1", 0xC000), ("1.2.3.2", 0xC000)), uids)
    assert refused.outcome == "failed" and not refused.destination_wide
    duplicates = _stow_outcome(409, failed(("1.2.3.1", DUPLICATE), ("1.2.3.2", DUPLICATE)), uids)
    assert duplicates.outcome == "delivered" and duplicates.duplicate
    assert _stow_outcome(202, failed(("9.9.9", 0xC000)), uids).outcome == "delivered"  # not ours
