"""Scale figures for ``backend = triton``: P appliance processes against one Triton vs the same P processes
each running ONNX Runtime locally, on the same machine.

For every P in ``--processes`` and both modes, P ``retinaedge serve`` processes start (each its own port
and data directory), ``--concurrency`` client threads per process post the DICOM files of ``--inputs``
(``--rounds`` times) to ``/v1/detect``, and the wall time from the first request to the last answer gives
frames/s. In Triton mode the model statistics API is read before and after, so the report also says
which batch sizes Triton's dynamic batcher formed (executions per batch size).

Triton: by default a local CPU tritonserver from the nvidia-pytriton wheel (tools/triton_local.py) on a
python-variant repository exported here (``--triton-instances``, ``--triton-threads``); with
``--triton-url``/``--triton-model`` an existing Triton (e.g. a GPU server) is used as it is.

    python tools/triton_scale.py --processes 1,2,4 --rounds 2 --out triton-scale.json

Prints one table and writes the figures as JSON. Measure on a quiet machine: every process shares the CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_local import LocalTriton  # noqa: E402

log = logging.getLogger("triton_scale")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_appliances(count: int, model: Path, settings: dict[str, Any], work: Path) -> list[tuple[Any, str]]:
    """``count`` ``retinaedge serve`` processes with ``settings`` (JSON config); returns (Popen, base URL)."""
    started = []
    for i in range(count):
        port = free_port()
        config = work / f"appliance-{i}.json"
        config.write_text(json.dumps({**settings, "data_dir": str(work / f"data-{i}-{port}")}))
        with open(work / f"appliance-{i}.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "retinaedge.runtime.cli", "serve", "--model", str(model)]
                + ["--port", str(port), "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        started.append((proc, f"http://127.0.0.1:{port}"))
    for proc, base in started:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"appliance {base} exited with {proc.returncode} (log in {work})")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"appliance {base} not ready within 180 s (log in {work})")
            time.sleep(0.2)
    return started


def stop_appliances(started: list[tuple[Any, str]]) -> None:
    for proc, _ in started:
        proc.terminate()
    for proc, _ in started:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def drive(bases: list[str], files: list[bytes], concurrency: int) -> tuple[int, float]:
    """Post every file to every appliance, ``concurrency`` threads each -> (frames answered, wall s)."""
    frames = Counter[str]()
    errors: list[str] = []

    def client(base: str, part: list[bytes]) -> None:
        with httpx.Client(timeout=600) as c:
            for data in part:
                r = c.post(f"{base}/v1/detect", content=data, headers={"Content-Type": "application/dicom"})
                if r.status_code != 200:
                    errors.append(f"{base}: {r.status_code} {r.text[:200]}")
                    continue
                frames[base] += len(r.json()["frames"])

    threads = [
        threading.Thread(target=client, args=(base, files[k::concurrency]))
        for base in bases
        for k in range(concurrency)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, e.g. {errors[0]}")
    return sum(frames.values()), wall


def batch_counts(url: str, model: str) -> Counter[int]:
    """Executions per batch size so far (Triton's model statistics API)."""
    import tritonclient.http as th

    client = th.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()
    return Counter(
        {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    p.add_argument(
        "--inputs", type=Path, default=ROOT / "examples" / "study_01", help="directory of DICOM files"
    )
    p.add_argument("--processes", default="1,2,4", help="appliance process counts (default 1,2,4)")
    p.add_argument("--rounds", type=int, default=1, help="times each appliance gets every input file")
    p.add_argument("--concurrency", type=int, default=2, help="client threads per appliance (default 2)")
    p.add_argument("--batch-size", type=int, default=4, help="the appliances' max_batch_size setting")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of each local appliance")
    p.add_argument("--modes", default="onnxruntime,triton", help="which of onnxruntime,triton to run")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument(
        "--triton-url", help="an existing Triton's HTTP host:port (default: start a local CPU one)"
    )
    p.add_argument("--triton-grpc-url", help="its gRPC host:port, with --protocol grpc")
    p.add_argument("--triton-model", help="its model name (default: the manifest's)")
    p.add_argument("--triton-instances", type=int, default=1, help="local Triton: model instances")
    p.add_argument(
        "--triton-threads", type=int, default=1, help="local Triton: ONNX Runtime threads per instance"
    )
    p.add_argument("--max-batch", type=int, default=8, help="local Triton: max_batch_size")
    p.add_argument("--out", type=Path, default=Path("triton-scale.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from retinaedge.runtime.bundle import load_bundle

    bundle = load_bundle(args.model)
    files = [f.read_bytes() for f in sorted(args.inputs.iterdir()) if f.is_file()] * args.rounds
    counts = [int(x) for x in args.processes.split(",") if x.strip()]
    modes = [m for m in args.modes.split(",") if m]
    work = Path(tempfile.mkdtemp(prefix="retinaedge-scale-"))
    server = None
    model = args.triton_model or bundle.manifest.name
    http_url = args.triton_url
    grpc_url = args.triton_grpc_url
    rows: list[dict[str, Any]] = []
    try:
        if "triton" in modes and http_url is None:
            from retinaedge.export.triton.repo import ExportRequest, export_repository

            repo = work / "repo"
            export_repository(
                ExportRequest(
                    model=args.model,
                    out=repo,
                    name=model,
                    max_batch=args.max_batch,
                    instances=args.triton_instances,
                    platform="python",
                    threads=args.triton_threads,
                )
            )
            server = LocalTriton(
                repo,
                http_port=free_port(),
                grpc_port=free_port(),
                metrics_port=free_port(),
                log_path=work / "triton.log",
            )
            server.start(120)
            http_url, grpc_url = server.http_url, server.grpc_url
        for mode in modes:
            for n in counts:
                settings: dict[str, Any] = {"max_batch_size": args.batch_size, "queue_size": 64}
                if mode == "triton":
                    url = grpc_url if args.protocol == "grpc" else http_url
                    settings.update(
                        backend="triton", triton_url=url, triton_model=model, triton_protocol=args.protocol
                    )
                else:
                    settings.update(backend="onnxruntime", threads=args.threads)
                started = start_appliances(n, args.model, settings, work)
                try:
                    before = batch_counts(http_url, model) if mode == "triton" and http_url else Counter()
                    frames, wall = drive([b for _, b in started], files, args.concurrency)
                    after = batch_counts(http_url, model) if mode == "triton" and http_url else Counter()
                finally:
                    stop_appliances(started)
                formed = {str(k): v for k, v in sorted((after - before).items())}
                row = {"mode": mode, "processes": n, "frames": frames, "seconds": round(wall, 3)}
                row["frames_per_s"] = round(frames / wall, 2)
                if mode == "triton":
                    row["triton_batches"] = formed  # batch size -> executions
                rows.append(row)
                log.info("%s", row)
    finally:
        if server is not None:
            server.close()
    report = {
        "model": bundle.manifest.name,
        "inputs": str(args.inputs),
        "rounds": args.rounds,
        "concurrency_per_process": args.concurrency,
        "appliance_max_batch_size": args.batch_size,
        "local_threads": args.threads,
        "triton": {"url": http_url, "model": model, "protocol": args.protocol, "local": server is not None},
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2))
    sys.stdout.write(
        f"{'mode':<12} {'procs':>5} {'frames':>7} {'s':>8} {'frames/s':>9}  Triton batches (size: executions)\n"
    )
    for r in rows:
        batches = ", ".join(f"{k}: {v}" for k, v in r.get("triton_batches", {}).items()) or "-"
        sys.stdout.write(
            f"{r['mode']:<12} {r['processes']:>5} {r['frames']:>7} {r['seconds']:>8.2f} {r['frames_per_s']:>9.2f}  {batches}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
