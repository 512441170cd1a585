"""``retinaedge eval --model DIR --annotations GT.json FILE_OR_DIR...``: COCO AP on annotated DICOM files.

Runs the model on every frame of every file, scores the detections against the ground truth with
pycocotools (:mod:`.evaluate`) and prints one JSON object (``--out`` writes it too, indented).
``--backend`` picks the backend from the registry (default ``onnxruntime``; ``tensorrt``, ``auto``).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retinaedge.runtime.backends.registry import add_backend_arguments
from retinaedge.runtime.discovery import RULE_HELP, dicom_files
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.eval_operating_point import operating_point_report, write_operating_point
from retinaedge.runtime.eval_runs import InputRejected, detect_all, peek_uid
from retinaedge.runtime.evaluate import (
    GROUND_TRUTH_HELP,
    Annotation,
    describe_unmatched,
    evaluate,
    evaluated_classes,
    load_ground_truth,
    split_unmatched,
)

log = logging.getLogger(__name__)

OUTPUT_HELP = """
output: one JSON object on stdout (and in --out): model {name, sha256, path}, backend, images
(frames), instances (files), classes {name: {ap50, ap, ap75, ar100, ground_truth, difficult,
detections}}, map50 and map (means over classes with ground truth), iou_thresholds,
max_detections, rejected_files, unmatched_annotations, operating_point (null, or per class: threshold,
true_positives, false_positives, false_negatives, sensitivity, precision at IoU 0.5; at the bundle's
operating point, or at the one --choose-operating-point chose) and, with --min-map50, gate {min_map50,
passed}.

exit status: 0 done; 1 the --min-map50 gate failed or an input file was rejected (without
--skip-rejected); 2 invalid options or ground truth.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = GROUND_TRUTH_HELP + OUTPUT_HELP
    p.add_argument("--model", type=Path, required=True, help="model bundle directory (or a model.onnx)")
    p.add_argument("--annotations", type=Path, required=True, help="ground-truth JSON file (format below)")
    p.add_argument(
        "files",
        nargs="+",
        type=Path,
        help=f"DICOM files; {RULE_HELP}; the --annotations file itself is never an input",
    )
    p.add_argument("--batch-size", type=int, default=4, help="frames per inference batch (default 4)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: CPU affinity)")
    add_backend_arguments(p, default="onnxruntime")
    p.add_argument(
        "--min-map50",
        type=float,
        metavar="X",
        help="quality gate: exit 1 when mAP@0.5 (0..1) is below X or undefined",
    )
    p.add_argument("--out", type=Path, help="also write the report, indented, to this file")
    p.add_argument(
        "--choose-operating-point",
        metavar="RULE",
        help="choose a score threshold per evaluated class on these files: max-f1, or sensitivity>=X "
        "(the highest threshold reaching sensitivity X); reported under operating_point",
    )
    p.add_argument(
        "--write-operating-point",
        action="store_true",
        help="with --choose-operating-point: write the chosen thresholds into the bundle's manifest.json "
        "(documents then show findings at or above them)",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="leave out annotations of instances/frames that are not among the files (counted as "
        "unmatched_annotations) instead of failing",
    )
    p.add_argument(
        "--skip-rejected",
        action="store_true",
        help="leave out DICOM files the runtime rejects (counted as rejected_files; their annotations "
        "count as unmatched) instead of stopping",
    )


def check_unmatched(
    unmatched: Sequence[Annotation], rejected_uids: set[str], *, allow_missing: bool, rejected: int
) -> None:
    """Fail on annotations for instances/frames that were not given, unless ``allow_missing``.
    Annotations of rejected files (when their header was readable) are always tolerated."""
    missing = [a for a in unmatched if a.sop_instance_uid not in rejected_uids]
    if missing and not allow_missing:
        hint = (
            f" ({rejected} file(s) were rejected; annotations of those with an unreadable header count here)"
            if rejected
            else ""
        )
        raise ConfigError(
            f"{describe_unmatched(missing)}{hint}; give those files, correct the annotations or pass "
            "--allow-missing to leave them out"
        )
    if unmatched:
        log.warning("%d annotation(s) left out: not among the evaluated frames", len(unmatched))


def backend_info(backend: Any) -> dict[str, Any]:
    """What the backend says about itself: ``name`` and, if it has them, ``providers`` and ``threads``."""
    info: dict[str, Any] = {"name": getattr(backend, "name", type(backend).__name__)}
    if getattr(backend, "providers", None) is not None:
        info["providers"] = list(backend.providers)
    if getattr(backend, "threads", None) is not None:
        info["threads"] = int(backend.threads)
    if getattr(backend, "reason", ""):
        info["reason"] = str(backend.reason)
    return info


def check_options(args: argparse.Namespace) -> None:
    """Reject options that cannot be honoured before any work is done."""
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.min_map50 is not None and not 0.0 <= args.min_map50 <= 1.0:
        raise ConfigError(f"--min-map50 must be within 0..1, got {args.min_map50}")
    if args.out is not None and not args.out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: directory {args.out.parent} does not exist")


def check_operating_point_options(args: argparse.Namespace) -> None:
    """Refuse ``--write-operating-point`` without a rule, and a malformed rule, before any inference."""
    from retinaedge.runtime.operating_point import RULE

    rule = getattr(args, "choose_operating_point", None)
    if getattr(args, "write_operating_point", False) and rule is None:
        raise ConfigError("--write-operating-point needs --choose-operating-point RULE")
    if rule is not None and not RULE.match(rule):
        raise ConfigError(f"--choose-operating-point {rule!r}: use max-f1 or sensitivity>=X with 0 < X <= 1")


def run(args: argparse.Namespace) -> int:
    from retinaedge.runtime.backends.base import BackendOptions
    from retinaedge.runtime.backends.registry import backend_extra, check_available
    from retinaedge.runtime.detector import Detector
    from retinaedge.runtime.jsonout import emit

    check_options(args)
    check_operating_point_options(args)
    check_available(args.backend)  # a missing extra is one error line, before any ground truth is read
    gt = load_ground_truth(args.annotations)
    files = dicom_files(args.files, exclude=[args.annotations])
    options = BackendOptions(
        threads=args.threads,
        batch_size=args.batch_size,
        cache_dir=args.engine_cache,
        extra=backend_extra(args),
    )
    with Detector.open(args.model, backend=args.backend, batch_size=args.batch_size, options=options) as det:
        manifest = det.bundle.manifest
        class_names = manifest.class_names
        classes = evaluated_classes(gt, class_names)
        if not (args.allow_missing or args.skip_rejected):
            # A cheap early look at the headers, so a wrong file list fails before any inference. Only
            # when every header is readable: otherwise detection names the unreadable file.
            uids = [peek_uid(f, det.limits) for f in files]
            known = {uid for uid in uids if uid}
            if all(uids):
                check_unmatched(
                    [a for a in gt.annotations if a.sop_instance_uid not in known],
                    set(),
                    allow_missing=False,
                    rejected=0,
                )
        try:
            detected = detect_all(det, files, skip_rejected=args.skip_rejected)
        except InputRejected as exc:
            log.error(
                "input %s rejected (%s): %s [--skip-rejected leaves such files out]",
                exc.path,
                exc.error["type"],
                exc.error["message"],
            )
            emit({"file": str(exc.path), "error": exc.error})
            return 2 if exc.config else 1
        backend = backend_info(det.backend)
    if not detected.frames:
        raise ConfigError(f"none of the {len(files)} input file(s) could be evaluated (all rejected)")
    matched, unmatched = split_unmatched(gt.annotations, detected.frames_per_instance)
    check_unmatched(
        unmatched, detected.rejected_uids, allow_missing=args.allow_missing, rejected=detected.rejected
    )
    evaluation = evaluate(detected.frames, matched, class_names, classes).to_json()
    report: dict[str, Any] = {
        "model": {"name": manifest.name, "sha256": manifest.model_sha256, "path": str(args.model)},
        "backend": backend,
        "images": evaluation.pop("images"),
        "instances": detected.instances,
        **evaluation,
        "rejected_files": detected.rejected,
        "unmatched_annotations": len(unmatched),
    }
    section, chosen = operating_point_report(
        manifest,
        detected.frames,
        matched,
        classes,
        rule=getattr(args, "choose_operating_point", None),
        files=detected.instances,
    )
    report["operating_point"] = section
    if section is not None and chosen is not None and getattr(args, "write_operating_point", False):
        section["written"] = str(write_operating_point(args.model, manifest, chosen))
    status = 0
    map50 = report["map50"]
    log.info(
        "mAP@0.5 %s, mAP@[.5:.95] %s over %d frame(s) of %d file(s)",
        "undefined" if map50 is None else f"{map50:.4f}",
        "undefined" if report["map"] is None else f"{report['map']:.4f}",
        report["images"],
        report["instances"],
    )
    if args.min_map50 is not None:
        passed = map50 is not None and map50 >= args.min_map50
        report["gate"] = {"min_map50": args.min_map50, "passed": passed}
        if not passed:
            status = 1
            measured = "undefined (no class has ground truth)" if map50 is None else f"{map50:.4f}"
            log.error("quality gate failed: mAP@0.5 is %s, required %.4f", measured, args.min_map50)
    if args.out is not None:
        try:
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot write --out {args.out}: {exc.strerror or exc}") from exc
    emit(report)
    return status
