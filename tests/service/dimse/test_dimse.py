"""The C-STORE SCP against a real DICOM peer: dcmtk's echoscu and storescu (Debian's packages, unpacked by
:mod:`support.peers_dcmtk`) on 127.0.0.1.

C-ECHO; the sample study (27 instances) and the JPEG 2000 instance (``-xv``) acknowledged, stored as
received and processed; calling AEs that are not allowed rejected at association; pydicom's test files
with a status and a reason for each; A700 at the disk reserve; and SIGKILLs of the service during C-STORE
associations, after which every instance acknowledged with Success has exactly one result.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from support.certs import self_signed
from support.clients import wait_done
from support.dicomgen import mr_instance, write
from support.paths import CORPUS, REPO_ROOT, demo_any_image
from support.peers_dcmtk import Dcmtk, dcmtk
from support.polling import poll, wait_until
from support.servers import free_port, serve, start_server

#: The demo model without its intended use: pydicom's corpus (CT, US, SC, broken files) reaches the runtime.
ANY_IMAGE = demo_any_image()

STUDY = sorted((REPO_ROOT / "examples" / "study_01").glob("*.dcm"))
J2K = REPO_ROOT / "examples" / "compressed" / "study_01_IM0016_J2K.dcm"
AET = "RETINAEDGE"
ALLOWED = ["SCANNER1@127.0.0.1", "SCANNER2", "PINNED@10.9.9.9"]
SUCCESS = "Received Store Response (Success)"


@pytest.fixture(scope="session")
def tools() -> Dcmtk:
    return dcmtk()


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, Path]]:
    """The service in this process with its SCP on a free port: (base URL, DIMSE port, data dir)."""
    data = tmp_path_factory.mktemp("dimse-data")
    port = free_port()
    with serve(model=ANY_IMAGE, data_dir=data, dimse_port=port, dimse_allowed_aets=ALLOWED) as base:
        yield base, port, data


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _acknowledged(output: str) -> list[str]:
    """The files storescu ``-v`` reports a Success status for, in order."""
    done, current = [], None
    for line in output.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
        elif SUCCESS in line and current is not None:
            done.append(current)
            current = None
    return done


def test_echo_and_association_rejections(tools: Dcmtk, scp: tuple[str, int, Path]) -> None:
    base, port, _ = scp
    ok = tools.run("echoscu", "-v", "-aet", "SCANNER1", "-aec", AET, "127.0.0.1", str(port))
    assert ok.returncode == 0 and "Received Echo Response (Success)" in ok.stdout, ok.stdout
    for calling in ("INTRUDER", "PINNED"):  # not listed; listed, but only from another host
        r = tools.run("echoscu", "-aet", calling, "-aec", AET, "127.0.0.1", str(port))
        assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stdout, (calling, r.stdout)
    r = tools.run("echoscu", "-aet", "SCANNER1", "-aec", "NOT-US", "127.0.0.1", str(port))
    assert r.returncode != 0 and "Called AE Title Not Recognized" in r.stdout, r.stdout
    metrics = httpx.get(f"{base}/metrics").text
    assert 'retinaedge_dimse_associations_total{result="rejected"} 3.0' in metrics
    assert "retinaedge_dimse_echoes_total 1.0" in metrics
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["dimse"]["state"] == "listening" and ready["dimse"]["port"] == port


def test_storescu_study_and_jpeg2000(
    tools: Dcmtk, scp: tuple[str, int, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    base, port, data = scp
    r = tools.run("storescu", "-v", "-aet", "SCANNER2", "-aec", AET, "127.0.0.1", str(port), *map(str, STUDY))
    assert r.returncode == 0, r.stdout[-2000:]
    assert _acknowledged(r.stdout) == [str(p) for p in STUDY]  # each of the 27 acknowledged
    r = tools.run("storescu", "-v", "-xv", "-aet", "SCANNER1", "-aec", AET, "127.0.0.1", str(port), str(J2K))
    assert r.returncode == 0 and _acknowledged(r.stdout) == [str(J2K)], r.stdout[-2000:]
    with httpx.Client(timeout=30) as c:
        results = {p: wait_done(c, base, _uid(p), timeout=120) for p in [*STUDY, J2K]}
        assert all(res["state"] == "done" for res in results.values())
        # Stored as received: the JPEG 2000 instance was decoded from its own transfer syntax.
        assert results[J2K]["image"]["transfer_syntax"] == "1.2.840.10008.1.2.4.90"
        assert {results[p]["image"]["transfer_syntax"] for p in STUDY} == {"1.2.840.10008.1.2.1"}
        series = pydicom.dcmread(STUDY[0], stop_before_pixels=True).SeriesInstanceUID
        assert c.get(f"{base}/v1/series/{series}").json()["instances"]["done"] == 27
        # The same instances again: idempotent (Success, the first copies stand, one row each).
        r = tools.run(
            "storescu", "-v", "-aet", "SCANNER2", "-aec", AET, "127.0.0.1", str(port), *map(str, STUDY[:3])
        )
        assert len(_acknowledged(r.stdout)) == 3, r.stdout[-2000:]
        assert c.get(f"{base}/v1/series/{series}").json()["instances"]["received"] == 27
    db = sqlite3.connect(data / "state.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 28
    db.close()
    patient = pydicom.dcmread(STUDY[0], stop_before_pixels=True)
    logs = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for value in (str(patient.PatientName), str(patient.PatientID), _uid(STUDY[0])):
        assert value not in logs


#: storescu's option proposing a file's own compressed transfer syntax (besides the uncompressed ones),
#: so that it sends the file as it is.
PROPOSE = {
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def _store_status(tools: Dcmtk, port: int, path: str) -> tuple[str, str | None, str | None]:
    """storescu ``-d`` of one file, proposing its own transfer syntax -> (what happened, DIMSE status,
    Error Comment)."""
    try:
        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    except Exception:
        ts = ""
    propose = [PROPOSE[ts]] if ts in PROPOSE else []
    r = tools.run(
        "storescu", "-d", *propose, "-aet", "SCANNER2", "-aec", AET, "127.0.0.1", str(port), path, timeout=120
    )
    status = re.search(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", r.stdout)
    comment = re.search(r"\(0000,0902\) LO \[(.*?)\]", r.stdout)
    if status is not None:
        return "status", status.group(1).upper(), comment.group(1) if comment else None
    if "No presentation context for" in r.stdout or "No Acceptable Presentation Contexts" in r.stdout:
        return "refused-at-negotiation", None, None
    return "not-sent", None, None  # dcmtk could not read or convert the file itself


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the corpus' broken files
def test_pydicom_corpus_by_storescu(
    tools: Dcmtk, scp: tuple[str, int, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    base, port, _ = scp
    files = sorted(str(p) for p in CORPUS.glob("*.dcm"))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outcomes = dict(zip(files, pool.map(lambda f: _store_status(tools, port, f), files), strict=True))
    counts: dict[str, int] = {}
    for path, (what, status, comment) in outcomes.items():
        key = f"{what}:{status}" if status else what
        counts[key] = counts.get(key, 0) + 1
        if what == "status" and status != "0000":
            assert comment, f"{Path(path).name}: failure status {status} without an Error Comment"
    print("pydicom corpus by storescu:", json.dumps(dict(sorted(counts.items()))))
    assert counts.get("status:0000", 0) >= 45
    assert sum(n for k, n in counts.items() if k.startswith("status:") and k != "status:0000") >= 2
    assert httpx.get(f"{base}/readyz").status_code == 200  # nothing crashed
    ok = tools.run("echoscu", "-aet", "SCANNER1", "-aec", AET, "127.0.0.1", str(port))
    assert ok.returncode == 0
    bad = [r for r in caplog.records if r.exc_info or r.exc_text or "Traceback" in r.getMessage()]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


def test_out_of_resources_at_the_disk_reserve(tools: Dcmtk, tmp_path: Path) -> None:
    port = free_port()
    with serve(model=ANY_IMAGE, data_dir=tmp_path, dimse_port=port, min_free_bytes=10**18) as base:
        what, status, comment = _store_status(tools, port, str(STUDY[0]))
        assert (what, status) == ("status", "A700"), (what, status, comment)
        assert comment is not None and "reserve" in comment
        metrics = httpx.get(f"{base}/metrics").text
        assert 'retinaedge_dimse_stores_total{status="out-of-resources"} 1.0' in metrics
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
    db.close()
    assert not list((tmp_path / "spool").glob("*"))


def test_out_of_resources_at_the_backlog_limit(tools: Dcmtk, tmp_path: Path) -> None:
    """Inference held by a gate: one instance acknowledged fills a backlog of one; the next get A700
    until the backlog drains, then Success again."""
    port = free_port()
    config = tmp_path / "settings.json"
    config.write_text(
        json.dumps({"data_dir": str(tmp_path / "data"), "dimse_port": port, "max_pending_instances": 1})
    )
    gate = tmp_path / "gate"
    gate.touch()
    http_port = free_port()
    proc = start_server(ANY_IMAGE, config, http_port, gate=gate)
    try:
        r = tools.run(
            "storescu",
            "-v",
            "-nh",
            "-aet",
            "SCANNER",
            "-aec",
            AET,
            "127.0.0.1",
            str(port),
            *map(str, STUDY[:3]),
        )
        assert _acknowledged(r.stdout) == [str(STUDY[0])], r.stdout[-2000:]
        assert r.stdout.count("Received Store Response (Refused: OutOfResources") == 2, r.stdout[-2000:]
        what, status, comment = _store_status(tools, port, str(STUDY[1]))
        assert (what, status) == ("status", "A700") and comment and comment.startswith("backlog full"), (
            comment
        )
    finally:
        gate.unlink()
    try:
        with httpx.Client(timeout=30) as c:
            wait_done(c, f"http://127.0.0.1:{http_port}", _uid(STUDY[0]), timeout=60)
        r = tools.run("storescu", "-v", "-aet", "SCANNER", "-aec", AET, "127.0.0.1", str(port), str(STUDY[1]))
        assert _acknowledged(r.stdout) == [str(STUDY[1])], r.stdout[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_open_scp_beyond_loopback_is_refused() -> None:
    from retinaedge.runtime.errors import ConfigError
    from retinaedge.service.settings import load_settings

    token = "t" * 20
    with pytest.raises(ConfigError, match="dimse_allowed_aets"):
        load_settings(model=ANY_IMAGE, host="0.0.0.0", api_token=token, dimse_port=11112)
    with pytest.raises(ConfigError, match="not an IP address"):
        load_settings(model=ANY_IMAGE, dimse_port=11112, dimse_allowed_aets=["SCANNER1@scanner.example"])
    s = load_settings(
        model=ANY_IMAGE, host="0.0.0.0", api_token=token, dimse_port=11112, dimse_allowed_aets=["A"]
    )
    assert s.dimse_allowed_aets == ["A"]


# -- SIGKILL during C-STORE associations ---------------------------------------------------------------
#: ``retinaedge serve`` with its modules imported before it starts: it waits for the file ``argv[1]``,
#: then runs the real command. The next service process imports while the current one serves, so a
#: restart after a SIGKILL takes a fraction of a second.
PRELOADED_SERVE = """
import os, sys, time
import retinaedge.service.app, retinaedge.service.serve_cli, retinaedge.service.dimse.scp, uvicorn, pynetdicom
from retinaedge.runtime.cli import main
go = sys.argv.pop(1)
deadline = time.monotonic() + 300
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.005)
sys.exit(main(sys.argv[1:]))
"""


#: Service processes importing ahead of their turn (an import takes longer than one kill cycle).
AHEAD = 2


def _preloaded(config: Path, http_port: int, go: Path, log: Any) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-c", PRELOADED_SERVE, str(go), "serve", "--model", str(ANY_IMAGE)]
    argv += ["--port", str(http_port), "--config", str(config)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    def accepts() -> bool:
        assert proc.poll() is None, "the service exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            return False
        return True

    wait_until(accepts, "the DICOM port open", timeout=timeout, interval=0.01)


@pytest.mark.slow
def test_sigkill_during_cstore_associations(tools: Dcmtk, tmp_path: Path) -> None:
    """Two storescu clients send while the service is SIGKILLed at random moments until 30 kills have
    cut open associations; every instance that got a Success status has exactly one result at the end."""
    dimse_port, http_port = free_port(), free_port()
    config = tmp_path / "settings.json"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(tmp_path / "data"),
                "dimse_port": dimse_port,
                "max_batch_size": 1,
                "threads": 1,
                "prepare_threads": 1,
            }
        )
    )
    rng = random.Random(4321)
    acknowledged: set[str] = set()
    interrupted = [0]
    lock = threading.Lock()
    stop = threading.Event()
    busy = [False, False]  # a client's association is open

    def client(seed: int) -> None:
        local = np.random.default_rng(seed)
        work = Path(tempfile.mkdtemp(dir=tmp_path))
        while not stop.is_set():
            uids: dict[str, str] = {}
            for k in range(3):
                ds = mr_instance(local.integers(0, 4096, size=(64, 64), dtype=np.uint16), window=(2048, 4096))
                uids[str(write(ds, work / f"{seed}-{k}.dcm"))] = str(ds.SOPInstanceUID)
            proc = tools.popen(
                "storescu", "-v", "-aet", "SCANNER", "-aec", AET, "127.0.0.1", str(dimse_port), *uids
            )
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:  # as storescu logs them: "open" from its acceptance to its end
                lines.append(line)
                busy[seed] = busy[seed] or "Association Accepted" in line
            returncode = proc.wait(60)
            output, busy[seed] = "".join(lines), False
            with lock:
                acknowledged.update(uids[f] for f in _acknowledged(output))
                if returncode != 0 and "Association Accepted" in output:
                    interrupted[0] += 1  # the service died during this association
            time.sleep(0.1 if returncode == 0 else 0.03)

    log = open(tmp_path / "server.log", "ab")  # noqa: SIM115 (closed below)
    gates = (tmp_path / f"go-{k}" for k in range(10_000))
    ahead = [(gate, _preloaded(config, http_port, gate, log)) for gate in (next(gates) for _ in range(AHEAD))]
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    kills = cutting = 0  # SIGKILLs; those that cut at least one open association
    try:
        while cutting < 30 and kills < 45:
            gate, proc = ahead.pop(0)
            gate.touch()
            _wait_port(dimse_port, proc)
            gate = next(gates)
            ahead.append((gate, _preloaded(config, http_port, gate, log)))  # imports while others serve
            time.sleep(rng.uniform(0.1, 0.6))
            # then kill while an association is open, if one opens by then
            poll(lambda: any(busy), timeout=3, interval=0.002)
            before = interrupted[0]
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            kills += 1
            # the clients' runs end at once (connection reset)
            poll(lambda: not any(busy), timeout=5, interval=0.002)
            cutting += interrupted[0] > before
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        for _, waiting in ahead:
            waiting.kill()
            waiting.wait(30)
        log.close()
    assert cutting >= 30, f"only {cutting} of {kills} SIGKILLs cut an open association"
    final = start_server(ANY_IMAGE, config, http_port)
    try:
        with httpx.Client(timeout=60) as c:
            for uid in sorted(acknowledged):
                assert wait_done(c, f"http://127.0.0.1:{http_port}", uid, timeout=300)["state"] == "done"
    finally:
        final.send_signal(signal.SIGTERM)
        final.wait(120)
    db = sqlite3.connect(tmp_path / "data" / "state.sqlite3")
    states = dict(db.execute("SELECT sop_instance_uid, state FROM instances").fetchall())
    db.close()
    assert all(states.get(uid) == "done" for uid in acknowledged)  # one row (one result) per UID
    assert not list((tmp_path / "data" / "spool").glob("*"))
    print(
        f"C-STORE crash drill: {kills} SIGKILLs, {cutting} of them during C-STORE associations "
        f"({interrupted[0]} associations cut), "
        f"{len(acknowledged)} acknowledged instances, each with one result"
    )
    assert len(acknowledged) >= 20


def test_dicom_tls_with_client_certificates(
    tools: Dcmtk, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TLS with the service's certificate; with dimse_tls_ca_file a peer without a certificate that CA
    signed is refused at the handshake; a peer that connects and stays silent holds up no one."""
    caplog.set_level(logging.INFO)
    server_cert, server_key = self_signed(tmp_path, "appliance")
    client_cert, client_key = self_signed(tmp_path, "scanner")
    port = free_port()
    with (
        serve(
            model=ANY_IMAGE,
            data_dir=tmp_path / "data",
            dimse_port=port,
            tls_cert_file=server_cert,
            tls_key_file=server_key,
            dimse_tls_ca_file=client_cert,
        ) as base,
        socket.create_connection(("127.0.0.1", port)),  # silent: never starts its handshake
    ):
        assert httpx.get(f"{base}/readyz", verify=str(server_cert)).json()["dimse"]["mutual_tls"] is True
        tls = ["+tls", str(client_key), str(client_cert), "+cf", str(server_cert)]
        ok = tools.run(
            "echoscu", "-v", *tls, "-aet", "SCANNER1", "-aec", AET, "127.0.0.1", str(port), timeout=30
        )
        assert ok.returncode == 0 and "Received Echo Response (Success)" in ok.stdout, ok.stdout
        r = tools.run(
            "storescu", *tls, "-aet", "SCANNER1", "-aec", AET, "127.0.0.1", str(port), str(STUDY[0])
        )
        assert r.returncode == 0, r.stdout
        anonymous = ["+tla", "+cf", str(server_cert)]
        r = tools.run(
            "echoscu", *anonymous, "-aet", "SCANNER1", "-aec", AET, "127.0.0.1", str(port), timeout=30
        )
        assert r.returncode != 0, r.stdout
        r = tools.run("echoscu", "-aet", "SCANNER1", "-aec", AET, "127.0.0.1", str(port), timeout=30)
        assert r.returncode != 0, r.stdout  # plain DICOM on the TLS port
    bad = [r for r in caplog.records if r.exc_info or r.exc_text or "Traceback" in r.getMessage()]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


def test_the_conformance_tables_list_what_the_scp_accepts() -> None:
    from retinaedge.service.dimse.contexts import IMAGE_STORAGE, supported_contexts, transfer_syntaxes

    doc = (REPO_ROOT / "docs" / "integration.md").read_text()
    for uid, name in IMAGE_STORAGE:
        assert f"| {name} | `{uid}` |" in doc, name
    syntaxes = transfer_syntaxes()
    assert "1.2.840.10008.1.2.4.90" in syntaxes  # the runtime's JPEG 2000 decoder is installed
    for n, uid in enumerate(syntaxes, start=1):
        assert f"| {n} |" in doc and f"`{uid}` |" in doc, uid
    accepted = {cx.abstract_syntax for cx in supported_contexts()}
    assert "1.2.840.10008.5.1.4.1.1.88.34" not in accepted  # Comprehensive 3D SR: not an image


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the broken data sets it is given
def test_receiver_statuses_without_a_network(tmp_path: Path) -> None:
    """The C-STORE handler's storage path on a real spool and database: a data set that is not the
    request's is A900, garbage C000, an image-less instance of an accepted class 0122, a duplicate
    Success with the first copy standing."""
    from retinaedge.runtime.dicomio import Limits
    from retinaedge.service.dimse.receive import Receiver
    from retinaedge.service.intake.spool import Spool
    from retinaedge.service.results.evidence import IdentityFiles
    from retinaedge.service.results.store import Store

    store = Store(tmp_path / "state.sqlite3")
    queued: list[str] = []
    receiver = Receiver(
        Spool(tmp_path / "spool", 0),
        store,
        Limits(),
        IdentityFiles(tmp_path / "id"),
        lambda: None,
        10**8,
        queued.append,
    )
    data = STUDY[0].read_bytes()
    ds = pydicom.dcmread(STUDY[0], stop_before_pixels=True)
    cls, uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    mismatch = receiver.receive(cls, uid + ".9", data)
    assert (mismatch.status, mismatch.name) == (0xA900, "dataset-mismatch") and mismatch.comment
    garbage = receiver.receive(cls, uid, b"\0" * 128 + b"DICM" + b"\x02\x00" * 50)
    assert garbage.status == 0xC000 and garbage.comment.startswith("malformed-dicom"), garbage
    no_pixels = pydicom.dcmread(STUDY[1])
    del no_pixels.PixelData
    buffer = io.BytesIO()
    no_pixels.save_as(buffer, enforce_file_format=True)
    empty = receiver.receive(cls, str(no_pixels.SOPInstanceUID), buffer.getvalue())
    assert empty.status == 0x0122 and empty.comment.startswith("no-pixel-data"), empty
    assert receiver.receive(cls, uid, data).status == 0x0000
    assert receiver.receive(cls, uid, data).status == 0x0000  # again: idempotent
    assert store.counts() == {"pending": 1} and len(list((tmp_path / "spool").glob("*"))) == 1
    store.close()
