"""``make demo``: the appliance's main job, end to end, on the bundled demo model and sample studies.

1. starts ``retinaedge serve --model models/demo`` on 127.0.0.1 (a free port, a fresh data directory),
   waits for ``/readyz`` (model loaded, golden self-test passed);
2. sends every single-frame series under ``examples/`` by DICOMweb STOW-RS (one
   ``multipart/related`` request per series), then polls ``GET /v1/results/{uid}`` until each is done;
3. sends every other instance (the multi-frame and the compressed one) to ``POST /v1/detect``;
4. prints a table of findings per instance and frame (the detections at or above the model's operating
   point, ``"finding": true``; ``--min-score`` raises the floor), each checked against
   ``examples/ground_truth.json`` when it is there (IoU >= 0.5 and the same class = hit), and the misses;
   then asks for each series' 3D findings (``POST /v1/series/{uid}/complete``, the findings linked
   across slices) and prints them, each checked against ``examples/lesions.json``
   (same kind, centroid within the tumour's largest radius + 5 mm = hit);
5. writes one overlay PNG per frame with a finding or a truth box (the frame as the model saw it, findings
   in colour, ground truth in thin white) into ``--out``;
6. stops the service (SIGTERM) and exits 0; non-zero if any step failed.

Only the standard library talks HTTP here (urllib): this is what scanner software has to do. No patient
data is printed: instances are named by file, series number and instance number.

    .venv/bin/python tools/demo.py [--model models/demo] [--examples examples] [--out demo-output]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.runtime.boxes import box_iou

log = logging.getLogger("demo")

ROOT = Path(__file__).resolve().parents[1]
DICOM_JSON = "application/dicom+json"


@dataclass
class Instance:
    """A sample file and what the demo learnt about it (no patient data)."""

    path: Path
    sop_uid: str
    series_uid: str
    series_number: int
    instance_number: int
    frames: int
    result: dict[str, Any] | None = None
    route: str = ""
    truth: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


# -- HTTP (standard library only) ---------------------------------------------------------------------


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120,
) -> tuple[int, dict[str, str], bytes]:
    """One request; returns (status, headers, body) for any HTTP status."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def stow(base: str, files: list[Path]) -> dict[str, Any]:
    """POST ``files`` as one STOW-RS request; returns the Store Instances Response (DICOM JSON)."""
    boundary = uuid.uuid4().hex
    parts = [
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p.read_bytes() + b"\r\n"
        for p in files
    ]
    body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    status, _, data = http(
        "POST", f"{base}/dicomweb/studies", body, {"Content-Type": ctype, "Accept": DICOM_JSON}
    )
    if status not in (200, 202):
        raise RuntimeError(f"STOW-RS answered {status}: {data[:300]!r}")
    return json.loads(data)


def wait_result(base: str, uid: str, deadline: float) -> dict[str, Any]:
    """Poll ``GET /v1/results/{uid}`` until the result is there (200) or ``deadline``."""
    while True:
        status, headers, data = http(
            "GET", f"{base}/v1/results/{uid}", headers={"Accept": "application/json"}
        )
        if status == 200:
            return json.loads(data)
        if status != 202:
            raise RuntimeError(f"GET /v1/results answered {status}: {data[:300]!r}")
        if time.monotonic() > deadline:
            raise TimeoutError("results did not arrive in time")
        time.sleep(min(float(headers.get("Retry-After", "1")), 0.2))


def detect(base: str, path: Path) -> dict[str, Any]:
    status, _, data = http(
        "POST", f"{base}/v1/detect", path.read_bytes(), {"Content-Type": "application/dicom"}
    )
    if status != 200:
        raise RuntimeError(f"/v1/detect answered {status} for {path.name}: {data[:300]!r}")
    return json.loads(data)


def series_findings(base: str, instances: list[Instance]) -> dict[str, dict[str, Any]]:
    """Series Instance UID -> its ``/v1/series`` answer, asking for completion now (no quiet period)."""
    out = {}
    for uid in dict.fromkeys(i.series_uid for i in instances):
        status, _, data = http(
            "POST", f"{base}/v1/series/{uid}/complete", headers={"Accept": "application/json"}
        )
        if status != 200:
            raise RuntimeError(f"POST /v1/series/.../complete answered {status}: {data[:300]!r}")
        out[uid] = json.loads(data)
    return out


# -- the service ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def service(model: Path, out: Path, min_score: float | None) -> Iterator[str]:
    """``retinaedge serve`` in a subprocess on a free loopback port; yields its base URL. Series
    findings link the findings (scoring at least ``min_score`` where one is given)."""
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="retinaedge-demo-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAEDGE_")}
    env["RETINAEDGE_DATA_DIR"] = str(data_dir)
    if min_score is not None:
        env["RETINAEDGE_SERIES_MIN_SCORE"] = str(min_score)
    cmd = [
        sys.executable,
        "-m",
        "retinaedge.runtime.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
    ]
    log_path = out / "service.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the service exited with {proc.returncode}; see {log_path}")
                try:
                    status, _, body = http("GET", f"{base}/readyz", timeout=2)
                    if status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the service was not ready within 120 s; see {log_path}")
                time.sleep(0.2)
            yield base
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            import shutil

            shutil.rmtree(data_dir, ignore_errors=True)


# -- the sample studies ----------------------------------------------------------------------------------


def scan(examples: Path) -> dict[Path, list[Instance]]:
    """DICOM files under ``examples`` grouped by directory, sorted by instance number."""
    import pydicom

    groups: dict[Path, list[Instance]] = {}
    for path in sorted(examples.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        groups.setdefault(path.parent, []).append(
            Instance(
                path=path,
                sop_uid=str(ds.SOPInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                series_number=int(ds.get("SeriesNumber", 0) or 0),
                instance_number=int(ds.get("InstanceNumber", 0) or 0),
                frames=int(ds.get("NumberOfFrames", 1) or 1),
            )
        )
    for items in groups.values():
        items.sort(key=lambda i: i.instance_number)
    return groups


def attach_truth(instances: list[Instance], truth_file: Path) -> None:
    if not truth_file.is_file():
        return
    by_uid = {i.sop_uid: i for i in instances}
    for ann in json.loads(truth_file.read_text())["annotations"]:
        inst = by_uid.get(ann["sop_instance_uid"])
        if inst is not None:
            inst.truth.setdefault(int(ann["frame"]), []).append(ann)


# -- report ------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    hits: int = 0
    false_findings: int = 0
    missed: int = 0
    missed_difficult: int = 0


def shown(frame: dict[str, Any], min_score: float | None) -> list[dict[str, Any]]:
    """The findings of a result frame: detections marked ``"finding": true`` (at or above the model's
    operating point), scoring at least ``min_score`` where one is given."""
    return [
        d
        for d in frame["detections"]
        if d.get("finding", True) and (min_score is None or d["score"] >= min_score)
    ]


def frame_rows(inst: Instance, frame: dict[str, Any], min_score: float | None, tally: Tally) -> list[str]:
    """Table rows of one frame: findings (hit / no truth) then truth boxes nobody found."""
    dets = shown(frame, min_score)
    truths = inst.truth.get(int(frame["index"]), [])
    used: set[int] = set()
    rows = []
    for d in dets:
        match = next(
            (
                k
                for k, t in enumerate(truths)
                if k not in used and t["label"] == d["label"] and box_iou(d["box"], t["box"]) >= 0.5
            ),
            None,
        )
        if match is not None:
            used.add(match)
            tally.hits += 1
            verdict = "hit"
        else:
            tally.false_findings += 1
            verdict = "no truth here"
        box = "(" + ", ".join(f"{v:5.1f}" for v in d["box"]) + ")"
        rows.append(f"{d['label']:<11} {d['score']:5.2f}  {box:<30} {verdict}")
    for k, t in enumerate(truths):
        if k in used:
            continue
        if t.get("difficult"):
            tally.missed_difficult += 1
            continue
        tally.missed += 1
        box = "(" + ", ".join(f"{v:5.1f}" for v in t["box"]) + ")"
        rows.append(f"{'-':<11} {'':5}  {box:<30} missed {t['label']}")
    return rows


def print_table(instances: list[Instance], min_score: float | None) -> Tally:
    out = sys.stdout
    tally = Tally()
    out.write(
        f"\n{'file':<34} {'series':>6} {'inst':>4} {'frame':>5}  {'finding':<11} {'score':>5}  "
        f"{'box (x1, y1, x2, y2) px':<30} vs ground truth\n"
    )
    out.write("-" * 118 + "\n")
    for inst in instances:
        assert inst.result is not None
        name = f"{inst.path.parent.name}/{inst.path.name}"
        printed = False
        for frame in inst.result["frames"]:
            for row in frame_rows(inst, frame, min_score, tally):
                out.write(
                    f"{name:<34} {inst.series_number:>6} {inst.instance_number:>4} {frame['index']:>5}  {row}\n"
                )
                printed = True
        if not printed and inst.frames > 1:
            out.write(
                f"{name:<34} {inst.series_number:>6} {inst.instance_number:>4} {'all':>5}  no findings\n"
            )
    quiet = sum(
        1
        for i in instances
        for f in i.result["frames"]  # type: ignore[index]
        if not shown(f, min_score) and not i.truth.get(int(f["index"]))
    )
    out.write("-" * 118 + "\n")
    out.write(
        f"{quiet} frame(s) with no finding and no truth box are not listed. Findings: {tally.hits} hit(s), "
        f"{tally.false_findings} without a truth box; truth boxes missed: {tally.missed} "
        f"(+{tally.missed_difficult} difficult end-of-lesion cuts, not counted)\n"
    )
    return tally


def print_series(series: dict[str, dict[str, Any]], instances: list[Instance], lesions_file: Path) -> None:
    """One line per 3D finding of each series with more than one slice, checked against the 3D truth."""
    truth: dict[str, list[dict[str, Any]]] = {}
    if lesions_file.is_file():
        truth = {
            s["series_instance_uid"]: s["lesions"] for s in json.loads(lesions_file.read_text())["series"]
        }
    number = {i.series_uid: i.series_number for i in instances}
    sys.stdout.write(
        f"\n{'series':>6} {'slices':>6}  {'3D finding':<11} {'on slices':>9} {'extent mm':>9} "
        f"{'volume ml':>9} {'max score':>9}  centroid LPS mm          vs lesions.json\n"
    )
    for uid, body in series.items():
        stack = body.get("stack") or {}
        if stack.get("slices", 0) < 2:
            continue
        lesions = truth.get(uid)
        taken: set[int] = set()
        for f in body["findings"]:
            verdict = ""
            if lesions is not None:
                c = np.asarray(f["centroid_lps_mm"])
                near = [
                    k
                    for k, les in enumerate(lesions)
                    if les["kind"] == f["label"]
                    and k not in taken
                    and np.linalg.norm(c - np.asarray(les["center_lps_mm"])) <= max(les["radii_mm"]) + 5.0
                ]
                verdict = "hit" if near else "false"
                taken.update(near[:1])
            centroid = ", ".join(f"{v:6.1f}" for v in f["centroid_lps_mm"])
            sys.stdout.write(
                f"{number.get(uid, 0):>6} {stack['slices']:>6}  {f['label']:<11} "
                f"{f['first_slice']:>4}-{f['last_slice']:<4} {f['extent_mm']:>9.1f} "
                f"{f['volume_mm3'] / 1000:>9.2f} {f['max_score']:>9.2f}  ({centroid})  {verdict}\n"
            )
        if not body["findings"]:
            sys.stdout.write(f"{number.get(uid, 0):>6} {stack['slices']:>6}  no 3D findings\n")
        if lesions is not None:
            for k, les in enumerate(lesions):
                if k not in taken:
                    sys.stdout.write(
                        f"{number.get(uid, 0):>6} {stack['slices']:>6}  {les['kind']:<11} missed\n"
                    )


def write_overlays(
    instances: list[Instance], manifest: dict[str, Any], out: Path, min_score: float | None
) -> int:
    """One PNG per frame with a finding or a truth box; returns how many were written."""
    import cv2
    from retinaedge.runtime.dicomio import iter_frames, open_dicom, validate
    from retinaedge.runtime.instance_result import Detection, FrameResult
    from retinaedge.runtime.manifest import Manifest
    from retinaedge.runtime.overlay import render
    from retinaedge.runtime.preprocess import to_unit

    pre = Manifest.from_dict(manifest).preprocessing
    written = 0
    for inst in instances:
        assert inst.result is not None
        frames = {int(f["index"]): f for f in inst.result["frames"]}
        with open_dicom(inst.path) as src:
            info = validate(src)
            for index, (arr, photometric) in enumerate(iter_frames(src, info)):
                dets = shown(frames[index], min_score)
                truths = inst.truth.get(index, [])
                if not dets and not truths:
                    continue
                unit, _ = to_unit(arr, photometric, src.ds, index, pre, info.bits_stored)
                fr = FrameResult(
                    index=index,
                    detections=[
                        Detection(d["label"], int(d["class_id"]), float(d["score"]), tuple(d["box"]))
                        for d in dets
                    ],
                )
                scale = 3
                img = render(cv2.resize(unit, None, fx=scale, fy=scale)[None], _scaled(fr, scale))
                for t in truths:
                    x1, y1, x2, y2 = (int(round(v * scale)) for v in t["box"])
                    cv2.rectangle(img, (x1 - 2, y1 - 2), (x2 + 1, y2 + 1), (255, 255, 255), 1)
                path = out / f"{inst.path.parent.name}_{inst.path.stem}_f{index:03d}.png"
                cv2.imwrite(str(path), img)
                written += 1
    return written


def _scaled(frame: Any, s: float) -> Any:
    from retinaedge.runtime.instance_result import Detection, FrameResult

    return FrameResult(
        index=frame.index,
        detections=[
            Detection(d.label, d.class_id, d.score, tuple(v * s for v in d.box))  # type: ignore[arg-type]
            for d in frame.detections
        ],
    )


# -- main -----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.png"):
        old.unlink()
    groups = scan(args.examples)
    if not groups:
        raise SystemExit(f"no DICOM files under {args.examples}")
    instances = [i for items in groups.values() for i in items]
    attach_truth(instances, args.examples / "ground_truth.json")
    with service(args.model, args.out, args.min_score) as base:
        _, _, body = http("GET", f"{base}/v1/model")
        manifest = json.loads(body)
        log.info("service ready at %s with model %s", base, manifest.get("name"))
        deadline = time.monotonic() + 300
        for folder, items in groups.items():
            if len(items) > 1 and all(i.frames == 1 for i in items):
                response = stow(base, [i.path for i in items])
                stored = len(response.get("00081199", {}).get("Value", []))
                failed = len(response.get("00081198", {}).get("Value", []))
                log.info("STOW-RS %s: %d instance(s) stored, %d failed", folder.name, stored, failed)
                for inst in items:
                    inst.result = wait_result(base, inst.sop_uid, deadline)
                    inst.route = "STOW-RS"
            else:
                for inst in items:
                    inst.result = detect(base, inst.path)
                    inst.route = "/v1/detect"
                    log.info("/v1/detect %s/%s: %d frame(s)", folder.name, inst.path.name, inst.frames)
        series = series_findings(base, instances)
    print_table(instances, args.min_score)
    print_series(series, instances, args.examples / "lesions.json")
    overlays = write_overlays(instances, manifest, args.out, args.min_score)
    frames = sum(i.frames for i in instances)
    infer_ms = [float(i.result["timings_ms"].get("inference", 0.0)) for i in instances if i.result]
    sys.stdout.write(
        f"\n{len(instances)} instance(s), {frames} frame(s): "
        f"{sum(1 for i in instances if i.route == 'STOW-RS')} by STOW-RS, "
        f"{sum(1 for i in instances if i.route == '/v1/detect')} by /v1/detect; "
        f"model inference {np.sum(infer_ms) / max(frames, 1):.1f} ms per frame on average; "
        f"{overlays} overlay PNG(s) in {args.out}/; {time.monotonic() - t0:.1f} s in all.\n"
        "Demo model on synthetic phantoms: not for clinical use (see models/demo/MODEL_CARD.md).\n"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    p.add_argument("--examples", type=Path, default=ROOT / "examples")
    p.add_argument("--out", type=Path, default=ROOT / "demo-output")
    p.add_argument(
        "--min-score",
        type=float,
        help="also hide findings scoring below this (default: every finding at the model's operating point)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
