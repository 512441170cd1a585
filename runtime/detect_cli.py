"""``retinaedge detect --model DIR FILE...``: one JSON line per input file, in order.

``--backend`` picks the backend from the registry (default ``onnxruntime``; ``tensorrt``: the engine the
service serves with, from the engine cache or built; ``auto``: the service's choice).

With ``--series``: the detections of every file are grouped into series, ordered along the slice normal
and linked into 3D findings (:mod:`.findings`); one JSON line per series (in order of first
appearance), after a ``{"file", "error"}`` line for each rejected file.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinaedge.runtime.backends.registry import add_backend_arguments
from retinaedge.runtime.dicomio import Limits
from retinaedge.runtime.discovery import RULE_HELP, dicom_files
from retinaedge.runtime.errors import ConfigError, RetinaEdgeError
from retinaedge.runtime.intended_use import NotApplicableError

if TYPE_CHECKING:
    from retinaedge.runtime.findings import LinkParams, SeriesResult
    from retinaedge.runtime.instance_result import InstanceResult
    from retinaedge.runtime.slices import FrameRef

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model bundle directory (or a model.onnx)")
    p.add_argument("files", nargs="+", type=Path, help=f"DICOM files; {RULE_HELP}")
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
    add_backend_arguments(p, default="onnxruntime")
    series = p.add_argument_group("series findings (--series)")
    series.add_argument(
        "--series",
        action="store_true",
        help="group the files into series and print one object per series with its 3D findings, linked "
        "from the findings of each frame (the detections at or above the model's operating point)",
    )
    series.add_argument(
        "--min-score",
        type=float,
        help="also ignore findings scoring below this (default: none beyond the operating point; 0.5 for a "
        "bundle without one)",
    )
    series.add_argument("--min-slices", type=int, help="drop findings on fewer slices than this (default 2)")
    series.add_argument(
        "--link-iou", type=float, help="box IoU that links detections on neighbouring slices (default 0.2)"
    )
    series.add_argument(
        "--max-gap", type=int, help="slices a finding may skip between two detections (default 1)"
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


SERIES_OPTIONS = ("min_score", "min_slices", "link_iou", "max_gap")


def link_params(args: argparse.Namespace, has_operating_point: bool) -> LinkParams | None:
    """The linking parameters with ``--series`` (defaults where not given: ``--min-score`` from
    :func:`~retinaedge.runtime.findings.default_min_score`), else None; series options without
    ``--series`` are refused."""
    given = series_options(args)
    if not getattr(args, "series", False):
        return None
    from retinaedge.runtime.findings import LinkParams, default_min_score

    given.setdefault("min_score", default_min_score(has_operating_point))
    return LinkParams(**given)


def series_options(args: argparse.Namespace) -> dict[str, Any]:
    """The series options given on the command line; ConfigError when any is given without ``--series``."""
    given: dict[str, Any] = {name: getattr(args, name, None) for name in SERIES_OPTIONS}
    given = {name: value for name, value in given.items() if value is not None}
    if given and not getattr(args, "series", False):
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConfigError(f"{flags} only apply with --series")
    return given


def run(args: argparse.Namespace) -> int:
    from retinaedge.runtime.backends.base import BackendOptions
    from retinaedge.runtime.backends.registry import backend_extra, check_available
    from retinaedge.runtime.detector import Detector
    from retinaedge.runtime.jsonout import emit
    from retinaedge.runtime.overlay import write_png
    from retinaedge.runtime.slices import read_frames

    series_options(args)  # misplaced series options: refused before any file is read
    if args.provider != "cpu" and args.backend != "onnxruntime":  # auto might not use it: not silently
        raise ConfigError(
            f"--provider {args.provider} applies to ONNX Runtime, not to --backend {args.backend} "
            "(pass --backend onnxruntime)"
        )
    check_available(args.backend)  # a missing extra: one error line before anything is read
    extra = backend_extra(args)
    collected: list[tuple[InstanceResult, list[FrameRef]]] = []
    files: dict[str, str] = {}  # SOP Instance UID -> input file (series mode)
    limits = Limits(max_frame_bytes=args.max_frame_bytes, max_decoded_bytes=args.max_decoded_bytes)
    rejected = 0
    providers = (
        (PROVIDERS[args.provider],)
        if args.provider == "cpu"
        else (PROVIDERS[args.provider], PROVIDERS["cpu"])
    )
    options = BackendOptions(
        threads=args.threads,
        providers=providers,
        batch_size=args.batch_size,
        cache_dir=args.engine_cache,
        extra=extra,
    )
    with Detector.open(
        args.model, backend=args.backend, batch_size=args.batch_size, limits=limits, options=options
    ) as det:
        params = link_params(args, det.bundle.manifest.operating_point is not None)
        for number, path in enumerate(dicom_files(args.files)):
            on_frame = None
            if args.overlay:
                stem = f"{number:04d}_{path.stem}"

                def on_frame(index, chw, frame, stem=stem):  # type: ignore[no-untyped-def]
                    write_png(args.overlay / f"{stem}_f{index:04d}.png", chw, frame)

            try:
                result = det.detect(path, on_frame=on_frame)
                if params is None:
                    emit({"file": str(path), **result.to_json()})
                else:
                    collected.append((result, read_frames(path, limits)))
                    files.setdefault(result.sop_instance_uid, str(path))
            except NotApplicableError as exc:  # not the model's image: said, but not a rejected input
                log.info("input #%d is outside the model's intended use", number)
                emit({"file": str(path), "error": exc.to_dict()})
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
        model = {"name": det.bundle.manifest.name, "sha256": str(det.bundle.manifest.model_sha256)}
    if params is not None:
        for series in series_results(collected, params):
            uids = dict.fromkeys(f.sop_instance_uid for f in series.stack.frames)
            emit({**series.to_json(), "model": model, "files": [files[u] for u in uids if u in files]})
    return 1 if rejected else 0


def series_results(
    collected: list[tuple[InstanceResult, list[FrameRef]]], params: LinkParams
) -> list[SeriesResult]:
    """Per-instance results and frame geometry -> one :class:`SeriesResult` per series."""
    from retinaedge.runtime.findings import analyse_series

    frames = [f for _, refs in collected for f in refs]
    detections = {  # findings only: the detections at or above the model's operating point
        (result.sop_instance_uid, fr.index): [d for d in fr.detections if d.finding]
        for result, _ in collected
        for fr in result.frames
    }
    results = analyse_series(frames, detections, params)
    log.info(
        "%d instance(s) in %d series: %d finding(s), %d inconsistent stack(s)",
        len(collected),
        len(results),
        sum(len(r.findings) for r in results),
        sum(not r.stack.consistent for r in results),
    )
    return results
