"""A PACS slower than ``timeout_s``: its late success is recognised, the SR is not sent again, and it is
never dead-lettered (service/outbox/presence.py).

Two real Orthanc peers on 127.0.0.1, each made slow by a Lua filter that waits before it accepts an
instance (so the C-STORE response, or the STOW-RS answer, comes after the appliance stopped waiting):
one takes the SR by C-STORE and is asked by C-FIND, the other by STOW-RS and is asked by QIDO-RS. The
Lua filter writes one line per instance received, so the test counts what each peer was sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from support.clients import multipart, wait_done
from support.paths import DEMO, REPO_ROOT
from support.peers_orthanc import Orthanc
from support.polling import wait_until
from support.servers import serve

SOURCE = REPO_ROOT / "examples" / "study_01" / "IM0015.dcm"  # has findings: one SR
SLOW_S = 3  # the peers' delay before accepting an instance; the destinations wait 1 s
pytestmark = pytest.mark.slow


def slow_orthanc(tree: Path, workdir: Path, aet: str) -> Orthanc:
    workdir.mkdir(parents=True)
    received = workdir / "received.log"
    script = workdir / "slow.lua"
    script.write_text(
        "function ReceivedInstanceFilter(dicom, origin, info)\n"
        f"  local f = io.open('{received}', 'a'); f:write('instance\\n'); f:close()\n"
        f"  os.execute('sleep {SLOW_S}')\n"
        "  return true\n"
        "end\n"
    )
    # The appliance may query it (a PACS lists the nodes it answers C-FIND from; here: any).
    extra = {"LuaScripts": [str(script)], "DicomAlwaysAllowFind": True}
    return Orthanc(tree, workdir, aet=aet, extra=extra).start()


def sent_to(peer: Orthanc) -> int:
    log = peer.workdir / "received.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_a_slow_peer_gets_the_sr_once_and_it_is_delivered_not_dead_lettered(
    orthanc_tree: Path, tmp_path: Path
) -> None:
    pacs = slow_orthanc(orthanc_tree, tmp_path / "pacs", "PACS")
    web = slow_orthanc(orthanc_tree, tmp_path / "web", "WEB")
    try:
        destinations = [
            {"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1",
             "port": pacs.dicom_port, "timeout_s": 1},
            {"name": "web", "type": "stowrs", "url": web.dicomweb, "timeout_s": 1},
        ]  # fmt: skip
        with (
            serve(
                model=DEMO,
                export_destinations=destinations,
                export_max_attempts=2,  # the first attempt times out: the second is the last
                export_retry_initial_s=SLOW_S + 1.0,  # the peer has stored it by then
                export_retry_max_s=SLOW_S + 1.0,
            ) as base,
            httpx.Client(timeout=60) as c,
        ):
            body, ctype = multipart([SOURCE.read_bytes()])
            assert c.post(
                f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype}
            ).is_success
            uid = str(pydicom.dcmread(SOURCE, stop_before_pixels=True).SOPInstanceUID)
            wait_done(c, base, uid)

            def finished() -> dict[str, Any] | None:
                answer = c.get(f"{base}/v1/exports").json()
                states = {(j["destination"], j["state"]) for j in answer["jobs"]}
                return answer if states == {("pacs", "delivered"), ("web", "delivered")} else None

            answer = wait_until(finished, "both SRs delivered", timeout=60, interval=0.2)
            for job in answer["jobs"]:
                history = c.get(f"{base}/v1/exports/{job['id']}").json()["history"]
                assert [a["outcome"] for a in history] == ["unknown", "delivered"], history
                assert "the peer holds it" in history[-1]["detail"]
                assert job["duplicate"] is None  # one unanswered attempt stored it, nothing was re-sent
            for d in answer["destinations"]:
                assert d["duplicates"] == {"possible": 0, "confirmed": 0}
                assert d["jobs"]["dead"] == 0
        # Each peer was sent the SR once, holds it once, and it is the SR the appliance serves.
        assert sent_to(pacs) == sent_to(web) == 1
        assert len(pacs.instances()) == len(web.instances()) == 1
    finally:
        pacs.stop()
        web.stop()
