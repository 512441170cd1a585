"""``retinaedge quantize --model DIR --calibration PATH...``: write the bundle's Q/DQ INT8 model.

Calibration frames are DICOM files (or directories of them) passed through the runtime's exact
preprocessing. The result, ``model.int8.qdq.onnx`` beside ``model.onnx`` with ``quantization.json``,
runs in ONNX Runtime on the CPU and is what ``retinaedge build --precision int8`` builds. Prints one
JSON object (the report). Measure its accuracy with ``retinaedge eval`` before relying on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model bundle directory (written into)")
    p.add_argument(
        "--calibration", type=Path, nargs="+", required=True, help="DICOM files or directories of them"
    )
    p.add_argument("--max-frames", type=int, default=200, help="calibration frames at most (default 200)")
    p.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="percentile")


def run(args: argparse.Namespace) -> int:
    from .cli import emit
    from .quantize import quantize_bundle

    report = quantize_bundle(args.model, args.calibration, max_frames=args.max_frames, method=args.method)
    emit(report.to_dict())
    return 0
