"""Ingest throughput of the C-STORE SCP beside STOW-RS, on one machine (development tooling).

Starts ``retinaedge serve`` (a temporary data directory, ``dimse_port`` on a free port, the caller's
``RETINAEDGE_*`` variables ignored), then for each protocol and each number of parallel associations
(C-STORE, pynetdicom's SCU sending the files' bytes as they are) or connections (STOW-RS, one multipart
request per connection with its share of the instances) sends ``--instances`` distinct instances (the
example study's 27 slices, 256 x 256 16-bit MR, copied with fresh UIDs) and times from the first byte to
the last acknowledgement. Every instance must be acknowledged (C-STORE status 0000, STOW-RS 200). The
service processes what it acknowledged meanwhile, as in production; before each run the previous run's
backlog is drained (every result present), so runs start alike.

Prints one JSON object per run (``protocol``, ``parallel``, ``instances``, ``seconds``,
``instances_per_s``) and a Markdown table. Usage::

    .venv/bin/python tools/dimse_throughput.py --instances 200 --parallel 1 4
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STUDY = sorted((ROOT / "examples" / "study_01").glob("*.dcm"))
AE_TITLE = "RETINAEDGE"

log = logging.getLogger("dimse_throughput")


def instances(count: int, tag: str, workdir: Path) -> list[tuple[str, Path, bytes]]:
    """``count`` copies of the example slices with fresh UIDs -> (SOP Instance UID, file, bytes)."""
    import pydicom
    from pydicom.uid import generate_uid

    out = []
    series = generate_uid()
    for k in range(count):
        ds = pydicom.dcmread(STUDY[k % len(STUDY)])
        uid = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SeriesInstanceUID = series
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = workdir / f"{tag}-{k:04d}.dcm"
        path.write_bytes(buf.getvalue())
        out.append((uid, path, buf.getvalue()))
    return out


def _parallel(shares: Sequence[Sequence[Any]], send: Callable[[Sequence[Any]], int]) -> tuple[float, int]:
    """Run ``send(share)`` in one thread per share, released together -> (seconds, acknowledged)."""
    barrier = threading.Barrier(len(shares) + 1)
    counts = [0] * len(shares)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            counts[i] = send(shares[i])
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(shares))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds, sum(counts)


def cstore(port: int, files: Sequence[Path]) -> int:
    """One association sending ``files`` (bytes as they are) -> how many got status 0000."""
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's data set as it is, not decoded and re-encoded
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 0
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    if not assoc.is_established:
        raise RuntimeError("the association was not accepted")
    ok = 0
    try:
        for path in files:
            status = assoc.send_c_store(path)
            ok += int(getattr(status, "Status", -1) == 0)
    finally:
        assoc.release()
    return ok


def stow(port: int, bodies: Sequence[bytes]) -> int:
    """One STOW-RS request with ``bodies`` as parts -> how many were acknowledged."""
    boundary = "dimse-throughput-boundary"
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + b + b"\r\n"
        for b in bodies
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
        conn.request("POST", "/dicomweb/studies", body=body, headers={"Content-Type": ctype})
        response = conn.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"STOW-RS answered {response.status}: {answer[:300]!r}")
        return len(json.loads(answer)["00081199"]["Value"])
    finally:
        conn.close()


def drain(port: int, uids: Sequence[str], timeout_s: float = 900) -> None:
    """Wait until every one of ``uids`` has its result."""
    deadline = time.monotonic() + timeout_s
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for uid in uids:
            while True:
                conn.request("GET", f"/v1/results/{uid}")
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"results still pending after {timeout_s} s")
                time.sleep(0.2)
    finally:
        conn.close()


def start_service(model: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    from retinaedge.bench.http_phase import free_port, log_tail, serve_command

    http_port, dimse_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAEDGE_")}
    env.update(
        RETINAEDGE_DATA_DIR=str(workdir / "service-data"),
        RETINAEDGE_MIN_FREE_BYTES="0",
        RETINAEDGE_DIMSE_PORT=str(dimse_port),
        RETINAEDGE_DIMSE_MAX_PDU_BYTES=str(1024 * 1024),
    )
    server_log = workdir / "server.log"
    with server_log.open("wb") as out:
        proc = subprocess.Popen(
            serve_command(model, http_port), env=env, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited:\n{log_tail(server_log)}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return proc, http_port, dimse_port
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the service was not ready within 180 s:\n{log_tail(server_log)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4], help="associations/connections")
    parser.add_argument("--out", type=Path, help="also write the runs as a JSON list here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # the SCU's per-association lines
    runs = []
    with tempfile.TemporaryDirectory(prefix="dimse-throughput-") as tmp:
        workdir = Path(tmp)
        proc, http_port, dimse_port = start_service(args.model, workdir)
        try:
            for parallel in args.parallel:
                for protocol in ("c-store", "stow-rs"):
                    batch = instances(args.instances, f"{protocol}-{parallel}", workdir)
                    items: list[Any] = (
                        [p for _, p, _ in batch] if protocol == "c-store" else [b for *_, b in batch]
                    )
                    shares = [items[i::parallel] for i in range(parallel)]
                    if protocol == "c-store":
                        seconds, ok = _parallel(shares, lambda share: cstore(dimse_port, share))
                    else:
                        seconds, ok = _parallel(shares, lambda share: stow(http_port, share))
                    if ok != len(batch):
                        raise RuntimeError(f"{protocol}: {ok} of {len(batch)} acknowledged")
                    run = {
                        "protocol": protocol,
                        "parallel": parallel,
                        "instances": len(batch),
                        "seconds": round(seconds, 3),
                        "instances_per_s": round(len(batch) / seconds, 1),
                    }
                    sys.stdout.write(json.dumps(run) + "\n")
                    sys.stdout.flush()
                    runs.append(run)
                    log.info("draining the backlog of %d instances", len(batch))
                    drain(http_port, [uid for uid, _, _ in batch])
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    table = ["", "| protocol | parallel | instances | s | instances/s |", "|---|---|---|---|---|"]
    table += [
        f"| {r['protocol']} | {r['parallel']} | {r['instances']} | {r['seconds']} | {r['instances_per_s']} |"
        for r in runs
    ]
    sys.stdout.write("\n".join(table) + "\n")
    if args.out is not None:
        args.out.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
