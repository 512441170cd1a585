"""The disk-full drill: a 20 MB tmpfs data directory under a real ``retinaedge serve``.

A part larger than the free space, a part that would cross the reserve, aborted and stalled uploads, and
the disk filled from outside while acknowledged instances are processed: 507 (never a 500) before the
reserve is crossed, no part file left behind, processing resumes by itself once space returns, and every
acknowledged instance has exactly one result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from support.clients import multipart
from support.forkserver import Launcher
from support.paths import DEMO, REPO_ROOT
from support.polling import wait_until
from support.servers import free_port
from support.tmpfs import mounted_tmpfs

STUDY = sorted((REPO_ROOT / "examples" / "study_01").glob("*.dcm"))
RESERVE = 4 * 1024**2
CTYPE = multipart([])[1]


def _multipart(parts: list[bytes]) -> bytes:
    return multipart(parts)[0]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 20 MB tmpfs (needs root: CI runs as root; elsewhere the drill is skipped with the reason)."""
    with mounted_tmpfs(tmp_path / "tmpfs", why="the disk-full drill") as mnt:
        yield mnt


@pytest.fixture
def server(tmpfs: Path, tmp_path: Path, launcher: Launcher) -> Iterator[tuple[str, Path]]:
    data = tmpfs / "data"
    config = tmp_path / "settings.json"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(data),
                "min_free_bytes": RESERVE,
                "request_idle_timeout_s": 1.0,
                "max_body_bytes": 64 * 1024**2,
                "retry_after_s": 1,
            }
        )
    )
    port = free_port()
    proc = launcher.start_server(DEMO, config, port)
    try:
        yield f"http://127.0.0.1:{port}", data
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    log = (tmp_path / f"server-{port}.log").read_text()
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]


def _parts_left(data: Path) -> list[Path]:
    return list((data / "spool").glob("*.part"))


def _raw_upload(base: str, body: bytes, declared: int, *, wait_reply: bool) -> bytes:
    """Send the headers and ``body`` of a STOW-RS request declaring ``declared`` bytes; then either close
    the connection at once (an aborted upload) or wait for the server's answer (a stalled one)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            (
                f"POST /dicomweb/studies HTTP/1.1\r\nHost: {host}\r\nContent-Type: {CTYPE}\r\n"
                f"Content-Length: {declared}\r\n\r\n"
            ).encode()
            + body
        )
        if not wait_reply:
            return b""
        return s.recv(65536)


def _instances(copies: int) -> tuple[list[bytes], list[str]]:
    """``copies`` of the example study with fresh UIDs (distinct instances, real pixel data)."""
    out, uids = [], []
    for k in range(copies):
        for n, path in enumerate(STUDY):
            ds = pydicom.dcmread(path)
            uid = f"1.2.826.0.1.3680043.10.1{k}.{n + 1}"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.1{k}"
            from io import BytesIO

            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            out.append(buf.getvalue())
            uids.append(uid)
    return out, uids


@pytest.mark.slow
def test_disk_full_drill(server: tuple[str, Path], tmpfs: Path) -> None:
    base, data = server
    c = httpx.Client(timeout=60)

    # 1. A part larger than the free space: 507 while it is written, the part discarded.
    big = os.urandom(24 * 1024**2)
    r = c.post(f"{base}/dicomweb/studies", content=_multipart([big]), headers={"Content-Type": CTYPE})
    assert r.status_code == 507, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert not _parts_left(data)

    # 2. A part that fits the free space but not beside the reserve: 507 before the reserve is crossed.
    free = shutil.disk_usage(tmpfs).free
    fits = os.urandom(free - RESERVE // 2)
    r = c.post(f"{base}/dicomweb/studies", content=_multipart([fits]), headers={"Content-Type": CTYPE})
    assert r.status_code == 507, r.text
    assert not _parts_left(data)
    assert shutil.disk_usage(tmpfs).free >= free - 64 * 1024  # nothing of it stayed

    # 3. Aborted uploads: the connection closed mid-part leaves nothing.
    for _ in range(4):
        _raw_upload(base, _multipart([os.urandom(2 * 1024**2)])[: 1024**2], 3 * 1024**2, wait_reply=False)
    wait_until(
        lambda: not _parts_left(data), "the aborted uploads' parts are discarded", timeout=10, interval=0.1
    )

    # 4. A stalled upload: 408 after the idle timeout, the part discarded.
    reply = _raw_upload(base, _multipart([os.urandom(300_000)])[:200_000], 300_000 + 200, wait_reply=True)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    wait_until(
        lambda: not _parts_left(data), "the stalled upload's part is discarded", timeout=10, interval=0.1
    )
    assert c.get(f"{base}/readyz").status_code == 200  # all of that left the service ready

    # 5. Acknowledged instances, then the disk filled from outside while they are processed.
    bodies, uids = _instances(3)
    r = c.post(f"{base}/dicomweb/studies", content=_multipart(bodies), headers={"Content-Type": CTYPE})
    assert r.status_code == 200, r.text
    acknowledged = {item["00081155"]["Value"][0] for item in r.json()["00081199"]["Value"]}
    assert acknowledged == set(uids)
    filler = tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)  # unbuffered: nothing is left to flush at close
    try:
        for _ in range(20 * 1024 // 64 + 16):  # bounded: more blocks than a 20 MB disk holds
            os.write(fd, b"\0" * 65536)
    except OSError:  # ENOSPC: the disk is full
        pass
    finally:
        os.close(fd)
    assert shutil.disk_usage(tmpfs).free < 65536
    # Full disk: no new instance is taken (507, not 500), and the service says it is not ready.
    r = c.post(f"{base}/dicomweb/studies", content=_multipart(bodies[:1]), headers={"Content-Type": CTYPE})
    assert r.status_code in (507, 200), r.text  # 200: the duplicate is idempotent without a write
    ready = c.get(f"{base}/readyz")
    assert ready.status_code == 503 and ready.json()["detail"], ready.text
    time.sleep(2)
    filler.unlink()
    started = time.monotonic()

    def all_done() -> bool:
        return all(c.get(f"{base}/v1/results/{uid}").status_code == 200 for uid in sorted(acknowledged))

    wait_until(
        all_done, "every acknowledged instance is processed once space has returned", timeout=30, interval=0.1
    )
    resumed_s = time.monotonic() - started
    wait_until(
        lambda: c.get(f"{base}/readyz").status_code == 200,
        "the service is ready again",
        timeout=10,
        interval=0.1,
    )
    assert not list((data / "spool").glob("*"))
    db = sqlite3.connect(data / "state.sqlite3")
    rows = db.execute("SELECT sop_instance_uid, state FROM instances").fetchall()
    db.close()
    assert sorted(u for u, _ in rows) == sorted(acknowledged)  # exactly one row (result) per instance
    assert {s for _, s in rows} == {"done"}
    print(
        f"disk-full drill: {len(acknowledged)} acknowledged, all done {resumed_s:.1f} s after space returned"
    )


def test_readiness_says_when_the_disk_is_inside_its_reserve(tmp_path: Path) -> None:
    """/readyz is 503 while the spool's disk has less than min_free_bytes free (every new instance would
    get 507), whatever the processing is doing (the drill above shows it ready again once space returns)."""
    import httpx
    from support.paths import DEMO
    from support.servers import serve

    with serve(model=DEMO, data_dir=tmp_path / "data", min_free_bytes=2**62) as base, httpx.Client() as c:

        def reserve_reported() -> bool:
            return "reserve" in c.get(f"{base}/readyz").text

        wait_until(reserve_reported, "the model loaded and the reserve reported", timeout=60, interval=0.1)
        r = c.get(f"{base}/readyz")
        assert (
            r.status_code == 503
            and "below the" in r.json()["detail"]
            and "min_free_bytes" in r.json()["detail"]
        )
