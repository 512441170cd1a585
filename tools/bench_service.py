"""Measure what the HTTP service costs on top of in-process inference, and its throughput.

1. backend baseline: ``Detector.open(model)`` in this process, ``--warmup`` untimed detections, then
   ``--requests`` detections of one synthetic 512x512 16-bit single-frame MR instance (built in memory);
   the detector's own ``timings_ms["inference"]`` and ``timings_ms["total"]``;
2. service: ``retinaedge serve --model DIR --port <free port>`` as a subprocess (data directory in a
   temporary directory, ``RETINAEDGE_*`` variables of the caller not inherited), wait for
   ``GET /readyz`` == 200, then ``--requests`` sequential ``POST /v1/detect`` (``application/dicom``) on
   one keep-alive connection: client-side round trip and the server's reported ``timings_ms``;
3. throughput: requests/second with 1, 2 and 4 concurrent clients (threads, one ``httpx.Client`` each,
   all released together; ``--per-client`` requests each, or ``--duration`` seconds per level); then
   SIGTERM and wait (uvicorn shuts down gracefully, then re-raises the signal: exit code -15).

``http_overhead_p50`` compares the HTTP round trip with the backend phase's total, which ran earlier: a
change in machine load between the two phases enters it. ``http_overhead_paired_p50`` takes, for each
request, the round trip minus the server's own ``timings_ms["total"]`` of that request, so it does not.

Both sides use the same ONNX Runtime thread count (``--threads``; 0: the CPU affinity count). The client
runs on the same machine as the server and competes with it for the CPU.

Usage (development tool; the bundle comes from ``retinaedge export`` or ``export_retinanet``):
    .venv/bin/python tools/bench_service.py --model /tmp/bench/r18_512 --requests 30 --out report.json
Writes one JSON object to stdout (and to ``--out`` when given); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

log = logging.getLogger("bench_service")

DICOM = "application/dicom"


# -- the synthetic instance ------------------------------------------------------------------------------


def synthetic_pixels(rows: int, cols: int, seed: int = 7) -> np.ndarray:
    """A 12-bit-range uint16 image with a smooth background, a few bright blobs and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    img = 600.0 + 400.0 * (xx / cols) + 300.0 * (yy / rows)
    for _ in range(6):
        cy, cx = rng.uniform(0.15, 0.85) * rows, rng.uniform(0.15, 0.85) * cols
        radius = rng.uniform(0.03, 0.1) * min(rows, cols)
        img += rng.uniform(800, 2500) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    img += rng.normal(0.0, 40.0, size=img.shape)
    return np.clip(img, 0, 4095).astype(np.uint16)


def mr_instance(pixels: np.ndarray, window: tuple[float, float] = (2048.0, 4096.0)) -> Dataset:
    """One single-frame MR image dataset (Explicit VR Little Endian) of uint16 ``(rows, cols)`` pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.PatientName = "SYNTHETIC^BENCH"
    ds.PatientID = "BENCH-0001"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(pixels.astype("<u2")).tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# -- statistics ------------------------------------------------------------------------------------------


def summary(samples: Sequence[float]) -> dict[str, float | int]:
    """p50/p99/mean/min/max in milliseconds (linear-interpolated percentiles) and the sample count."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no samples")
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
        "min": round(float(a.min()), 3),
        "max": round(float(a.max()), 3),
        "n": int(a.size),
    }


# -- backend baseline ------------------------------------------------------------------------------------


def bench_backend(model: Path, data: bytes, threads: int, warmup: int, repeats: int) -> dict[str, Any]:
    """In-process ``Detector.detect`` on ``data``: the detector's own stage timings."""
    from retinaedge.runtime.detector import Detector

    stages: dict[str, list[float]] = {}
    wall: list[float] = []
    with Detector.open(model, threads=threads) as detector:
        log.info(
            "backend: %s, %d thread(s), %d warm-up + %d timed",
            detector.backend.name,
            threads,
            warmup,
            repeats,
        )
        for _ in range(warmup):
            detector.detect(data)
        for _ in range(repeats):
            t = time.perf_counter()
            result = detector.detect(data)
            wall.append((time.perf_counter() - t) * 1e3)
            for k, v in result.timings_ms.items():
                stages.setdefault(k, []).append(v)
        detections = sum(len(f.detections) for f in result.frames)
    return {
        "inference_ms": summary(stages["inference"]),
        "total_ms": summary(stages["total"]),
        "stages_p50_ms": {k: summary(v)["p50"] for k, v in stages.items()},
        "caller_wall_ms": summary(wall),
        "detections": detections,
    }


# -- the service subprocess ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(model: Path, port: int) -> list[str]:
    """``retinaedge serve`` from this interpreter's environment (the console script, else ``-m``)."""
    script = Path(sys.executable).parent / "retinaedge"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "retinaedge.runtime.cli"]
    return [*base, "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def running_service(
    model: Path, threads: int, workdir: Path, startup_timeout: float
) -> Iterator[dict[str, Any]]:
    """Start the service, wait for ``/readyz`` == 200, yield ``{url, pid, readyz}``; SIGTERM and wait after."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAEDGE_")}
    env["RETINAEDGE_DATA_DIR"] = str(workdir / "data")
    env["RETINAEDGE_THREADS"] = str(threads)
    server_log = workdir / "server.log"
    cmd = serve_command(model, port)
    log.info("starting: %s (log %s)", " ".join(cmd), server_log)
    info: dict[str, Any] = {"url": f"http://127.0.0.1:{port}"}
    with server_log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    info["pid"] = proc.pid
    try:
        t0 = time.perf_counter()
        with httpx.Client(base_url=info["url"], timeout=5.0) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the service exited with {proc.returncode}:\n{log_tail(server_log)}")
                if time.perf_counter() - t0 > startup_timeout:
                    raise RuntimeError(f"not ready after {startup_timeout:.0f} s:\n{log_tail(server_log)}")
                try:
                    r = client.get("/readyz")
                    if r.status_code == 200:
                        info["readyz"] = r.json()
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        info["startup_s"] = round(time.perf_counter() - t0, 3)
        log.info("service ready after %.1f s (pid %d, %s)", info["startup_s"], proc.pid, info["url"])
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                log.warning("the service did not stop within 40 s of SIGTERM; killing pid %d", proc.pid)
                proc.kill()
                proc.wait()
        info["exit_code"] = proc.returncode
        # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: exit code -15 is expected.
        info["graceful_shutdown"] = "Application shutdown complete" in log_tail(server_log, 20)
        log.info(
            "service stopped with exit code %s (graceful: %s)", proc.returncode, info["graceful_shutdown"]
        )


def post_detect(client: httpx.Client, data: bytes) -> tuple[float, dict[str, Any]]:
    """One ``POST /v1/detect``: (client round trip in ms, response body); raises on a non-200 answer."""
    t = time.perf_counter()
    r = client.post("/v1/detect", content=data, headers={"Content-Type": DICOM})
    elapsed = (time.perf_counter() - t) * 1e3
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/detect -> {r.status_code}: {r.text[:500]}")
    return elapsed, r.json()


def bench_sequential(url: str, data: bytes, warmup: int, repeats: int) -> dict[str, Any]:
    """Sequential requests on one keep-alive connection: client round trip and server-reported timings."""
    round_trip: list[float] = []
    beyond_server_total: list[float] = []
    server: dict[str, list[float]] = {}
    with httpx.Client(base_url=url, timeout=120.0) as client:
        for _ in range(warmup):
            post_detect(client, data)
        for _ in range(repeats):
            elapsed, body = post_detect(client, data)
            round_trip.append(elapsed)
            for k, v in body.get("timings_ms", {}).items():
                server.setdefault(k, []).append(float(v))
            beyond_server_total.append(elapsed - float(body["timings_ms"]["total"]))
    return {
        "round_trip_ms": summary(round_trip),
        "server_timings_ms": {
            k: summary(v) for k, v in server.items() if k in ("inference", "total", "request")
        },
        "server_stages_p50_ms": {k: summary(v)["p50"] for k, v in server.items()},
        "round_trip_minus_server_total_ms": summary(beyond_server_total),
    }


@dataclass
class _ClientRun:
    latencies: list[float] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    error: str | None = None


def bench_concurrent(url: str, data: bytes, clients: int, per_client: int, duration: float) -> dict[str, Any]:
    """``clients`` threads, each with its own ``httpx.Client`` (connected by one untimed request),
    released together; each sends ``per_client`` requests, or with ``duration`` > 0 sends requests until
    ``duration`` seconds have passed. rps = all requests / (last end - first start)."""
    barrier = threading.Barrier(clients)
    runs = [_ClientRun() for _ in range(clients)]

    def work(run: _ClientRun) -> None:
        try:
            with httpx.Client(base_url=url, timeout=300.0) as client:
                post_detect(client, data)
                barrier.wait(timeout=300)
                run.start = time.perf_counter()
                deadline = run.start + duration
                while time.perf_counter() < deadline if duration > 0 else len(run.latencies) < per_client:
                    run.latencies.append(post_detect(client, data)[0])
                run.end = time.perf_counter()
        except Exception as exc:  # reported after join; a broken barrier releases the others
            run.error = f"{type(exc).__name__}: {exc}"
            barrier.abort()

    threads = [threading.Thread(target=work, args=(run,), name=f"client-{i}") for i, run in enumerate(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r.error for r in runs if r.error]
    if errors:
        raise RuntimeError(f"{clients} concurrent client(s) failed: {errors}")
    seconds = max(r.end for r in runs) - min(r.start for r in runs)
    total = sum(len(r.latencies) for r in runs)
    return {
        "clients": clients,
        "mode": f"{duration:g} s per level" if duration > 0 else f"{per_client} request(s) per client",
        "requests": total,
        "seconds": round(seconds, 3),
        "rps": round(total / seconds, 3),
        "latency_ms": summary([x for r in runs for x in r.latencies]),
    }


# -- report ----------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import onnxruntime
    import pydicom

    out = {
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "pydicom": pydicom.__version__,
        "httpx": httpx.__version__,
    }
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        out["retinaedge"] = version("retinaedge")
    return out


def timed_phase(name: str, fn: Callable[[], Any], phases: dict[str, float]) -> Any:
    t = time.perf_counter()
    try:
        return fn()
    finally:
        phases[name] = round(time.perf_counter() - t, 3)


def parse_clients(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"client counts must be >= 1, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="model bundle directory")
    parser.add_argument("--requests", type=int, default=30, help="timed detections / requests (default 30)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed detections / requests first (default 3)"
    )
    parser.add_argument(
        "--clients", type=parse_clients, default=[1, 2, 4], help="concurrency levels (default 1,2,4)"
    )
    parser.add_argument(
        "--per-client", type=int, default=10, help="requests per client at each level (default 10)"
    )
    parser.add_argument(
        "--duration", type=float, default=0.0, help="seconds per level instead of --per-client (0: off)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime threads (0: the CPU affinity count)"
    )
    parser.add_argument(
        "--size", type=int, default=512, help="rows and columns of the instance (default 512)"
    )
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for /readyz")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.requests < 1 or args.warmup < 0 or args.per_client < 1 or args.duration < 0:
        parser.error("--requests and --per-client must be >= 1, --warmup and --duration >= 0")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from retinaedge.runtime.bundle import load_bundle
    from retinaedge.runtime.onnxrt import affinity_threads

    started = time.perf_counter()
    model = args.model.resolve()
    manifest_path = model / "manifest.json"
    if not manifest_path.is_file():
        parser.error(f"{model} is not a model bundle (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    load_bundle(model)  # fail early on a broken bundle, before anything is timed
    threads = args.threads or affinity_threads()
    load_start = os.getloadavg()
    data = to_bytes(mr_instance(synthetic_pixels(args.size, args.size)))
    log.info("instance: %dx%d uint16 MR, %d bytes", args.size, args.size, len(data))

    phases: dict[str, float] = {}
    backend = timed_phase(
        "backend_s", lambda: bench_backend(model, data, threads, args.warmup, args.requests), phases
    )
    throughput: dict[str, dict[str, Any]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench_service_") as tmp,
        running_service(model, threads, Path(tmp), args.startup_timeout) as service,
    ):
        log.info("sequential: %d warm-up + %d timed requests", args.warmup, args.requests)
        http = timed_phase(
            "sequential_s", lambda: bench_sequential(service["url"], data, args.warmup, args.requests), phases
        )
        for clients in args.clients:
            log.info("throughput: %d client(s)", clients)
            level = timed_phase(
                f"throughput_{clients}_s",
                lambda c=clients: bench_concurrent(service["url"], data, c, args.per_client, args.duration),
                phases,
            )
            throughput[str(clients)] = level
            log.info("  %d client(s): %.2f requests/s", clients, level["rps"])

    backend_total_p50 = backend["total_ms"]["p50"]
    server_total_p50 = http["server_timings_ms"]["total"]["p50"]
    beyond = http["round_trip_minus_server_total_ms"]["p50"]
    report = {
        "model": {
            "dir": str(model),
            "name": manifest.get("name"),
            "architecture": manifest.get("architecture"),
            "input": [manifest.get("input", {}).get("height"), manifest.get("input", {}).get("width")],
            "sha256": manifest.get("model_sha256"),
        },
        "instance": {"rows": args.size, "columns": args.size, "frames": 1, "bits": 16, "bytes": len(data)},
        "threads": threads,
        "cpu_affinity_count": affinity_threads(),
        "versions": versions(),
        "requests": args.requests,
        "warmup": args.warmup,
        "backend": backend,
        "http": http,
        "backend_inference_ms": {
            "p50": backend["inference_ms"]["p50"],
            "p99": backend["inference_ms"]["p99"],
        },
        "backend_total_ms": {"p50": backend_total_p50, "p99": backend["total_ms"]["p99"]},
        "http_round_trip_ms": {"p50": http["round_trip_ms"]["p50"], "p99": http["round_trip_ms"]["p99"]},
        "http_overhead_p50": round((http["round_trip_ms"]["p50"] - backend_total_p50) / backend_total_p50, 4),
        # The same overhead measured within each request (round trip - the server's own total), so a
        # change in machine load between the backend and the service phases does not enter it.
        "http_overhead_paired_p50": round(beyond / server_total_p50, 4),
        "throughput_rps": {k: v["rps"] for k, v in throughput.items()},
        "throughput": throughput,
        "service": {
            "startup_s": service.get("startup_s"),
            "backend": service.get("readyz", {}).get("backend"),
            "exit_code": service.get("exit_code"),
            "graceful_shutdown": service.get("graceful_shutdown"),
        },
        "percentiles": "linear interpolation (numpy); with n=30 the p99 lies between the two largest samples",
        "loadavg": {
            "start": [round(x, 2) for x in load_start],
            "end": [round(x, 2) for x in os.getloadavg()],
        },
        "phases_s": phases,
        "runtime_s": round(time.perf_counter() - started, 3),
    }
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
