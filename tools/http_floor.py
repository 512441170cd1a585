"""The HTTP stack's own cost for ``POST /v1/detect``: the lowest ``http_overhead_p50`` any server built on
it could reach on this machine (development tooling).

Three measurements on the same bodies (the example study's single-frame slices, 131 KB each), one after
the other, each sequential on one keep-alive connection with the benchmark's client
(:mod:`retinaedge.bench.http_phase`):

1. the in-process :class:`~retinaedge.runtime.detector.Detector` (``timings_ms.total``), as the benchmark's
   ``in-process Detector total``;
2. ``retinaedge serve``: the round trip, keeping each answer;
3. the *floor*: uvicorn with the service's protocol class and options and a FastAPI app whose
   ``POST /v1/detect`` only reads the body under the service's limits (:func:`~retinaedge.service.http.body.read_body`)
   and sends back the answer the service gave for that body. No parse, no model, no pipeline.

A server that added nothing to the Detector but this stack would answer in ``Detector + floor``, so its
``http_overhead_p50`` would be ``floor p50 / Detector p50``: printed as ``overhead_floor``. Usage::

    .venv/bin/python tools/http_floor.py --requests 200
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from retinaedge.bench.http_phase import Client, free_port, running_service

ROOT = Path(__file__).resolve().parents[1]
STUDY = sorted((ROOT / "examples" / "study_01").glob("*.dcm"))
log = logging.getLogger("http_floor")


def floor_app(answers_file: Path) -> Any:
    """The FastAPI app of the floor server: ``POST /v1/detect`` -> the kept answer for that body's size."""
    from retinaedge.service.http.body import read_body
    from retinaedge.service.settings import Settings

    fields = Settings.model_fields  # the service's defaults (no model needed here)
    limit, idle = fields["max_body_bytes"].default, fields["request_idle_timeout_s"].default
    answers = {int(k): v for k, v in json.loads(answers_file.read_text()).items()}
    app = FastAPI()

    @app.post("/v1/detect")
    async def detect(request: Request) -> JSONResponse:
        data = await read_body(request.stream(), limit, idle)
        return JSONResponse(answers[len(data)])

    return app


def serve_floor(port: int, answers_file: Path) -> int:
    """Run the floor server (the service's uvicorn options and protocol class) until terminated."""
    import uvicorn
    from retinaedge.service.http.protocol import protocol_class
    from retinaedge.service.settings import Settings

    uvicorn.run(
        floor_app(answers_file),
        host="127.0.0.1",
        port=port,
        access_log=False,
        log_config=None,
        http=protocol_class(Settings.model_fields["request_header_timeout_s"].default),
    )
    return 0


def round_trips(
    port: int, bodies: list[bytes], requests: int, warmup: int
) -> tuple[list[float], dict[int, Any]]:
    """Sequential ``POST /v1/detect``: round trips (ms) and the answer per body size."""
    client = Client(port)
    answers: dict[int, Any] = {}
    try:
        for i in range(warmup):
            client.detect(bodies[i % len(bodies)])
        out = []
        for i in range(requests):
            body = bodies[i % len(bodies)]
            rt, answer = client.detect(body)
            out.append(rt)
            answers[len(body)] = answer
    finally:
        client.close()
    return out, answers


def detector_totals(
    model: Path, bodies: list[bytes], requests: int, warmup: int, threads: int
) -> list[float]:
    """``timings_ms.total`` of the in-process Detector, sequential, as the benchmark's fused pipeline."""
    from retinaedge.runtime.backends.base import BackendOptions
    from retinaedge.runtime.backends.registry import open_backend
    from retinaedge.runtime.bundle import load_bundle
    from retinaedge.runtime.detector import Detector

    bundle = load_bundle(model)
    detector = Detector(bundle, open_backend("onnxruntime", bundle, BackendOptions(threads=threads)))
    try:
        for i in range(warmup):
            detector.detect(bodies[i % len(bodies)])
        return [float(detector.detect(bodies[i % len(bodies)]).timings_ms["total"]) for i in range(requests)]
    finally:
        detector.close()


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the floor server exited with {proc.returncode}")
        try:
            client = Client(port, timeout_s=2.0)
            client.request("GET", "/docs")
            client.close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the floor server did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--serve-floor", nargs=2, metavar=("PORT", "ANSWERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_floor:
        return serve_floor(int(args.serve_floor[0]), Path(args.serve_floor[1]))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bodies = [p.read_bytes() for p in STUDY]
    totals = detector_totals(args.model, bodies, args.requests, args.warmup, args.threads)
    with tempfile.TemporaryDirectory(prefix="http-floor-") as tmp:
        with running_service(args.model, args.threads, 1, Path(tmp)) as service:
            served, answers = round_trips(service.port, bodies, args.requests, args.warmup)
        answers_file = Path(tmp) / "answers.json"
        answers_file.write_text(json.dumps({str(k): v for k, v in answers.items()}))
        port = free_port()
        cmd = [sys.executable, __file__, "--serve-floor", str(port), str(answers_file)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, proc)
            floor, _ = round_trips(port, bodies, args.requests, args.warmup)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    p50 = {k: statistics.median(v) for k, v in (("detector", totals), ("served", served), ("floor", floor))}
    report = {
        "requests": args.requests,
        "detector_total_p50_ms": round(p50["detector"], 3),
        "service_round_trip_p50_ms": round(p50["served"], 3),
        "floor_round_trip_p50_ms": round(p50["floor"], 3),
        "http_overhead_p50": round((p50["served"] - p50["detector"]) / p50["detector"], 4),
        "overhead_floor": round(p50["floor"] / p50["detector"], 4),
    }
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
