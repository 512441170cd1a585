"""The service's CPU per request at a given pace, one client (development tooling).

Starts ``retinaedge serve`` on the demo bundle (a temporary data directory, the caller's ``RETINAEDGE_*``
variables ignored, as the benchmark's HTTP phase does), then for each ``--think-ms`` posts the example
study's single-frame slices on one keep-alive connection, pausing that long after each answer. It reads
the service process's CPU time (user + system, ``/proc/<pid>/stat``) before and after the timed requests.

What it shows: CPU the service burns per request when requests are spaced out (a scanner sends a slice,
then waits), which a back-to-back benchmark hides; for example ONNX Runtime's threads spinning after each
run. Prints one JSON object per pace and a Markdown table. Usage::

    .venv/bin/python tools/serve_cpu.py --think-ms 0 50 --requests 100
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from retinaedge.service.bench.http_phase import Client, running_service

ROOT = Path(__file__).resolve().parents[1]
STUDY = sorted((ROOT / "examples" / "study_01").glob("*.dcm"))
log = logging.getLogger("serve_cpu")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_pace(
    port: int, pid: int, bodies: list[bytes], think_s: float, requests: int, warmup: int
) -> dict[str, Any]:
    """``warmup`` untimed then ``requests`` timed ``POST /v1/detect``, ``think_s`` apart."""
    client = Client(port)
    try:
        for i in range(warmup):
            client.detect(bodies[i % len(bodies)])
            time.sleep(think_s)
        latencies = []
        cpu0, t0 = process_cpu_s(pid), time.perf_counter()
        for i in range(requests):
            latencies.append(client.detect(bodies[i % len(bodies)])[0])
            time.sleep(think_s)
        cpu, wall = process_cpu_s(pid) - cpu0, time.perf_counter() - t0
    finally:
        client.close()
    return {
        "think_ms": round(think_s * 1e3, 3),
        "requests": requests,
        "requests_per_s": round(requests / wall, 2),
        "server_cpu_ms_per_request": round(cpu / requests * 1e3, 2),
        "round_trip_p50_ms": round(statistics.median(latencies), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    parser.add_argument("--think-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of the service")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bodies = [p.read_bytes() for p in STUDY]
    rows = []
    with tempfile.TemporaryDirectory(prefix="serve-cpu-") as tmp:
        with running_service(args.model, args.threads, 1, Path(tmp)) as service:
            for think in args.think_ms:
                row = run_pace(
                    service.port, service.proc.pid, bodies, think / 1e3, args.requests, args.warmup
                )
                sys.stdout.write(json.dumps(row) + "\n")
                sys.stdout.flush()
                rows.append(row)
    lines = [
        "",
        "| think (ms) | requests/s | server CPU per request (ms) | round trip p50 (ms) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['think_ms']:g} | {r['requests_per_s']} | {r['server_cpu_ms_per_request']} "
            f"| {r['round_trip_p50_ms']} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
