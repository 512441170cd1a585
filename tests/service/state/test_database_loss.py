"""The database can be lost without losing instances (issue 29, items 3 and 7): the database-loss drill.

Acknowledged instances wait in the spool (written exactly as intake writes them); the service is
stopped; ``state.sqlite3`` is emptied, truncated or replaced by garbage; the service starts again. Every
acknowledged instance gets exactly one result; a damaged file is moved aside with an ERROR line and
reported in ``/readyz`` and by ``boot --check``; an unreadable spool file is quarantined with a log line;
a directory named ``*.dcm`` in the spool crashes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from retinaedge.runtime.dicomio import Limits
from retinaedge.service.intake.ingest import Stored, store_spooled
from retinaedge.service.intake.spool import Spool
from retinaedge.service.repair import inspect_state
from retinaedge.service.results.evidence import IdentityFiles
from retinaedge.service.results.store import Store
from support.clients import wait_done
from support.dicomgen import mr_instance, to_bytes
from support.paths import DEMO
from support.servers import ready_client

N = 48  # as in the drill


def acknowledge(data_dir: Path, n: int) -> list[str]:
    """``n`` instances stored as STOW-RS/C-STORE store them (spool file + pending row), not processed."""
    spool = Spool(data_dir / "spool", 0)
    store = Store(data_dir / "state.sqlite3")
    identities = IdentityFiles(data_dir / "identity")
    rng = np.random.default_rng(7)
    uids = []
    for _ in range(n):
        data = to_bytes(mr_instance(rng.integers(0, 4000, (64, 64), dtype=np.uint16)))
        part, fh = spool.open_part()
        spool.write(fh, data)
        outcome = store_spooled(
            part, fh, len(data), spool=spool, store=store, limits=Limits(), identities=identities
        )
        assert isinstance(outcome, Stored) and outcome.inserted
        uids.append(outcome.sop_instance)
    store.close()
    return uids


def damage(db: Path, how: str) -> None:
    for side in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if side.exists():
            side.write_bytes(b"")  # the WAL emptied too
    if how == "emptied":
        db.write_bytes(b"")
    elif how == "truncated":
        data = db.read_bytes()
        assert len(data) > 8192
        db.write_bytes(data[: len(data) // 3])
    else:
        db.write_bytes(os.urandom(64 * 1024))


@pytest.mark.parametrize("how", ["emptied", "truncated", "garbage"])
def test_every_acknowledged_instance_gets_one_result_after_the_database_is_lost(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings

    data_dir = tmp_path / "data"
    uids = acknowledge(data_dir, N)
    spool_dir = data_dir / "spool"
    (spool_dir / "stray.dcm").mkdir()  # a directory named *.dcm: crashes nothing
    (spool_dir / "junk.dcm").write_bytes(b"not DICOM at all")
    damage(data_dir / "state.sqlite3", how)
    checked = inspect_state(data_dir / "state.sqlite3")
    assert checked["state"] == ("ok" if how == "emptied" else "damaged"), checked

    with caplog.at_level(logging.INFO):
        app = create_app(load_settings(model=DEMO, data_dir=data_dir))
        with ready_client(app) as client:
            results = [wait_done(client, "", uid, timeout=120) for uid in uids]
            ready = client.get("/readyz")
            counts = app.state.store.counts()
    assert [r["sop_instance_uid"] for r in results] == uids
    assert counts == {"done": N}  # exactly one result each, nothing else
    assert sorted(p.name for p in spool_dir.iterdir()) == ["quarantine", "stray.dcm"]
    assert (spool_dir / "quarantine" / "junk.dcm").read_bytes() == b"not DICOM at all"
    assert "junk.dcm cannot be read as an instance" in caplog.text
    assert f"{N} spool file(s) had no database row" in caplog.text
    assert "stray.dcm, which is not a regular file" in caplog.text
    assert ready.status_code == 200, ready.text
    if how == "emptied":
        assert "database" not in ready.json()
    else:
        body = ready.json()
        assert body["status"] == "degraded" and body["database"]["moved_to"].startswith(
            "state.sqlite3.damaged-"
        )
        assert any("state database was damaged" in reason for reason in body["degraded"])
        assert "is damaged" in caplog.text and (data_dir / body["database"]["moved_to"]).exists()
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors and all(r.exc_info is None for r in errors)  # a clear line, no traceback


def test_boot_check_tells_the_truth_about_a_damaged_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    acknowledge(data_dir, 2)
    damage(data_dir / "state.sqlite3", "garbage")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAEDGE_")}
    env.update({"RETINAEDGE_MODEL": str(DEMO), "RETINAEDGE_DATA_DIR": str(data_dir)})
    proc = subprocess.run(
        [sys.executable, "-m", "retinaedge.runtime.cli", "boot", "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["database"]["state"] == "damaged", report
    assert "state database damaged" in proc.stderr


def test_a_failed_start_leaves_no_inference_thread_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up that fails after the worker started stops it again: an inference thread alive when
    the interpreter exits ended in SIGABRT."""
    from fastapi.testclient import TestClient
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings

    app = create_app(load_settings(model=DEMO, data_dir=tmp_path / "data"))

    def broken() -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(app.state.services.processor, "recover", broken)
    with pytest.raises(OSError), TestClient(app):
        pass
    assert not app.state.worker._thread.is_alive()
