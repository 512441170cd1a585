"""The STOW-RS processor never stops: a failing write is retried, any other error is logged and the
next instance is processed (a real app, real worker and demo model; the fault is injected on purpose)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest
from retinaedge.service.app import create_app
from retinaedge.service.settings import load_settings
from support.clients import multipart, wait_done
from support.paths import DEMO, EXAMPLES
from support.servers import free_port, serve_app

STUDY = sorted((EXAMPLES / "study_01").glob("*.dcm"))[:3]


@pytest.mark.parametrize(
    "fault", [sqlite3.OperationalError("database or disk is full"), RuntimeError("a bug")]
)
def test_a_failure_after_an_outcome_does_not_stop_processing(tmp_path: Path, fault: Exception) -> None:
    settings = load_settings(model=DEMO, data_dir=tmp_path, port=free_port(), min_free_bytes=0)
    app = create_app(settings)
    processor = app.state.services.processor
    calls: list[int] = []
    retention = processor.after_each

    def failing_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise fault
        retention()

    processor.after_each = failing_once
    with serve_app(app, settings.port) as base, httpx.Client(timeout=60) as c:
        body, ctype = multipart([p.read_bytes() for p in STUDY])
        r = c.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        uids = [item["00081155"]["Value"][0] for item in r.json()["00081199"]["Value"]]
        for uid in uids:
            assert wait_done(c, base, uid, timeout=60)["state"] == "done"
        assert processor.running
        assert c.get(f"{base}/readyz").status_code == 200  # a storage retry clears; a bug is logged
    assert len(calls) >= len(uids)
