"""Two models in one appliance (issue: several models per appliance): the committed demo bundle (brain
MR, axial) and a second bundle exported here from the same checkpoint with another intended use (MR,
axial or sagittal). Each instance goes to exactly the models whose intended use accepts it, through
``/v1/detect``, STOW-RS and C-STORE (dcmtk's storescu); a C-STORE to an AE title bound to one model runs
that model only; each model's SRs reach a real receiving peer (Orthanc); results are per instance and
model. One model overloaded while another computes its result answers 207 with both outcomes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from support.clients import multipart, wait_done
from support.dicomgen import out_of_scope
from support.paths import DEMO, EXAMPLES
from support.peers_dcmtk import dcmtk
from support.peers_orthanc import Orthanc
from support.polling import wait_until
from support.servers import free_port, serve
from support.several import ANY_NAME

DEMO_NAME = "retinaedge-demo-brainmr"
pytestmark = pytest.mark.slow


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def post_dicom(c: httpx.Client, url: str, path: Path) -> httpx.Response:
    return c.post(url, content=path.read_bytes(), headers={"Content-Type": "application/dicom"})


def test_each_instance_reaches_exactly_the_models_that_take_it(
    any_mr_bundle: Path, orthanc_tree: Path, tmp_path: Path
) -> None:
    strangers = out_of_scope(tmp_path / "strangers")
    axial, sagittal, ct = EXAMPLES / "study_01" / "IM0015.dcm", strangers["sagittal-mr"], strangers["ct"]
    by_ae = EXAMPLES / "study_01" / "IM0016.dcm"
    pacs = Orthanc(orthanc_tree, tmp_path / "pacs", aet="PACS").start()
    port = free_port()
    destinations = [
        {"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port,
         "documents": ["sr"]},
    ]  # fmt: skip
    try:
        with (
            serve(
                # The second model on its own backend (OpenVINO, FP32: the openvino extra make test installs).
                models=[
                    str(DEMO),
                    {"path": str(any_mr_bundle), "ae_titles": ["ANYMR"], "backend": "openvino"},
                ],
                dimse_port=port,
                export_destinations=destinations,
            ) as base,
            httpx.Client(timeout=60) as c,
        ):
            listed = c.get(f"{base}/v1/models").json()["models"]
            assert [m["name"] for m in listed] == [DEMO_NAME, ANY_NAME]
            assert [m["state"] for m in listed] == ["ready", "ready"]
            assert [m["backend"] for m in listed] == ["onnxruntime", "openvino"]
            assert listed[1]["ae_titles"] == ["ANYMR"] and listed[0]["intended_use"]["orientation"]
            assert c.get(f"{base}/v1/models/nope").json()["type"].endswith("unknown-model")

            # STOW-RS of a mixed study, and a C-STORE to the AE title bound to one model.
            body, ctype = multipart([p.read_bytes() for p in (axial, sagittal, ct)])
            r = c.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 200 and len(r.json()["00081199"]["Value"]) == 3, r.text
            sent = dcmtk().run("storescu", "-aet", "SCANNER", "-aec", "ANYMR", "127.0.0.1", str(port),
                               str(by_ae))  # fmt: skip
            assert sent.returncode == 0, sent.stdout[-2000:]
            wrong = dcmtk().run("echoscu", "-aet", "SCANNER", "-aec", "NOBODY", "127.0.0.1", str(port))
            assert wrong.returncode != 0  # an AE title neither ours nor bound: refused

            def result(path: Path, model: str | None = None) -> dict[str, Any]:
                query = f"?model={model}" if model else ""
                return wait_done(c, base, uid_of(path) + query)

            for model in (DEMO_NAME, ANY_NAME):
                done = result(axial, model)
                assert done["state"] == "done" and done["model"]["name"] == model
            listed_results = c.get(f"{base}/v1/results/{uid_of(axial)}").json()["results"]
            assert [r["model"]["name"] for r in listed_results] == [DEMO_NAME, ANY_NAME]
            assert (
                c.get(
                    f"{base}/v1/results/{uid_of(axial)}", headers={"Accept": "application/dicom"}
                ).status_code
                == 400
            )  # a document of which model? ?model= says
            assert result(sagittal)["model"]["name"] == ANY_NAME  # the one model that took it
            assert result(sagittal, DEMO_NAME)["state"] == "not-applicable"
            none = result(ct)
            assert none["state"] == "not-applicable"
            assert [m["model"] for m in none["models"]] == [DEMO_NAME, ANY_NAME]
            assert result(by_ae)["model"]["name"] == ANY_NAME  # the bound AE title ran one model
            assert c.get(f"{base}/v1/results/{uid_of(by_ae)}?model={DEMO_NAME}").status_code == 404

            expected = {
                (uid_of(axial), DEMO_NAME), (uid_of(axial), ANY_NAME), (uid_of(sagittal), ANY_NAME),
                (uid_of(by_ae), ANY_NAME),
            }  # fmt: skip

            def delivered() -> set[tuple[str, str]] | None:
                jobs = c.get(f"{base}/v1/exports").json()["jobs"]
                done = {(j["subject_uid"], j["model"]) for j in jobs if j["state"] == "delivered"}
                return done if done >= expected else None

            got = wait_until(delivered, "each model's SRs delivered", timeout=90, interval=0.3)
            assert {m for _u, m in got} == {DEMO_NAME, ANY_NAME}
            # /v1/detect: every model that takes it (after the exports: a /v1/detect result exports nothing).
            both = post_dicom(c, f"{base}/v1/detect", axial).json()
            assert [r["model"]["name"] for r in both["results"]] == [DEMO_NAME, ANY_NAME]
            assert both["not_applicable"] == []
            alone = post_dicom(c, f"{base}/v1/models/{DEMO_NAME}/detect", axial).json()
            assert alone["model"]["name"] == DEMO_NAME
            assert [d["box"] for f in alone["frames"] for d in f["detections"]] == [
                d["box"] for f in both["results"][0]["frames"] for d in f["detections"]
            ]  # the same model, the same boxes, whichever route ran it
            one = post_dicom(c, f"{base}/v1/detect", sagittal).json()
            assert [r["model"]["name"] for r in one["results"]] == [ANY_NAME]
            assert [d["model"] for d in one["not_applicable"]] == [DEMO_NAME]
            refused = post_dicom(c, f"{base}/v1/detect", ct)
            assert refused.status_code == 422 and refused.json()["type"].endswith("not-applicable")
            assert [m["model"] for m in refused.json()["models"]] == [DEMO_NAME, ANY_NAME]
            assert post_dicom(c, f"{base}/v1/models/{DEMO_NAME}/detect", sagittal).status_code == 422

            counts = {m["name"]: m["instances"] for m in c.get(f"{base}/v1/models").json()["models"]}
            assert counts[DEMO_NAME]["not_applicable"] >= 2 and counts[ANY_NAME]["not_applicable"] >= 1
        srs = [pydicom.dcmread(__import__("io").BytesIO(pacs.instance_file(i))) for i in pacs.instances()]
        assert len(srs) == len(got)
        series = {(str(s.StudyInstanceUID), str(s.SeriesInstanceUID)) for s in srs}
        assert len({se for _st, se in series}) >= 2  # one SR series per study and model
    finally:
        pacs.stop()


def hold(worker: Any, folder: Path, n: int) -> list[tuple[Path, Any]]:
    """Fill ``worker``'s pipeline with ``n`` instances whose files are FIFOs nobody writes yet: each one's
    reader waits in ``open()`` until :func:`release`, whatever the CPU's speed."""
    held = []
    for k in range(n):
        fifo = folder / f"held-{id(worker)}-{k}"
        os.mkfifo(fifo)
        held.append((fifo, worker.submit(fifo)))
    return held


def release(held: list[tuple[Path, Any]], worker: Any) -> None:
    """Open and close each FIFO's writing end: its reader sees an empty file (a failed instance), and the
    pipeline is free again."""

    def writer(fifo: Path) -> int | None:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until the reader has it open
        except OSError:
            return None

    for fifo, _future in held:
        os.close(
            wait_until(lambda f=fifo: writer(f), "the reader opened its FIFO", timeout=60, interval=0.01)
        )
    for _fifo, future in held:
        assert future.exception(timeout=60) is not None  # an empty file is no DICOM file
    wait_until(lambda: worker.depth == 0, "the pipeline emptied", timeout=60, interval=0.01)


def test_one_model_overloaded_answers_207_with_the_others_result(any_mr_bundle: Path, tmp_path: Path) -> None:
    """``queue_size`` 1: two instances in a model's pipeline at most. With the second model's pipeline held
    full, ``/v1/detect`` answers 207: the first model's result (kept), the second one's 503 problem with
    its Retry-After; with both full, 503; once freed, 200 with both results."""
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings
    from support.servers import ready_client

    axial = EXAMPLES / "study_01" / "IM0015.dcm"
    settings = load_settings(data_dir=tmp_path / "data", models=[str(DEMO), str(any_mr_bundle)],
                             queue_size=1, prepare_threads=2)  # fmt: skip
    app = create_app(settings)
    headers = {"Content-Type": "application/dicom"}
    with ready_client(app) as c:
        lanes = app.state.services.lanes
        held = hold(lanes[ANY_NAME].worker, tmp_path, 2)
        r = c.post("/v1/detect", content=axial.read_bytes(), headers=headers)
        assert r.status_code == 207, r.text
        body = r.json()
        assert [x["model"]["name"] for x in body["results"]] == [DEMO_NAME] and body["not_applicable"] == []
        (error,) = body["errors"]
        assert error["model"] == ANY_NAME and error["type"].endswith("overloaded")
        assert error["status"] == 503 and "queue is full" in error["detail"]
        assert error["retry_after"] == settings.retry_after_s == int(r.headers["Retry-After"])
        kept = wait_until(lambda: c.get(f"/v1/results/{uid_of(axial)}?model={DEMO_NAME}"),
                          "the first model's result kept", lambda g: g.status_code == 200,
                          timeout=60, interval=0.05)  # fmt: skip
        assert kept.json()["frames"] == body["results"][0]["frames"]

        held += hold(lanes[DEMO_NAME].worker, tmp_path, 2)  # no model can take it now
        r = c.post("/v1/detect", content=axial.read_bytes(), headers=headers)
        assert r.status_code == 503 and r.json()["type"].endswith("overloaded"), r.text
        assert r.headers["Retry-After"] == str(settings.retry_after_s)

        release(held[:2], lanes[ANY_NAME].worker)
        release(held[2:], lanes[DEMO_NAME].worker)
        r = c.post("/v1/detect", content=axial.read_bytes(), headers=headers)
        assert r.status_code == 200, r.text
        assert [x["model"]["name"] for x in r.json()["results"]] == [DEMO_NAME, ANY_NAME]
        assert r.json()["errors"] == []
