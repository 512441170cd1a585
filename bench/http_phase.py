"""The HTTP phase: a real ``retinaedge serve`` subprocess on 127.0.0.1 and real HTTP clients.

The service runs with a temporary data directory, the benchmark's thread count and batch size, and none
of the caller's ``RETINAEDGE_*`` variables. Clients use the standard library's ``http.client`` with one
keep-alive connection each. Times are milliseconds, client side (``time.perf_counter``), plus the
server's own ``timings_ms`` from each response body. :func:`measure_http` runs the phase: sequential
requests, then each concurrency level until it holds still (:mod:`.steady`).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinaedge.runtime.errors import BenchmarkError
from retinaedge.runtime.progress import Progress

if TYPE_CHECKING:
    from retinaedge.bench.inputs import Instance
    from retinaedge.runtime.bundle import Bundle

log = logging.getLogger(__name__)

DICOM = "application/dicom"
#: The concurrency level that runs long (``--tail-requests``) and whose frames/s and p99/p50 make the
#: serving ratios of the report.
TAIL_CLIENTS = 4


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(model: Path, port: int, prefix: Sequence[str] | None = None) -> list[str]:
    """``retinaedge serve`` from this interpreter's environment (``prefix``: another entry that takes the
    ``retinaedge`` arguments, such as :mod:`.accel_serve`)."""
    entry = list(prefix) if prefix else [sys.executable, "-m", "retinaedge.runtime.cli"]
    base = [*entry, "--log-level", "WARNING"]
    return [*base, "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ('' when unreadable)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def peak_rss_of(pid: int) -> int | None:
    """Peak RSS (``VmHWM``) of a live process in bytes, from ``/proc`` (None off Linux or when gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Client:
    """One keep-alive connection to the service."""

    def __init__(self, port: int, timeout_s: float = 300.0) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": DICOM} if body is not None else {}
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, response.read()

    def detect(self, data: bytes) -> tuple[float, dict[str, Any]]:
        """One ``POST /v1/detect``: (round trip in ms, response body); raises on a non-200 answer."""
        t = time.perf_counter()
        status, body = self.request("POST", "/v1/detect", data)
        elapsed = (time.perf_counter() - t) * 1e3
        if status != 200:
            raise BenchmarkError(f"POST /v1/detect -> {status}: {body[:300]!r}")
        return elapsed, json.loads(body)

    def close(self) -> None:
        self.conn.close()


@dataclass
class Service:
    """A running service: its port and process, and what was learnt at start and stop."""

    port: int
    proc: subprocess.Popen[bytes]
    startup_s: float = 0.0
    readyz: dict[str, Any] = field(default_factory=dict)
    peak_rss_bytes: int | None = None
    exit_code: int | None = None


def _wait_ready(service: Service, server_log: Path, timeout_s: float) -> None:
    t0 = time.perf_counter()
    while True:
        if service.proc.poll() is not None:
            raise BenchmarkError(
                f"the service exited with {service.proc.returncode}:\n{log_tail(server_log)}"
            )
        if time.perf_counter() - t0 > timeout_s:
            raise BenchmarkError(
                f"the service was not ready after {timeout_s:.0f} s:\n{log_tail(server_log)}"
            )
        client = Client(service.port, timeout_s=5.0)
        try:
            status, body = client.request("GET", "/readyz")
            if status == 200:
                service.readyz = json.loads(body)
                service.startup_s = round(time.perf_counter() - t0, 3)
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            client.close()
        time.sleep(0.2)


@contextlib.contextmanager
def running_service(
    model: Path,
    threads: int,
    batch_size: int,
    workdir: Path,
    startup_timeout_s: float = 180.0,
    extra_env: Mapping[str, str] | None = None,
    command_prefix: Sequence[str] | None = None,
) -> Iterator[Service]:
    """Start the service, wait for ``/readyz`` == 200, yield it; read its peak RSS, SIGTERM and wait after.

    ``batch_size`` is the service's ``max_batch_size`` unless ``extra_env`` (more ``RETINAEDGE_*`` settings,
    the batching ones of :mod:`.batch_settings`, set as given) says otherwise; ``command_prefix`` starts
    another entry point with the same arguments (:func:`serve_command`).
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAEDGE_")}
    env.update(
        RETINAEDGE_DATA_DIR=str(workdir / "service-data"),
        RETINAEDGE_THREADS=str(threads),
        RETINAEDGE_MAX_BATCH_SIZE=str(batch_size),
        RETINAEDGE_MIN_FREE_BYTES="0",
        OMP_NUM_THREADS=str(threads),
    )
    env.update(extra_env or {})
    server_log = workdir / "server.log"
    with server_log.open("wb") as out:
        proc = subprocess.Popen(
            serve_command(model, port, command_prefix), env=env, stdout=out, stderr=subprocess.STDOUT
        )
    service = Service(port=port, proc=proc)
    try:
        _wait_ready(service, server_log, startup_timeout_s)
        log.info("service ready after %.1f s on 127.0.0.1:%d", service.startup_s, port)
        yield service
        service.peak_rss_bytes = peak_rss_of(proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                log.warning("the service did not stop within 40 s of SIGTERM; killing it")
                proc.kill()
                proc.wait()
        service.exit_code = proc.returncode


def sequential(port: int, bodies: Sequence[bytes], warmup: int) -> dict[str, list[float]]:
    """``bodies`` posted one after the other on one connection (``warmup`` of them untimed first).

    Returns per request: ``round_trip_ms``, ``server_total_ms`` (the server's ``timings_ms.total``) and
    ``server_request_ms`` (its whole handler).
    """
    out: dict[str, list[float]] = {"round_trip_ms": [], "server_total_ms": [], "server_request_ms": []}
    client = Client(port)
    try:
        for body in bodies[:warmup]:
            client.detect(body)
        with Progress("HTTP sequential", len(bodies)) as bar:
            for body in bodies:
                elapsed, answer = client.detect(body)
                out["round_trip_ms"].append(elapsed)
                out["server_total_ms"].append(float(answer["timings_ms"]["total"]))
                out["server_request_ms"].append(float(answer["timings_ms"].get("request", float("nan"))))
                bar.update()
    finally:
        client.close()
    return out


def measure_http(
    args: argparse.Namespace,
    bundle: Bundle,
    plan: list[Instance],
    threads: int,
    work: Path,
    throughput_by_batch: list[dict[str, Any]],
) -> dict[str, Any]:
    """Sequential requests of the planned instances, then each concurrency level, run until its frames/s
    hold still (:func:`~.steady.run_level`: at least ``--level-requests``, ``--tail-requests`` for the
    :data:`~.report.TAIL_CLIENTS` level, and ``--requests-per-client`` per client; at most
    ``--level-seconds``, ``--tail-seconds`` for that level)."""
    from retinaedge.bench.batch_settings import service_batching
    from retinaedge.bench.steady import as_row, run_level

    batching = service_batching(args, throughput_by_batch)
    env = dict(batching["env"])
    if getattr(args, "backend", "onnxruntime") == "openvino":  # the service serves what the fused phase ran
        env.update(RETINAEDGE_BACKEND="openvino", RETINAEDGE_OPENVINO_PRECISION=args.precision)
    bodies = [(i.path.read_bytes(), i.frames) for i in plan]
    with running_service(
        bundle.root or bundle.model_path, threads, args.batch_size, work, extra_env=env
    ) as service:
        seq = sequential(service.port, [b for b, _ in bodies], args.warmup)
        levels = []
        for clients in args.clients:
            log.info("HTTP throughput: %d client(s)", clients)
            tail = clients == TAIL_CLIENTS
            least = max(
                args.tail_requests if tail else args.level_requests, clients * args.requests_per_client
            )
            most = args.tail_seconds if tail else args.level_seconds
            level = run_level(service.port, bodies, clients, min_requests=least, max_seconds=most)
            levels.append(as_row(level, clients, least, most))
    return {
        **seq,
        "levels": levels,
        "batching": {k: v for k, v in batching.items() if k != "env"},
        "startup_s": service.startup_s,
        "peak_rss_bytes": service.peak_rss_bytes,
        "exit_code": service.exit_code,
        "backend": service.readyz.get("backend"),
    }
