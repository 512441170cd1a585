"""The service's CPU per request, by thread, at a given pace and concurrency (development tooling).

Starts ``retinaedge serve`` on the demo bundle (a temporary data directory, the caller's ``RETINAEDGE_*``
variables ignored, as the benchmark's HTTP phase does), then for each ``--think-ms`` runs ``--clients``
closed-loop clients, each posting the example study's single-frame slices on its own keep-alive
connection and pausing that long after each answer (the clients' own CPU is reported too: on one
machine they share its cores with the service). It reads the CPU time (user + system) of every
thread of the service from ``/proc/<pid>/task/*/stat`` before and after the timed requests and adds it up
by thread name (``runtime/threadname.py``: ``inference`` includes ONNX Runtime's intra-op threads, the
main thread runs the event loop).

What it shows: where the CPU of a request goes, and what the service burns when requests are spaced out
(a scanner sends a slice, then waits), which a back-to-back benchmark hides. Prints one JSON object per
pace and a Markdown table. Usage::

    .venv/bin/python tools/serve_cpu.py --think-ms 0 50 --requests 100
    .venv/bin/python tools/serve_cpu.py --clients 4 --think-ms 0 --max-batch-size 2
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from retinaedge.bench.http_phase import Client, running_service

ROOT = Path(__file__).resolve().parents[1]
STUDY = sorted((ROOT / "examples" / "study_01").glob("*.dcm"))
log = logging.getLogger("serve_cpu")


def thread_cpu_s(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread of process ``pid``: tid -> (name, user + system CPU seconds so far)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        label = "main (event loop)" if int(tid) == pid else name
        out[int(tid)] = (label, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_by_name(pid: int, before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per thread name since ``before`` (threads started meanwhile count from zero)."""
    spent: dict[str, float] = collections.defaultdict(float)
    for tid, (name, cpu) in thread_cpu_s(pid).items():
        spent[name] += cpu - before.get(tid, (name, 0.0))[1]
    return dict(spent)


def run_pace(
    port: int, pid: int, bodies: list[bytes], args: argparse.Namespace, think_s: float
) -> dict[str, Any]:
    """``args.clients`` clients: ``args.warmup`` untimed then ``args.requests`` timed requests each."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(args.clients + 1)
    done = threading.Barrier(args.clients + 1)

    def client(i: int) -> None:
        c = Client(port)
        try:
            for j in range(args.warmup):
                c.detect(bodies[(i + j * args.clients) % len(bodies)])
            start.wait(timeout=300)
            for j in range(args.requests):
                rt = c.detect(bodies[(i + j * args.clients) % len(bodies)])[0]
                with lock:
                    latencies.append(rt)
                time.sleep(think_s)
            done.wait(timeout=600)
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(args.clients)]
    for t in threads:
        t.start()
    start.wait(timeout=300)
    before, t0, mine = thread_cpu_s(pid), time.perf_counter(), os.times()
    done.wait(timeout=600)
    wall, mine_after = time.perf_counter() - t0, os.times()
    clients_cpu = (mine_after.user + mine_after.system) - (mine.user + mine.system)
    spent = cpu_by_name(pid, before)
    for t in threads:
        t.join()
    n = len(latencies)
    return {
        "clients": args.clients,
        "think_ms": round(think_s * 1e3, 3),
        "requests": n,
        "requests_per_s": round(n / wall, 2),
        "server_cpu_ms_per_request": round(sum(spent.values()) / n * 1e3, 2),
        "by_thread_ms_per_request": {
            k: round(v / n * 1e3, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v > 0
        },
        "round_trip_p50_ms": round(statistics.median(latencies), 3),
        "clients_cpu_ms_per_request": round(clients_cpu / n * 1e3, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    parser.add_argument("--think-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--requests", type=int, default=100, help="timed requests per client")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests per client first")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of the service")
    parser.add_argument("--max-batch-size", type=int, default=2)
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="RETINAEDGE_KEY=VALUE",
        help="another service setting for the run (repeatable), e.g. RETINAEDGE_PREPARE_THREADS=1",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    extra = dict(kv.split("=", 1) for kv in args.setting)
    if any(not k.startswith("RETINAEDGE_") for k in extra):
        parser.error("--setting takes RETINAEDGE_KEY=VALUE")
    bodies = [p.read_bytes() for p in STUDY]
    rows = []
    with tempfile.TemporaryDirectory(prefix="serve-cpu-") as tmp:
        with running_service(
            args.model, args.threads, args.max_batch_size, Path(tmp), extra_env=extra
        ) as service:
            for think in args.think_ms:
                row = run_pace(service.port, service.proc.pid, bodies, args, think / 1e3)
                sys.stdout.write(json.dumps(row) + "\n")
                sys.stdout.flush()
                rows.append(row)
    lines = [
        "",
        "| clients | think (ms) | requests/s | server CPU per request (ms) | by thread | clients' CPU (ms) "
        "| round trip p50 (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        threads = ", ".join(f"{k} {v}" for k, v in r["by_thread_ms_per_request"].items())
        lines.append(
            f"| {r['clients']} | {r['think_ms']:g} | {r['requests_per_s']} | {r['server_cpu_ms_per_request']} "
            f"| {threads} | {r['clients_cpu_ms_per_request']} | {r['round_trip_p50_ms']} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
