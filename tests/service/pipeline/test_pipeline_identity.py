"""Detections through the batching service match ``retinaedge detect`` on the same files, every frame and
every box, by the export's parity rule (same label, IoU >= 0.99, |score delta| <= 1e-3, all matched):
8 concurrent clients post single-frame, multi-frame and JPEG 2000 instances over /v1/detect and STOW-RS at
once, while the first batch is held until frames of several instances wait, so batches mix requests."""

from __future__ import annotations

import concurrent.futures
import io
import json
import threading
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from retinaedge.runtime.cli import main
from retinaedge.runtime.detections import ImageDetections
from retinaedge.runtime.matching import match_detections
from retinaedge.service.pipeline.stages import InferenceWorker
from support.clients import dicom_post, multipart, wait_done
from support.paths import DEMO, EXAMPLES
from support.polling import poll
from support.servers import serve

STUDY = sorted((EXAMPLES / "study_01").glob("*.dcm"))
MULTIFRAME = EXAMPLES / "study_01_multiframe" / "MF0001.dcm"
J2K = EXAMPLES / "compressed" / "study_01_IM0016_J2K.dcm"
CLIENTS = 8


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _frames(body: dict[str, Any]) -> list[ImageDetections]:
    return [
        ImageDetections.from_arrays(
            [d["box"] for d in f["detections"]],
            [d["score"] for d in f["detections"]],
            [d["class_id"] for d in f["detections"]],
        )
        for f in sorted(body["frames"], key=lambda f: f["index"])
    ]


@pytest.fixture(scope="module")
def reference() -> dict[str, list[ImageDetections]]:
    """``retinaedge detect`` (in-process, sequential, batch 4) on every file: detections per frame by path."""
    files = [*STUDY, MULTIFRAME, J2K]
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["--log-level", "WARNING", "detect", "--model", str(DEMO), *map(str, files)]) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    assert len(lines) == len(files)
    return {str(Path(line["file"]).resolve().relative_to(EXAMPLES.parent)): _frames(line) for line in lines}


def test_batched_service_matches_detect(
    reference: dict[str, list[ImageDetections]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # /v1/detect: the multi-frame, the JPEG 2000 and half the study; STOW-RS: the other half (other UIDs).
    j2k_uid = _uid(J2K)
    stow = [p for p in STUDY[len(STUDY) // 2 :] if _uid(p) != j2k_uid]
    detect = [MULTIFRAME, J2K, *(p for p in STUDY if p not in stow)]
    detect_parts = [detect[i :: CLIENTS // 2] for i in range(CLIENTS // 2)]
    stow_parts = [stow[i :: CLIENTS // 2] for i in range(CLIENTS // 2)]

    batches: list[set[int]] = []  # the instances (job ids) each serving batch held
    held = threading.Event()
    real_infer = InferenceWorker._infer

    def infer(self: InferenceWorker, detector: Any, batch: list[Any]) -> None:
        if not held.is_set():  # the first batch waits (bounded) until frames of several instances wait
            held.set()
            poll(lambda: self._frames.qsize() >= 6, timeout=60, interval=0.01)
        batches.append({id(f.job) for f in batch})
        real_infer(self, detector, batch)

    monkeypatch.setattr(InferenceWorker, "_infer", infer)
    with (
        serve(model=DEMO, queue_size=32, max_batch_size=4, max_frames_in_flight=64, min_free_bytes=0) as url,
        httpx.Client(timeout=300) as c,
    ):

        def post_detect(files: list[Path]) -> list[tuple[str, dict[str, Any]]]:
            out = []
            for path in files:
                r = dicom_post(c, url, path.read_bytes())
                assert r.status_code == 200, r.text
                out.append((str(path.relative_to(EXAMPLES.parent)), r.json()))
            return out

        def post_stow(files: list[Path]) -> list[str]:
            body, ctype = multipart([p.read_bytes() for p in files])
            r = c.post(f"{url}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 200, r.text
            return [str(p.relative_to(EXAMPLES.parent)) for p in files]

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            detected = [pool.submit(post_detect, part) for part in detect_parts]
            stowed = [pool.submit(post_stow, part) for part in stow_parts]
            answers = [a for f in detected for a in f.result()]
            stored = [p for f in stowed for p in f.result()]
        for path in stored:
            answers.append((path, wait_done(c, url, _uid(EXAMPLES.parent / path))))
        metrics = c.get(f"{url}/metrics").text

    assert sorted(p for p, _ in answers) == sorted(str(p.relative_to(EXAMPLES.parent)) for p in detect + stow)
    compared = boxes = 0
    for path, body in answers:
        assert [f["index"] for f in body["frames"]] == list(range(len(body["frames"]))), path  # frame order
        ref, got = reference[path], _frames(body)
        assert len(got) == len(ref), f"{path}: {len(got)} frames, detect gave {len(ref)}"
        for index, (r, g) in enumerate(zip(ref, got, strict=True)):
            report = match_detections(r, g, iou_min=0.99, score_tol=1e-3)
            assert report.candidate == report.reference and report.match_rate == 1.0, (path, index, report)
            compared += 1
            boxes += len(r)
    assert compared == len(STUDY) + 27 + 1 and boxes > 0  # every frame of every file
    mixed = [b for b in batches if len(b) > 1]
    assert mixed, f"no batch held frames of two instances: {batches[:10]}"
    assert "retinaedge_batch_frames_count" in metrics
