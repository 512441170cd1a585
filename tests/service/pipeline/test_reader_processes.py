"""Readers in processes (``reader_processes``, :mod:`retinaedge.service.pipeline.remote`): the same answers
as the readers in threads, every box; the same errors (malformed 400, outside the intended use 422 with its
rules); the kept header crosses over (``/v1/results``); a reader process killed mid-service fails only what
it held and is replaced."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import signal
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import httpx
import pytest
from retinaedge.runtime.cli import main
from support.clients import dicom_post
from support.dicomgen import out_of_scope
from support.paths import DEMO, EXAMPLES
from support.polling import poll
from support.servers import serve_app

STUDY = sorted((EXAMPLES / "study_01").glob("*.dcm"))
MULTIFRAME = EXAMPLES / "study_01_multiframe" / "MF0001.dcm"
J2K = EXAMPLES / "compressed" / "study_01_IM0016_J2K.dcm"


@pytest.fixture(scope="module")
def served() -> Any:
    """The demo bundle served with two reader processes: (base URL, app)."""
    import tempfile

    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings
    from support.servers import free_port

    settings = load_settings(
        model=DEMO,
        data_dir=Path(tempfile.mkdtemp(prefix="retinaedge-readers-")),
        port=free_port(),
        reader_processes=2,
        max_batch_size=4,
        queue_size=16,
        min_free_bytes=0,
    )
    app = create_app(settings)
    with serve_app(app, settings.port) as url:
        yield url, app


def _detect(files: list[Path]) -> dict[str, list[Any]]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["--log-level", "WARNING", "detect", "--model", str(DEMO), *map(str, files)]) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    return {str(Path(line["file"]).resolve()): _boxes(line) for line in lines}


def _boxes(body: dict[str, Any]) -> list[Any]:
    return [
        [(d["class_id"], d["box"], d["score"]) for d in f["detections"]]
        for f in sorted(body["frames"], key=lambda f: f["index"])
    ]


def test_same_detections_as_detect_every_box(served: Any) -> None:
    url, app = served
    files = [*STUDY[:8], MULTIFRAME, J2K]
    reference = _detect(files)
    with httpx.Client(timeout=300) as c, concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: (p, dicom_post(c, url, p.read_bytes())), files))
        for path, r in answers:
            assert r.status_code == 200, r.text
            assert _boxes(r.json()) == reference[str(path.resolve())], path
        uid = answers[0][1].json()["sop_instance_uid"]
        poll(lambda: c.get(f"{url}/v1/results/{uid}").status_code == 200, timeout=60, interval=0.05)
        kept = c.get(f"{url}/v1/results/{uid}", headers={"Accept": "application/dicom"})
        assert kept.status_code == 200 and kept.content[128:132] == b"DICM"  # an SR from the kept header
    assert len(app.state.worker._reader.pids()) == 2


def test_same_errors_as_in_threads(served: Any, tmp_path: Path) -> None:
    url, _app = served
    with httpx.Client(timeout=120) as c:
        r = dicom_post(c, url, b"\0" * 200)
        assert r.status_code == 400 and r.json()["type"].endswith(":malformed-dicom"), r.text
        r = dicom_post(c, url, out_of_scope(tmp_path)["localizer"].read_bytes())
        assert r.status_code == 422, r.text
        assert "image_types" in r.text


def test_a_killed_reader_process_fails_only_what_it_held(served: Any) -> None:
    url, app = served
    body = STUDY[0].read_bytes()
    reader = app.state.worker._reader
    for pid in reader.pids():
        os.kill(pid, signal.SIGKILL)
    with httpx.Client(timeout=120) as c:
        statuses = [dicom_post(c, url, body) for _ in range(6)]
        failed = [r for r in statuses if r.status_code != 200]
        assert all(
            r.status_code == 500 and r.json()["type"].endswith(":reader-process-failed") for r in failed
        )
        assert len(failed) <= 2  # at most one request per killed process
        assert all(dicom_post(c, url, body).status_code == 200 for _ in range(4))
    assert len(reader.pids()) == 2
