"""Service drills: the whole pydicom corpus on both endpoints, patient-data canaries, overload with memory
figures, and a SIGKILL crash drill while clients stream STOW-RS requests."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import random
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from support.clients import multipart, wait_done
from support.dicomgen import mr_instance, to_bytes
from support.forkserver import Launcher
from support.paths import CORPUS_FILES, demo_any_image
from support.polling import poll
from support.servers import free_port, rss_mib, serve, start_server
from support.streams import stow_streams

#: The demo model without its intended use: pydicom's corpus (CT, US, SC, broken files) reaches the runtime.
ANY_IMAGE = demo_any_image()

CONTRACT_4XX = {400, 413, 415, 422}


@pytest.mark.slow
def test_corpus_on_both_endpoints(tmp_path: Path) -> None:
    statuses: dict[str, dict[int, int]] = {"detect": {}, "stow": {}}
    with serve(model=ANY_IMAGE, data_dir=tmp_path) as base, httpx.Client(timeout=300) as c:
        for path in CORPUS_FILES:
            data = Path(path).read_bytes()
            r = c.post(f"{base}/v1/detect", content=data, headers={"Content-Type": "application/dicom"})
            assert r.status_code == 200 or r.status_code in CONTRACT_4XX, (path, r.status_code, r.text[:300])
            if r.status_code != 200:
                assert r.headers["content-type"] == "application/problem+json" and r.json()["detail"]
            statuses["detect"][r.status_code] = statuses["detect"].get(r.status_code, 0) + 1
            body, ctype = multipart([data])
            r = c.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code in (200, 202, 409), (path, r.status_code, r.text[:300])
            statuses["stow"][r.status_code] = statuses["stow"].get(r.status_code, 0) + 1
    assert statuses["detect"].get(200, 0) >= 55
    print("corpus on both endpoints, status counts:", json.dumps(statuses))


MARKERS = ["CANARYNAME", "CANARYID", "19010203", "CANARYACC", "987654321"]


def _canary(frames: int = 1) -> pydicom.Dataset:
    pixels = np.random.default_rng(9).integers(0, 4096, size=(frames, 96, 96), dtype=np.uint16)
    ds = mr_instance(pixels if frames > 1 else pixels[0], window=(2048, 4096))
    ds.PatientName = "CANARYNAME^TEST"
    ds.PatientID = "CANARYID"
    ds.PatientBirthDate = "19010203"
    ds.AccessionNumber = "CANARYACC"
    ds.InstitutionName = "CANARYINST"
    uid = "1.2.826.0.1.987654321." + str(random.randrange(10**9))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID = "1.2.826.0.1.987654321.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.987654321.2"
    return ds


def test_no_patient_data_in_logs_metrics_or_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = to_bytes(_canary())
    truncated = good[:-2000]
    lying = _canary()
    lying.Rows = 65535
    bad_bodies: list[str] = []
    with serve(model=ANY_IMAGE, data_dir=tmp_path) as base, httpx.Client(timeout=60) as c:
        assert (
            c.post(
                f"{base}/v1/detect", content=good, headers={"Content-Type": "application/dicom"}
            ).status_code
            == 200
        )
        for data in (truncated, to_bytes(lying)):
            r = c.post(f"{base}/v1/detect", content=data, headers={"Content-Type": "application/dicom"})
            assert r.status_code in CONTRACT_4XX
            bad_bodies.append(r.text)
        body, ctype = multipart([to_bytes(_canary(2)), truncated])
        r = c.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 202
        uid = r.json()["00081199"]["Value"][0]["00081155"]["Value"][0]
        wait_done(c, base, uid)
        bad_bodies.append(c.get(f"{base}/v1/results/1.2.826.0.1.987654321.404").text)
        metrics = c.get(f"{base}/metrics").text
    # The server's records (the test's own HTTP client logs the URLs it requests: not the server's logs).
    server = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    logs = "\n".join(f"{r.name} {r.levelname} {r.getMessage()}" for r in server)
    assert "inference worker ready" in logs  # the capture worked
    for marker in MARKERS:
        assert marker not in logs, f"{marker} leaked into the logs"
        assert marker not in metrics, f"{marker} leaked into /metrics"
        for body in bad_bodies:
            assert marker not in body, f"{marker} leaked into an error body: {body}"
    # The database (and its WAL) holds no patient name, ID, birth date or accession number; the identity
    # files the SRs need hold them, nothing else beside the results holds the institution.
    database = b"".join(p.read_bytes() for p in tmp_path.glob("state.sqlite3*"))
    identity = b"".join(p.read_bytes() for p in (tmp_path / "identity").glob("*.json"))
    for marker in ("CANARYNAME", "CANARYID", "19010203", "CANARYACC", "CANARYINST"):
        assert marker.encode() not in database, f"{marker} is in the SQLite database"
    for marker in ("CANARYNAME", "CANARYID", "19010203", "CANARYACC"):
        assert marker.encode() in identity, f"{marker} is not kept for the SR"
    assert b"CANARYINST" not in identity  # not needed by any SR: not kept at all


@pytest.mark.slow
def test_overload_four_times_the_queue_memory_flat(tmp_path: Path) -> None:
    """Four rounds of 4x queue_size concurrent requests against a real server process whose inference is
    held by a gate (not by a slow CPU): each round exactly 1 + queue_size are accepted and answered 200,
    the rest get 503 with Retry-After; the server's RSS stays flat over the rounds."""
    queue_size = 2
    clients = 4 * queue_size
    config = tmp_path / "settings.json"
    config.write_text(
        json.dumps({"data_dir": str(tmp_path / "data"), "queue_size": queue_size, "retry_after_s": 3})
    )
    frames = np.random.default_rng(3).integers(0, 4096, size=(8, 256, 320), dtype=np.uint16)
    data = to_bytes(mr_instance(frames, window=(2048, 4096)))
    gate = tmp_path / "gate"
    entered = tmp_path / "gate.entered"
    port = free_port()
    proc = start_server(ANY_IMAGE, config, port, gate=gate)
    rounds = []
    try:
        url = f"http://127.0.0.1:{port}/v1/detect"

        def post(_: int) -> httpx.Response:
            return httpx.post(url, content=data, headers={"Content-Type": "application/dicom"}, timeout=300)

        for _ in range(4):
            gate.touch()
            entered.unlink(missing_ok=True)
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                try:
                    first = pool.submit(post, 0)
                    poll(entered.exists, timeout=60, interval=0.01)
                    assert entered.exists(), "the worker never started the first request"
                    rest = [pool.submit(post, k) for k in range(1, clients)]
                    refused = clients - 1 - queue_size
                    poll(
                        lambda rest=rest, refused=refused: sum(f.done() for f in rest) >= refused,
                        timeout=120,
                        interval=0.02,
                    )
                finally:
                    gate.unlink()
                rs = [first.result(), *(f.result() for f in rest)]
            codes = [r.status_code for r in rs]
            assert codes.count(200) == 1 + queue_size and codes.count(503) == refused, codes
            assert all(r.headers["retry-after"] == "3" for r in rs if r.status_code == 503)
            assert all(len(r.json()["frames"]) == 8 for r in rs if r.status_code == 200)
            rounds.append(
                {"ok": codes.count(200), "503": codes.count(503), "rss_mib": round(rss_mib(proc.pid), 1)}
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    growth = rounds[-1]["rss_mib"] - rounds[0]["rss_mib"]
    print(
        f"overload, {4 * queue_size} clients vs queue {queue_size}:",
        json.dumps(rounds),
        f"growth {growth:.1f} MiB",
    )
    assert growth < 30, rounds


@pytest.mark.slow
def test_crash_drill_sigkill_50_times(tmp_path: Path, launcher: Launcher) -> None:
    """Clients stream STOW-RS while the server is SIGKILLed at random moments 50 times; every acknowledged
    instance has exactly one result at the end."""
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "max_batch_size": 2}))
    rng = random.Random(1234)
    port = free_port()
    kills = 0
    # Each server is a real `retinaedge serve` process forked from the launcher, which has done the imports
    # (tests/support/forkserver.py): a start costs the server's own boot, not a new interpreter's.
    with stow_streams(f"http://127.0.0.1:{port}/dicomweb/studies") as acknowledged:
        while kills < 50:
            proc = launcher.start_server(ANY_IMAGE, config, port)
            # A random moment of the server's first half second (it was the first second): that still spans
            # two or more of each client's requests (one every ~0.2 s) and the recovery of what the last
            # server left pending, so kills land in every phase of both; more of them now land while a
            # backlog is being worked through.
            time.sleep(rng.uniform(0.05, 0.5))
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
            kills += 1
    proc = launcher.start_server(ANY_IMAGE, config, port)
    try:
        with httpx.Client(timeout=120) as c:
            for uid in sorted(acknowledged):
                assert wait_done(c, f"http://127.0.0.1:{port}", uid, timeout=600)["state"] == "done"
    finally:
        proc.stop()
    import sqlite3

    db = sqlite3.connect(tmp_path / "data" / "state.sqlite3")
    rows = db.execute("SELECT sop_instance_uid, state FROM instances").fetchall()
    states = {uid: state for uid, state in rows}
    assert len(rows) == len(states)  # one row (one result) per UID
    assert all(states.get(uid) == "done" for uid in acknowledged)
    assert not list((tmp_path / "data" / "spool").glob("*"))  # nothing left behind
    print(f"crash drill: {kills} SIGKILLs, {len(acknowledged)} acknowledged instances, all with one result")
    assert len(acknowledged) >= 20


@pytest.mark.slow
def test_crash_drill_two_models_never_mix(tmp_path: Path, launcher: Launcher, any_mr_bundle: Path) -> None:
    """Two models take every instance (the demo without an intended use, and a second bundle): clients
    stream STOW-RS while the server is SIGKILLed 8 times; at the end every acknowledged instance has
    exactly one done result per model, each produced by the model of its row, and no spool file is left."""
    from support.several import ANY_NAME

    demo_name = "retinaedge-demo-brainmr"
    config = tmp_path / "settings.json"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(tmp_path / "data"),
                "max_batch_size": 2,
                "models": [str(ANY_IMAGE), str(any_mr_bundle)],
            }
        )
    )
    rng = random.Random(4321)
    port = free_port()
    with stow_streams(f"http://127.0.0.1:{port}/dicomweb/studies") as acknowledged:
        for _ in range(8):
            proc = launcher.start_server(None, config, port)
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
    proc = launcher.start_server(None, config, port)
    try:
        with httpx.Client(timeout=120) as c:
            for uid in sorted(acknowledged):
                for model in (demo_name, ANY_NAME):
                    done = wait_done(c, f"http://127.0.0.1:{port}", f"{uid}?model={model}", timeout=600)
                    assert done["state"] == "done" and done["model"]["name"] == model
    finally:
        proc.stop()
    import sqlite3

    db = sqlite3.connect(tmp_path / "data" / "state.sqlite3")
    rows = db.execute("SELECT sop_instance_uid, model, state, result_json FROM instances").fetchall()
    assert len(rows) == len(
        {(uid, model) for uid, model, _s, _r in rows}
    )  # one result per instance and model
    for uid in acknowledged:
        mine = [(m, s, json.loads(r)["model"]["name"]) for u, m, s, r in rows if u == uid]
        assert sorted(mine) == sorted([(demo_name, "done", demo_name), (ANY_NAME, "done", ANY_NAME)]), uid
    assert not list((tmp_path / "data" / "spool").glob("*"))  # nothing left behind
    print(f"two-model crash drill: 8 SIGKILLs, {len(acknowledged)} acknowledged instances")
    assert len(acknowledged) >= 3
