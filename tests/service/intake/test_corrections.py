"""A corrected copy of a failed instance replaces the failed one (issue 29, item 10).

A corrupt JPEG 2000 instance fails in decoding; the intact copy with the same SOP Instance UID, sent
again over STOW-RS or C-STORE, is processed and its result replaces the failure (as ``/v1/detect``
already did). A copy of an instance that is done or still pending stays idempotent: the first stands.
"""

from __future__ import annotations

import asyncio
import io

import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid
from retinaedge.service.dimse.receive import Receiver
from support.clients import multipart
from support.paths import DEMO, EXAMPLES
from support.polling import wait_until
from support.servers import ready_client

INTACT = EXAMPLES / "compressed" / "study_01_IM0016_J2K.dcm"


def copies() -> tuple[bytes, bytes, str, str]:
    """(corrupt, intact) bytes of one fresh SOP Instance UID, its SOP class and UID."""
    intact = pydicom.dcmread(INTACT)
    uid = generate_uid()
    intact.SOPInstanceUID = uid
    intact.file_meta.MediaStorageSOPInstanceUID = uid
    (codestream,) = generate_frames(intact.PixelData, number_of_frames=1)
    broken = pydicom.dcmread(INTACT)
    broken.SOPInstanceUID = uid
    broken.file_meta.MediaStorageSOPInstanceUID = uid
    broken.PixelData = encapsulate([codestream[: len(codestream) // 4]])
    out = []
    for ds in (broken, intact):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out[0], out[1], str(intact.SOPClassUID), uid


@pytest.mark.parametrize("endpoint", ["stow-rs", "c-store"])
def test_a_corrected_copy_replaces_the_failed_instance(
    tmp_path: pytest.TempPathFactory, endpoint: str
) -> None:
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings

    app = create_app(load_settings(model=DEMO, data_dir=tmp_path / "data"))  # type: ignore[operator]
    broken, intact, sop_class, uid = copies()
    with ready_client(app) as client:
        services = app.state.services

        def send(data: bytes) -> None:
            if endpoint == "stow-rs":
                body, ctype = multipart([data])
                assert (
                    client.post(
                        "/dicomweb/studies", content=body, headers={"Content-Type": ctype}
                    ).status_code
                    == 200
                )
            else:
                receiver = Receiver(
                    services.spool,
                    services.store,
                    services.limits,
                    services.identities,
                    services.admit,
                    1 << 30,
                    services.processor.enqueue,
                    loop=client.portal.call(asyncio.get_running_loop),  # as the SCP's receiver has it
                )
                assert receiver.receive(sop_class, uid, data).status == 0x0000

        def state() -> str:
            row = services.store.get(uid)
            return "" if row is None else row.state

        send(broken)
        assert (
            wait_until(
                state,
                "the corrupt copy processed",
                lambda s: s in ("done", "failed"),
                timeout=60,
                interval=0.05,
            )
            == "failed"
        )
        send(intact)
        assert (
            wait_until(
                state, "the corrected copy processed", lambda s: s in ("done",), timeout=60, interval=0.05
            )
            == "done"
        )
        r = client.get(f"/v1/results/{uid}")
        assert r.status_code == 200 and r.json()["frames"], r.text
        first = services.store.get(uid)
        send(intact)  # done: a third copy is idempotent, the result stands
        assert services.store.get(uid) == first
