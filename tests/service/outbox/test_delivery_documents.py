"""Result export of the ``gsps`` and ``kos`` documents through the Dispatcher's threads, on a real
SQLite database, with a stand-in sender that keeps what it is given.

An instance with findings gets its GSPS, one without gets none (its job is dropped and counted as
``skipped``, not dead-lettered); each time a series of a study completes, a new KOS of the study (a new
SOP instance in the same series) lists the study's images with findings so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from prometheus_client import CollectorRegistry, generate_latest
from pydicom.dataset import Dataset
from retinaedge.runtime.detector import Detector
from retinaedge.service.outbox.delivery import Dispatcher
from retinaedge.service.outbox.metrics import DeliveryCollector
from retinaedge.service.outbox.senders import Delivery, Instance
from retinaedge.service.results.evidence import IdentityFiles, split_header
from retinaedge.service.results.store import Store
from retinaedge.service.settings import load_settings
from support.paths import DEMO, EXAMPLES
from support.polling import wait_until

SLICES = [EXAMPLES / "study_01" / name for name in ("IM0001.dcm", "IM0015.dcm")]  # no finding; findings
MULTIFRAME = EXAMPLES / "study_01_multiframe" / "MF0001.dcm"  # the same study, another series
DESTINATION = {"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}


class Keeper:
    """A sender that delivers everything to a list."""

    def __init__(self) -> None:
        self.sent: list[Dataset] = []

    def send(self, instances: Sequence[Instance], timeout_s: float | None = None) -> Delivery:
        self.sent += [pydicom.dcmread(i.path) for i in instances]
        return Delivery("delivered", "kept")

    def of(self, sop_class: str) -> list[Dataset]:
        return [ds for ds in self.sent if ds.SOPClassUID == sop_class]


GSPS, KOS = "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.88.59"


def receive(det: Detector, store: Store, identities: IdentityFiles, source: Path) -> dict[str, Any]:
    """``source`` as STOW-RS or C-STORE records it (pending with its kept header), then its result."""
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    with open(source, "rb") as fh:
        evidence, identity = split_header(fh)
    uid = str(ds.SOPInstanceUID)
    identities.put(uid, identity, replace=True)
    assert store.add_pending(
        uid, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, "x.dcm", 1, evidence
    )
    result = det.detect(source).to_json()
    store.done(uid, result)
    return result


def test_gsps_per_instance_with_findings_and_a_kos_per_completed_series(tmp_path: Path) -> None:
    settings = load_settings(
        model=DEMO,
        data_dir=tmp_path,
        series_quiet_s=3600.0,  # complete by request only
        export_destinations=[{**DESTINATION, "documents": ["gsps", "kos"]}],
    )
    store = Store(tmp_path / "state.sqlite3")
    identities = IdentityFiles(tmp_path / "identity")
    keeper = Keeper()
    with Detector.open(DEMO, threads=1) as det:
        manifest = det.bundle.manifest
        dispatcher = Dispatcher(settings, store, identities, manifest.name, str(manifest.model_sha256))
        dispatcher._senders["pacs"] = keeper  # the stand-in for the PACS
        dispatcher.start()
        try:
            results = {s.name: receive(det, store, identities, s) for s in SLICES}
            findings = {
                n: sum(d["finding"] for f in r["frames"] for d in f["detections"]) for n, r in results.items()
            }
            assert findings["IM0001.dcm"] == 0 and findings["IM0015.dcm"] > 0
            dispatcher.wake()
            wait_until(
                lambda: keeper.of(GSPS), "the GSPS of the slice with findings", timeout=30, interval=0.05
            )
            wait_until(
                lambda: dispatcher.summary()[0]["skipped"] == 1,
                "the slice without findings skipped",
                timeout=30,
                interval=0.05,
            )
            (gsps,) = keeper.of(GSPS)
            ref = gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
            assert ref == results["IM0015.dcm"]["sop_instance_uid"]

            first_series = pydicom.dcmread(SLICES[0], stop_before_pixels=True)
            store.request_series_complete(first_series.SeriesInstanceUID)
            wait_until(
                lambda: keeper.of(KOS), "the KOS once the first series is complete", timeout=30, interval=0.05
            )
            mf = receive(det, store, identities, MULTIFRAME)
            store.request_series_complete(
                pydicom.dcmread(MULTIFRAME, stop_before_pixels=True).SeriesInstanceUID
            )
            dispatcher.wake()
            wait_until(
                lambda: len(keeper.of(KOS)) == 2,
                "a second KOS once the second series is complete",
                timeout=30,
                interval=0.05,
            )
            jobs = wait_until(
                lambda: [j.to_json() for j in dispatcher.outbox.jobs(None, None, 100)],
                "every job delivered",
                lambda js: len(js) == 4 and all(j["state"] == "delivered" for j in js),
                timeout=30,
                interval=0.05,
            )
            (status,) = dispatcher.summary()
        finally:
            dispatcher.stop()
    first, second = keeper.of(KOS)
    assert (
        first.SeriesInstanceUID == second.SeriesInstanceUID and first.SOPInstanceUID != second.SOPInstanceUID
    )

    def listed(kos: Dataset) -> list[str]:
        return [
            i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for i in kos.ContentSequence
            if i.ValueType == "IMAGE"
        ]

    assert listed(first) == [results["IM0015.dcm"]["sop_instance_uid"]]
    assert listed(second) == [results["IM0015.dcm"]["sop_instance_uid"], mf["sop_instance_uid"]]
    assert status["dead_lettered"] == 0 and status["jobs"]["dead"] == 0 and status["skipped"] == 1
    registry = CollectorRegistry()
    registry.register(DeliveryCollector(dispatcher))
    assert 'retinaedge_export_skipped_total{destination="pacs"} 1.0' in generate_latest(registry).decode()
    assert sorted((j["kind"], j["document"]) for j in jobs) == sorted(
        [("instance", "gsps"), ("instance", "gsps"), ("study", "kos"), ("study", "kos")]
    )
    # The skipped one (the slice without findings) is gone, not dead.
    store.close()
