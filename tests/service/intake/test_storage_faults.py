"""Storage failures map to statuses a sender retries (issue 29, item 6).

A read-only remount of the data volume (as ext4 does after an I/O error on a failing eMMC), an I/O error
and any other OSError or SQLite error on the spool or the database: STOW-RS and every other route
answer 503 with ``Retry-After`` (never a 500 with a traceback), C-STORE answers ``A700`` (never ``0110``),
``/readyz`` is 503 with the reason, and a start on a read-only volume serves 503 instead of exiting.

The read-only volume is a real one: a small tmpfs remounted ``ro`` (needs root to mount; skipped
otherwise). The I/O error is injected into ``os.fsync`` of this process.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from retinaedge.runtime.dicomio import Limits
from retinaedge.service.dimse.receive import Receiver
from retinaedge.service.intake.spool import Spool
from retinaedge.service.results.evidence import IdentityFiles
from retinaedge.service.results.store import Store
from support.clients import multipart
from support.dicomgen import mr_instance, to_bytes
from support.paths import DEMO
from support.servers import ready_client
from support.tmpfs import mounted_tmpfs

STOW = "/dicomweb/studies"


def instance() -> tuple[bytes, str, str]:
    ds = mr_instance(np.random.default_rng().integers(0, 4000, (32, 32), dtype=np.uint16))
    return to_bytes(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def stow(client: object, data: bytes) -> object:
    body, ctype = multipart([data])
    return client.post(STOW, content=body, headers={"Content-Type": ctype})  # type: ignore[attr-defined]


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A 20 MB tmpfs that the test may remount read-only."""
    with mounted_tmpfs(tmp_path / "volume", why="remounting it read-only") as mnt:
        yield mnt


def remount(mnt: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)


def test_a_read_only_volume_gives_503_a700_and_a_503_start(
    volume: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While running: the spool's files cannot be created (EROFS, injected into the spool module: a
    tmpfs with files open for writing cannot be remounted). Then a real start on the volume remounted
    read-only."""
    from fastapi.testclient import TestClient
    from retinaedge.service.app import create_app
    from retinaedge.service.intake import spool as spool_module
    from retinaedge.service.settings import load_settings

    settings = load_settings(model=DEMO, data_dir=volume / "data", min_free_bytes=0)
    app = create_app(settings)
    with ready_client(app) as client:
        assert stow(client, instance()[0]).status_code == 200

        def read_only(*_args: object, **_kwargs: object) -> object:
            raise OSError(errno.EROFS, "Read-only file system")

        with caplog.at_level(logging.WARNING), monkeypatch.context() as m:
            m.setattr(spool_module, "open", read_only, raising=False)
            r = stow(client, instance()[0])
            assert r.status_code == 503 and r.headers["Retry-After"], r.text
            assert "Read-only file system" in r.json()["detail"]
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "not writable" in ready.json()["detail"]
            services = app.state.services
            receiver = Receiver(
                services.spool,
                services.store,
                Limits(),
                services.identities,
                lambda: None,
                1 << 30,
                lambda _u: None,
            )
            data_bytes, sop_class, sop_instance = instance()
            outcome = receiver.receive(sop_class, sop_instance, data_bytes)
            assert outcome.status == 0xA700 and "storage unavailable" in outcome.comment
        assert not [r for r in caplog.records if r.exc_info is not None]  # no traceback
    remount(volume, "ro")
    try:  # /healthz alive, /readyz and the routes 503 with the reason and Retry-After; no exit
        with TestClient(create_app(settings)) as client:
            assert client.get("/healthz").status_code == 200
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.headers["Retry-After"], ready.text
            assert (
                "Read-only file system" in ready.json()["detail"] or "not writable" in ready.json()["detail"]
            )
            r = stow(client, instance()[0])
            assert r.status_code == 503 and r.headers["Retry-After"], r.text
        boot = _boot_check(settings.data_dir)  # a storage fault, not a configuration error: no exit 78
        assert boot.returncode == 0, boot.stderr
        assert "serving 503 until it is fixed" in boot.stderr and "Traceback" not in boot.stderr
    finally:
        remount(volume, "rw")


def _boot_check(data_dir: Path) -> subprocess.CompletedProcess[str]:
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAEDGE_")}
    env.update({"RETINAEDGE_MODEL": str(DEMO), "RETINAEDGE_DATA_DIR": str(data_dir)})
    return subprocess.run(
        [sys.executable, "-m", "retinaedge.runtime.cli", "boot", "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_an_io_error_while_spooling_is_503_and_a700(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings

    app = create_app(load_settings(model=DEMO, data_dir=tmp_path / "data"))
    with ready_client(app) as client:

        def eio(_fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        with monkeypatch.context() as m:
            m.setattr(os, "fsync", eio)
            r = stow(client, instance()[0])
            assert r.status_code == 503 and r.headers["Retry-After"] == "30", r.text
            assert r.json()["type"].endswith("storage-unavailable")
        services = app.state.services
        spool = services.spool
        assert not list(spool.root.glob("*.part")) and not spool.files()  # nothing left behind

        def locked(*_args: object, **_kwargs: object) -> bool:
            raise sqlite3.OperationalError("disk I/O error")

        services.store._db.execute("PRAGMA query_only = ON")  # the database cannot be written
        try:
            r = stow(client, instance()[0])
            assert r.status_code == 503 and r.headers["Retry-After"], r.text
            assert "database cannot be written" in r.json()["detail"]
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "state database cannot be written" in ready.json()["detail"]
            receiver = Receiver(
                spool, services.store, Limits(), services.identities, lambda: None, 1 << 30, lambda _u: None
            )
            data_bytes, sop_class, sop_instance = instance()
            outcome = receiver.receive(sop_class, sop_instance, data_bytes)
            assert outcome.status == 0xA700 and "storage unavailable" in outcome.comment, outcome
        finally:
            services.store._db.execute("PRAGMA query_only = OFF")
        assert client.get("/readyz").status_code == 200
        with monkeypatch.context() as m:
            m.setattr(services.store, "instance_rows", locked)
            r = client.get("/v1/results/1.2.3.4")  # any route: a storage error is 503, not 500
            assert r.status_code == 503 and r.headers["Retry-After"], r.text


def test_receiver_maps_every_storage_error_to_a700(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    store = Store(tmp_path / "state.sqlite3")

    def admit() -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    receiver = Receiver(
        spool, store, Limits(), IdentityFiles(tmp_path / "identity"), admit, 1 << 30, lambda _u: None
    )
    data_bytes, sop_class, sop_instance = instance()
    outcome = receiver.receive(sop_class, sop_instance, data_bytes)
    assert outcome.status == 0xA700, outcome
