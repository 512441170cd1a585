"""The result writer survives a result it cannot keep: later /v1/detect results are still kept, and
nobody waits for the failed ones."""

from __future__ import annotations

from pathlib import Path

import pydicom
from retinaedge.service.results.evidence import IdentityFiles, select_header
from retinaedge.service.results.store import Store
from retinaedge.service.results.writer import KeptResult, ResultWriter
from support.paths import EXAMPLES

SOURCE = EXAMPLES / "study_01" / "IM0015.dcm"


def test_a_result_that_cannot_be_encoded_does_not_stop_the_writer(tmp_path: Path) -> None:
    store, identities = Store(tmp_path / "state.sqlite3"), IdentityFiles(tmp_path / "identity")
    writer = ResultWriter(store, identities)
    ds = pydicom.dcmread(SOURCE, stop_before_pixels=True)

    def kept(uid: str, body: dict[str, object]) -> KeptResult:
        return KeptResult(
            uid, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, 1000, body, select_header(ds)
        )

    writer.start()
    try:
        assert writer.keep(kept("1.2.3.1", {"frames": [], "bad": object()}))  # not JSON: a bug's stand-in
        assert writer.settle(30)  # the failed group is not waited for
        assert writer.keep(kept("1.2.3.2", {"frames": []}))
        assert writer.settle(30)
    finally:
        writer.stop()
    assert store.get("1.2.3.1") is None
    row = store.get("1.2.3.2")
    assert row is not None and row.state == "done"
    store.close()
