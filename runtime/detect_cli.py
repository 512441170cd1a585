"""``retinaedge detect --model DIR FILE...``: one JSON line per input file, in order."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .dicomio import Limits
from .errors import RetinaEdgeError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model bundle directory (or a model.onnx)")
    p.add_argument(
        "files", nargs="+", type=Path, help="DICOM files; a directory means every file in it, sorted"
    )
    p.add_argument(
        "--overlay", type=Path, help="write a PNG per frame with the detections drawn into this directory"
    )
    p.add_argument("--batch-size", type=int, default=4, help="frames per inference batch (default 4)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: CPU affinity)")
    p.add_argument(
        "--provider",
        choices=sorted(PROVIDERS),
        default="cpu",
        help="ONNX Runtime execution provider; refused if it is not the one actually in use",
    )
    p.add_argument(
        "--max-frame-bytes",
        type=int,
        default=Limits.max_frame_bytes,
        help="decoded-size budget of one frame in bytes",
    )
    p.add_argument(
        "--max-decoded-bytes",
        type=int,
        default=Limits.max_decoded_bytes,
        help="decoded-size budget of one instance in bytes",
    )


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; directories replaced by their regular files (recursively, sorted)."""
    out: list[Path] = []
    for p in paths:
        out += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return out


def run(args: argparse.Namespace) -> int:
    from .cli import emit
    from .detector import Detector
    from .overlay import write_png

    limits = Limits(max_frame_bytes=args.max_frame_bytes, max_decoded_bytes=args.max_decoded_bytes)
    rejected = 0
    providers = (
        (PROVIDERS[args.provider],)
        if args.provider == "cpu"
        else (PROVIDERS[args.provider], PROVIDERS["cpu"])
    )
    with Detector.open(
        args.model, threads=args.threads, batch_size=args.batch_size, limits=limits, providers=providers
    ) as det:
        for number, path in enumerate(expand(args.files)):
            on_frame = None
            if args.overlay:
                stem = f"{number:04d}_{path.stem}"

                def on_frame(index, chw, frame, stem=stem):  # type: ignore[no-untyped-def]
                    write_png(args.overlay / f"{stem}_f{index:04d}.png", chw, frame)

            try:
                result = det.detect(path, on_frame=on_frame)
                emit({"file": str(path), **result.to_json()})
            except RetinaEdgeError as exc:
                rejected += 1
                log.warning("rejected input #%d: %s", number, exc.type)
                emit({"file": str(path), "error": exc.to_dict()})
            except Exception as exc:  # a bug, not the input: report it and carry on with the next file
                rejected += 1
                log.exception("internal error on input #%d", number)
                emit(
                    {
                        "file": str(path),
                        "error": {"type": "internal-error", "message": f"{type(exc).__name__}: {exc}"},
                    }
                )
    return 1 if rejected else 0
