"""``retinaedge device``: what hardware, power mode, clocks and software versions this machine has.

Prints the report as one JSON object on stdout (absent facts are ``null``), or a readable table with
``--table``. ``--root DIR`` reads ``etc/``, ``proc/`` and ``usr/`` under DIR instead of ``/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from retinaedge.device.collect import CommandRunner, DeviceReport, collect

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``device`` verb's options to ``p``."""
    p.add_argument("--table", action="store_true", help="print a readable table instead of JSON")
    p.add_argument(
        "--root", type=Path, default=Path("/"), help="filesystem root to read (a fake tree for testing)"
    )
    p.add_argument(
        "--command-path",
        default=None,
        help="search path (os.pathsep-separated) for nvpmodel, jetson_clocks, nvidia-smi (default: PATH)",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="timeout per command in seconds (default: 5)")


def report_to_dict(report: DeviceReport) -> dict[str, Any]:
    """The report as plain JSON-ready data (tuples become lists, absent facts None)."""
    return dataclasses.asdict(report)


def _mib(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f} MiB"


def _rows(report: DeviceReport) -> list[tuple[str, str]]:
    rows = [("root", report.root), ("kernel", report.kernel or "?"), ("machine", report.machine or "?")]
    if report.cpu is not None:
        rows.append(("cpu", f"{report.cpu.model or '?'} x {report.cpu.logical_cpus}"))
    rows.append(("cpu affinity", "?" if report.cpu_affinity is None else str(report.cpu_affinity)))
    if report.memory is not None:
        rows.append(
            ("memory", f"{_mib(report.memory.total_mb)} total, {_mib(report.memory.available_mb)} free")
        )
    jetson = report.jetson
    if jetson is None:
        rows.append(("jetson", "no"))
    else:
        if jetson.l4t is not None:
            rows.append(("L4T / JetPack", f"{jetson.l4t.version} / {jetson.l4t.jetpack or '?'}"))
        if jetson.module is not None:
            m = jetson.module
            rows.append(("model", m.model or "?"))
            rows.append(("module", f"{m.module or '?'} ({m.part_number or '?'})"))
            rows.append(("SoC", f"{m.soc or '?'} {m.soc_family or ''} {m.gpu_architecture or ''}".strip()))
        mode = jetson.power_mode
        rows.append(("power mode", "?" if mode is None else f"{mode.name} (id {mode.id})"))
        pinned = None if jetson.clocks is None else jetson.clocks.pinned
        rows.append(
            ("clocks pinned", {True: "yes", False: "no", None: "? (jetson_clocks --show needs root)"}[pinned])
        )
    sync = None if report.time_sync is None else report.time_sync.synchronised
    rows.append(("clock in sync", {True: "yes", False: "no", None: "?"}[sync]))
    for i, gpu in enumerate(report.nvidia_gpus):
        rows.append(
            (f"gpu {i}", f"{gpu.name}, {_mib(gpu.memory_total_mb)}, driver {gpu.driver_version or '?'}")
        )
    versions = report.versions
    for name, value in (
        ("python", versions.python),
        ("CUDA", versions.cuda),
        ("TensorRT", versions.tensorrt),
        ("ONNX Runtime", versions.onnxruntime),
        ("pycuda", versions.pycuda),
    ):
        rows.append((name, value or "not found"))
    return rows


def format_table(report: DeviceReport) -> str:
    """The report as aligned ``name  value`` lines."""
    rows = _rows(report)
    width = max(len(name) for name, _ in rows)
    return "".join(f"{name.ljust(width)}  {value}\n" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    """Collect and print the report; returns the exit status (0: a report was printed)."""
    if not Path(args.root).is_dir():
        sys.stderr.write(f"retinaedge device: --root {args.root} is not a directory\n")
        return 2
    runner = CommandRunner(search_path=args.command_path, timeout_s=args.timeout)
    report = collect(args.root, runner, timeout_s=args.timeout)
    if args.table:
        sys.stdout.write(format_table(report))
    else:
        sys.stdout.write(json.dumps(report_to_dict(report), indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m retinaedge.device.device_cli``)."""
    parser = argparse.ArgumentParser(prog="retinaedge device", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
