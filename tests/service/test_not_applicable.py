"""Instances outside the model's intended use through the service: ``/v1/detect`` answers 422
``not-applicable`` with the rules; STOW-RS and C-STORE (dcmtk's storescu) store and acknowledge them,
``GET /v1/results`` says ``not-applicable``, nothing is exported (a real receiving peer, Orthanc, counts
only the documents of the applicable instance), series completion leaves them out, and ``/metrics``
counts them by model and rule."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from support.clients import multipart, wait_done
from support.dicomgen import OUT_OF_SCOPE_RULES, out_of_scope
from support.paths import DEMO, EXAMPLES
from support.peers_dcmtk import dcmtk
from support.peers_orthanc import Orthanc
from support.polling import wait_until
from support.servers import free_port, serve

APPLICABLE = EXAMPLES / "study_01" / "IM0015.dcm"  # has findings: one SR to export
MODEL = "retinaedge-demo-brainmr"
pytestmark = pytest.mark.slow


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_not_applicable_on_every_endpoint_and_nothing_is_exported(orthanc_tree: Path, tmp_path: Path) -> None:
    strangers = out_of_scope(tmp_path / "strangers")
    by_stow = [strangers[n] for n in ("ct", "sc-rgb", "secondary-capture")]
    by_cstore = [strangers[n] for n in ("us-rgb", "sagittal-mr", "localizer")]
    pacs = Orthanc(orthanc_tree, tmp_path / "pacs", aet="PACS").start()
    port = free_port()
    destinations = [
        {"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port,
         "documents": ["sr", "gsps"]},
    ]  # fmt: skip
    try:
        with (
            serve(model=DEMO, dimse_port=port, export_destinations=destinations) as base,
            httpx.Client(timeout=60) as c,
        ):
            for name, path in strangers.items():
                r = c.post(
                    f"{base}/v1/detect",
                    content=path.read_bytes(),
                    headers={"Content-Type": "application/dicom"},
                )
                assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", name
                problem = r.json()
                assert problem["type"].endswith("not-applicable") and problem["model"] == MODEL
                assert {rule["rule"] for rule in problem["rules"]} >= OUT_OF_SCOPE_RULES[name], name
            body, ctype = multipart([p.read_bytes() for p in [*by_stow, APPLICABLE]])
            r = c.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 200, r.text  # every instance stored and acknowledged
            stored = r.json()["00081199"]["Value"]
            assert len(stored) == 4 and "00081198" not in r.json()
            tools = dcmtk()
            sent = tools.run("storescu", "-aet", "SCANNER", "-aec", "RETINAEDGE", "127.0.0.1", str(port),
                             *map(str, by_cstore))  # fmt: skip
            assert sent.returncode == 0, sent.stdout[-2000:]  # each acknowledged with Success
            for path in [*by_stow, *by_cstore]:
                result = wait_done(c, base, uid_of(path))
                assert result["state"] == "not-applicable" and result["model"] == MODEL
                name = next(n for n, p in strangers.items() if p == path)
                assert {rule["rule"] for rule in result["rules"]} >= OUT_OF_SCOPE_RULES[name]
            assert wait_done(c, base, uid_of(APPLICABLE))["state"] == "done"

            def exported() -> dict[str, Any] | None:
                answer = c.get(f"{base}/v1/exports").json()
                return answer if [j["state"] for j in answer["jobs"]] == ["delivered"] * 2 else None

            answer = wait_until(
                exported, "the applicable instance's SR and GSPS delivered", timeout=60, interval=0.2
            )
            assert {j["subject_uid"] for j in answer["jobs"]} == {uid_of(APPLICABLE)}
            time.sleep(1.0)  # nothing else arrives later either
            assert len(c.get(f"{base}/v1/exports").json()["jobs"]) == 2
            metrics = c.get(f"{base}/metrics").text
            assert f'retinaedge_not_applicable_total{{model="{MODEL}",rule="orientation"}} 2.0' in metrics
            assert f'retinaedge_not_applicable_total{{model="{MODEL}",rule="image_types"}} 2.0' in metrics
            assert 'retinaedge_instances_total{outcome="not-applicable"}' in metrics
            # The series of the applicable instance: the stranger sent in its study (localizer: its own
            # series) does not count; the secondary capture's series has no instance to link.
            series = uid_of_series(strangers["localizer"])
            assert c.post(f"{base}/v1/series/{series}/complete").status_code == 200
            status = c.get(f"{base}/v1/series/{series}").json()
            assert status["instances"]["not_applicable"] == 1 and status["instances"]["failed"] == 0
            assert status["findings"] == [] and status["left_out"] == []
        assert len(pacs.instances()) == 2  # the SR and the GSPS of the one applicable instance
    finally:
        pacs.stop()


def uid_of_series(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
