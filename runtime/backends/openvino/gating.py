"""Running the precision gate on this device: the golden frames (always) and annotated DICOM (when
given) through the FP32 reference and a candidate backend, compared by :mod:`.gate`.

:func:`golden_run` times the golden frames (one warm-up, then the median of ``repeats`` runs: the
figure ``auto`` compares precisions by; noisy on a shared machine). :func:`eval_run` runs ``retinaedge
eval``'s detection and COCO AP50 over annotated files with one backend.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from retinaedge.runtime.backends.base import Backend
from retinaedge.runtime.backends.openvino.gate import GateResult, add_ap50, compare_findings
from retinaedge.runtime.backends.openvino.recheck import RecheckedBackend
from retinaedge.runtime.bundle import Bundle
from retinaedge.runtime.detections import ImageDetections, split_outputs
from retinaedge.runtime.evaluate import EvalFrame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """What one backend produced on the gate's frames: detections per frame and ms per golden frame;
    ``map50`` on the annotated files (None without them or without ground truth)."""

    detections: list[ImageDetections]
    ms_per_frame: float
    map50: float | None = None


@dataclass(frozen=True)
class EvalSet:
    """Annotated DICOM for the gate: the ground truth file and the files it annotates."""

    annotations: Path
    files: tuple[Path, ...]


def golden_run(
    backend: Backend, images: np.ndarray, *, repeats: int = 3
) -> tuple[list[ImageDetections], float]:
    """Detections on ``images (N, C, H, W)`` and the median ms per frame over ``repeats`` timed runs."""
    outputs = backend.infer(images)  # warm-up (and the detections: a compiled model is deterministic)
    times = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        backend.infer(images)
        times.append((time.perf_counter() - started) * 1e3 / images.shape[0])
    return split_outputs(outputs), round(statistics.median(times), 3)


def _as_detections(frame: EvalFrame) -> ImageDetections:
    dets = list(frame.detections)
    return ImageDetections.from_arrays(
        [list(d.box) for d in dets], [d.score for d in dets], [d.class_id for d in dets]
    )


def eval_run(
    backend: Backend, bundle: Bundle, check: EvalSet, batch_size: int
) -> tuple[list[ImageDetections], float | None]:
    """Detections on every frame of ``check.files`` and their mean AP50 (``retinaedge eval``'s figures)."""
    from retinaedge.runtime.detector import Detector
    from retinaedge.runtime.discovery import dicom_files
    from retinaedge.runtime.eval_runs import detect_all
    from retinaedge.runtime.evaluate import evaluate, evaluated_classes, load_ground_truth, split_unmatched

    gt = load_ground_truth(check.annotations)
    paths = dicom_files(list(check.files), exclude=[check.annotations])
    det = Detector(bundle, backend, batch_size=batch_size)  # not closed: the backend is the caller's
    names = bundle.manifest.class_names
    detected = detect_all(det, paths, skip_rejected=False)
    matched, _unmatched = split_unmatched(gt.annotations, detected.frames_per_instance)
    figures = evaluate(detected.frames, matched, names, evaluated_classes(gt, names))
    return [_as_detections(f) for f in detected.frames], figures.map50


def reference_run(
    backend: Backend, bundle: Bundle, images: np.ndarray, check: EvalSet | None, batch_size: int
) -> Run:
    """The FP32 reference on the golden frames (and the annotated files)."""
    golden, ms = golden_run(backend, images)
    if check is None:
        return Run(golden, ms)
    more, map50 = eval_run(backend, bundle, check, batch_size)
    return Run(golden + more, ms, map50)


def gate(
    precision: str,
    candidate: Backend,
    reference: Run,
    bundle: Bundle,
    images: np.ndarray,
    check: EvalSet | None,
    batch_size: int,
) -> GateResult:
    """Run ``candidate`` on the gate's frames and compare it with ``reference`` (see :mod:`.gate`). A
    :class:`~.recheck.RecheckedBackend` is compared as it serves (with its FP32 re-check); its
    ``recheck_rate`` is the share of the annotated frames (else of the golden frames) it re-ran."""
    rechecked = candidate if isinstance(candidate, RecheckedBackend) else None
    if rechecked is not None:
        rechecked.reset_counts()
        detections = split_outputs(rechecked.infer(images))
    else:
        detections, ms = golden_run(candidate, images)
    map50 = None
    if check is not None:
        if rechecked is not None:
            rechecked.reset_counts()
        more, map50 = eval_run(candidate, bundle, check, batch_size)
        detections = detections + more
    manifest = bundle.manifest
    result = compare_findings(
        precision, reference.detections, detections, manifest.class_names, manifest.operating_point
    )
    if rechecked is not None:
        result.recheck_band, result.recheck_rate = rechecked.band, rechecked.rate
        set_timings(result, candidate, images, reference.ms_per_frame)
    else:
        result.ms_per_frame = result.reduced_ms_per_frame = ms
    if check is not None:
        add_ap50(result, reference.map50, map50)
    log.log(logging.INFO if result.passed else logging.WARNING, "precision gate %s", result.summary())
    return result


def set_timings(result: GateResult, candidate: Backend, images: np.ndarray, fp32_ms: float) -> None:
    """``result``'s ms per frame measured now on the golden frames: ``reduced_ms_per_frame`` the reduced
    precision's alone; ``ms_per_frame`` with a re-checked candidate's FP32 re-check at the gate's
    ``recheck_rate`` (that share of frames times FP32's ``fp32_ms``), else the same."""
    fast = candidate.fast if isinstance(candidate, RecheckedBackend) else candidate
    result.reduced_ms_per_frame = golden_run(fast, images)[1]
    result.ms_per_frame = with_recheck(result.reduced_ms_per_frame, result.recheck_rate, fp32_ms)


def with_recheck(reduced_ms: float, rate: float | None, fp32_ms: float) -> float:
    """ms per frame of a reduced precision whose FP32 re-check re-runs ``rate`` of the frames."""
    return round(reduced_ms + (rate or 0.0) * fp32_ms, 3)


def gate_inputs(bundle: Bundle, check: EvalSet | None, recheck_band: float = 0.0) -> str:
    """A fingerprint of what a gate compares: the golden frames, the operating point (which detections
    are findings), the criteria and, with annotated DICOM, the ground truth file and each DICOM file's
    path, size and modification time, and the FP32 re-check's band (:mod:`.recheck`; 0: none). A
    recorded gate with the same fingerprint is reused."""
    import hashlib
    import json

    from retinaedge.runtime.backends.openvino.gate import DEFAULT_FINDING_SCORE, GATE_IOU_MIN, MAX_AP50_DROP
    from retinaedge.runtime.discovery import dicom_files
    from retinaedge.runtime.hashing import sha256_file

    point = bundle.manifest.operating_point
    doc: dict[str, object] = {
        "golden": sha256_file(bundle.golden_input_path) if bundle.golden_input_path else None,
        "thresholds": point.score_thresholds if point is not None else DEFAULT_FINDING_SCORE,
        "criteria": [GATE_IOU_MIN, MAX_AP50_DROP],
    }
    if recheck_band:  # the re-check's rule: its band and the detection cap it watches
        doc["recheck"] = {"band": recheck_band, "cap": bundle.manifest.postprocess.detections_per_img}
    if check is not None:
        files = dicom_files(list(check.files), exclude=[check.annotations])
        doc["annotations"] = sha256_file(check.annotations)
        doc["files"] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def relaxed_rate(expected: Sequence[ImageDetections], got: Sequence[ImageDetections]) -> float:
    """The worst per-image share of the recorded golden detections found again at IoU >= 0.5 and within
    0.1 of their score: the golden self-test's criterion for a precision that passed its gate."""
    from retinaedge.runtime.matching import match_images

    _reports, worst = match_images(list(expected), list(got), {"iou_min": 0.5, "score_tol": 0.1})
    return worst
