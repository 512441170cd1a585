"""The DIMSE drill: the C-STORE SCP's memory and CPU under hostile and greedy peers, measured on a real
``retinaedge serve`` (a temporary data directory; the caller's ``RETINAEDGE_*`` variables are ignored).

Phases, all on 127.0.0.1:

1. idle: the service's RSS, then ``--associations`` idle associations (pynetdicom) held for
   ``--idle-seconds``: the service's CPU share and RSS per association;
2. hostile and greedy at once: an A-ASSOCIATE-RQ announcing ``--announce-mib`` (1 GiB) from an unknown
   AE (as much of it sent as the service reads), ``--stalled`` connections that send 16 bytes of a request and stop, and
   ``--parallel`` C-STOREs of ``--instance-mib`` MiB instances at once; meanwhile a C-ECHO every 0.5 s and a
   small C-STORE every 2 s, each of which must succeed. The service's RSS is sampled every 20 ms and its
   peak (VmHWM, reset before the phase) reported above the idle baseline; each stalled connection's
   lifetime is measured.

Inference is held (as the tests' gate does) so that the instances wait as pending rows: the figures are the
receiving path's, not the pipeline's (whose memory is bounded by frames, see docs/architecture.md).
Prints one JSON object; ``--out FILE`` writes it too.

    .venv/bin/python tools/dimse_drill.py                     # 4 x 200 MiB, 50 stalled, 8 idle associations
    .venv/bin/python tools/dimse_drill.py --instance-mib 50 --stalled 20 --acse-timeout 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: ``retinaedge serve`` whose inference waits while the file argv[1] exists.
GATED = """
import os, sys, time
from retinaedge.service.pipeline.stages import InferenceWorker
from retinaedge.runtime.cli import main
gate = sys.argv.pop(1)
real = InferenceWorker.run_batch
def held(self, *args, **kwargs):
    while os.path.exists(gate):
        time.sleep(0.05)
    return real(self, *args, **kwargs)
InferenceWorker.run_batch = held
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(work: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], int, Path]:
    import httpx

    dimse_port, http_port = free_port(), free_port()
    config = work / "settings.json"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(work / "data"),
                "dimse_port": dimse_port,
                "dimse_allowed_aets": ["SCANNER"],
                "dimse_acse_timeout_s": args.acse_timeout,
                "max_batch_size": 1,
                "threads": 1,
                "prepare_threads": 1,
                "min_free_bytes": 0,
            }
        )
    )
    gate = work / "gate"
    gate.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAEDGE_")}
    argv = [sys.executable, "-c", GATED, str(gate), "serve", "--model", str(args.model)]
    with (work / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            argv + ["--port", str(http_port), "--config", str(config)], stderr=log, env=env
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((work / "server.log").read_text()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=2).status_code == 200:
                return proc, dimse_port, gate
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the service did not become ready")


def ae(title: str = "SCANNER") -> Any:
    from pynetdicom import AE, build_context

    entity = AE(ae_title=title)
    entity.requested_contexts = [
        build_context("1.2.840.10008.1.1"),
        build_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1"]),
    ]
    entity.acse_timeout = entity.dimse_timeout = entity.network_timeout = 600
    return entity


def make_instances(work: Path, mib: int, count: int) -> list[Path]:
    """``count`` MR instances of ``mib`` MiB (512 x 512 16-bit frames), distinct UIDs, as files."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    frames = max(1, mib * 2)  # 0.5 MiB each
    pixels = np.random.default_rng(1).integers(0, 4096, size=(frames, 512, 512), dtype=np.uint16).tobytes()
    paths = []
    for k in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
            MRImageStorage,
            ds.SOPInstanceUID,
        )
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "MR"
        ds.PatientName, ds.PatientID = "DRILL^SYNTHETIC", "DRILL-0001"
        ds.Rows = ds.Columns = 512
        ds.NumberOfFrames = frames
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        path = work / f"big-{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def idle_phase(pid: int, port: int, n: int, seconds: float) -> dict[str, float]:
    base_kib = status_kib(pid, "VmRSS")
    entity = ae()
    assocs = [entity.associate("127.0.0.1", port, ae_title="RETINAEDGE") for _ in range(n)]
    assert all(a.is_established for a in assocs), "idle associations were not accepted"
    time.sleep(1.0)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    share = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    held_kib = status_kib(pid, "VmRSS")
    for a in assocs:
        a.release()
    return {
        "idle_associations": n,
        "idle_cpu_share_of_a_core": round(share, 4),
        "rss_baseline_mib": round(base_kib / 1024, 1),
        "rss_per_idle_association_mib": round((held_kib - base_kib) / 1024 / n, 2),
    }


def announce(port: int, mib: int) -> dict[str, Any]:
    """A raw A-ASSOCIATE-RQ header announcing ``mib`` MiB (the calling AE in it is never read), then as
    much of it as the service reads."""
    sent = 0
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, mib << 20))
        chunk = b"\0" * (1 << 20)
        sock.settimeout(5)
        try:
            while sent < (mib << 20):
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
    return {
        "announced_request_mib": mib,
        "announced_request_bytes_sent_before_closed": sent,
        "announced_request_closed_after_s": round(time.monotonic() - started, 2),
    }


def stalled(port: int, count: int, limit_s: float) -> dict[str, Any]:
    socks = []
    opened = time.monotonic()
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(struct.pack(">BBL", 0x01, 0, 200) + b"\x00\x01" + b"\x00" * 8)
        s.setblocking(False)
        socks.append(s)
    lifetimes: dict[int, float] = {}
    while len(lifetimes) < count and time.monotonic() - opened < limit_s:
        for k, s in enumerate(socks):
            if k in lifetimes:
                continue
            try:
                if s.recv(65536) == b"":
                    lifetimes[k] = time.monotonic() - opened
            except BlockingIOError:
                pass
            except OSError:
                lifetimes[k] = time.monotonic() - opened
        time.sleep(0.05)
    for s in socks:
        s.close()
    return {
        "stalled": count,
        "stalled_closed": len(lifetimes),
        "stalled_longest_open_s": round(max(lifetimes.values(), default=float("nan")), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--instance-mib", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--stalled", type=int, default=50, help="half-sent requests (0: none)")
    parser.add_argument("--announce-mib", type=int, default=1024, help="the huge request's length (0: none)")
    parser.add_argument("--associations", type=int, default=8)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--acse-timeout", type=float, default=30.0, help="dimse_acse_timeout_s (default 30)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # the senders stream from their files
    report: dict[str, Any] = {"instance_mib": args.instance_mib, "parallel": args.parallel}
    with tempfile.TemporaryDirectory(prefix="dimse-drill-") as tmp:
        work = Path(tmp)
        big = make_instances(work, args.instance_mib, args.parallel)
        (work / "small").mkdir()
        small = make_instances(work / "small", 1, 1)[0]
        proc, port, gate = start(work, args)
        try:
            report.update(idle_phase(proc.pid, port, args.associations, args.idle_seconds))
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            base_kib = status_kib(proc.pid, "VmRSS")
            samples: list[int] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    samples.append(status_kib(proc.pid, "VmRSS"))
                    time.sleep(0.02)

            statuses: list[int | None] = []
            store_seconds: list[float] = []
            checks: dict[str, list[bool]] = {"echo": [], "store": []}

            def store(path: Path) -> None:
                began = time.monotonic()
                a = ae().associate("127.0.0.1", port, ae_title="RETINAEDGE", max_pdu=131072)
                try:
                    st = a.send_c_store(path) if a.is_established else None
                    statuses.append(int(st.Status) if st is not None and "Status" in st else None)
                finally:
                    a.release()
                    store_seconds.append(round(time.monotonic() - began, 1))

            def legit() -> None:
                k = 0
                while not stop.is_set():
                    a = ae().associate("127.0.0.1", port, ae_title="RETINAEDGE")
                    ok = a.is_established and a.send_c_echo().get("Status") == 0
                    checks["echo"].append(bool(ok))
                    if a.is_established and k % 4 == 0:
                        st = a.send_c_store(small)
                        checks["store"].append(st.get("Status") == 0)
                    if a.is_established:
                        a.release()
                    k += 1
                    stop.wait(0.5)

            started = time.monotonic()
            threads = [threading.Thread(target=sample), threading.Thread(target=legit)]
            threads += [threading.Thread(target=store, args=(p,)) for p in big]
            hostile: dict[str, Any] = {}
            hostile_threads = []
            if args.announce_mib:
                hostile_threads.append(
                    threading.Thread(target=lambda: hostile.update(announce(port, args.announce_mib)))
                )
            if args.stalled:
                hostile_threads.append(
                    threading.Thread(
                        target=lambda: hostile.update(stalled(port, args.stalled, args.acse_timeout + 30))
                    )
                )
            for t in hostile_threads + threads:
                t.start()
            for t in threads[2:] + hostile_threads:
                t.join()
            seconds = time.monotonic() - started
            stop.set()
            for t in threads[:2]:
                t.join()
            peak_kib = status_kib(proc.pid, "VmHWM")
            report.update(hostile)
            report.update(
                {
                    "stores": statuses,
                    "store_seconds_each": store_seconds,
                    "drill_seconds": round(seconds, 1),
                    "legit_echoes_ok": f"{sum(checks['echo'])}/{len(checks['echo'])}",
                    "legit_stores_ok": f"{sum(checks['store'])}/{len(checks['store'])}",
                    "rss_before_mib": round(base_kib / 1024, 1),
                    "rss_peak_sampled_mib": round(max(samples, default=0) / 1024, 1),
                    "rss_peak_hwm_mib": round(peak_kib / 1024, 1),
                    "rss_growth_peak_mib": round((peak_kib - base_kib) / 1024, 1),
                }
            )
        finally:
            gate.unlink(missing_ok=True)
            proc.terminate()
            proc.wait(120)
    text = json.dumps(report, indent=1)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
