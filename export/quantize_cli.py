"""``retinaedge quantize --model DIR --calibration PATH...``: write the bundle's Q/DQ INT8 model.

Calibration frames are DICOM files (or directories of them) passed through the runtime's exact
preprocessing. The result, ``model.int8.qdq.onnx`` beside ``model.onnx`` with ``quantization.json``,
runs in ONNX Runtime on the CPU and is what ``retinaedge build --precision int8`` builds. Prints one
JSON object (the report).

With ``--annotations GT.json --eval DICOM...`` the FP32 and the Q/DQ model are both evaluated (COCO AP50,
as ``retinaedge eval``) and the figures recorded in ``quantization.json``; when the mean AP50 drops by more
than ``--max-ap50-drop`` the model is recorded as not accepted (``retinaedge build --precision int8`` and
the service refuse it) and the exit status is 1. Evaluate on annotated files that were not used for
calibration.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retinaedge.export.quantize import METHODS, OP_TYPES
from retinaedge.runtime.discovery import RULE_HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model bundle directory (written into)")
    p.add_argument("--calibration", type=Path, nargs="+", required=True, help=f"DICOM files; {RULE_HELP}")
    p.add_argument(
        "--max-frames",
        type=int,
        default=200,
        help="calibration frames at most, spread evenly over the files (default 200)",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="minmax",
        help="activation range calibration (default minmax: on the demo model percentile clipping cost "
        "AP50 and took four times as long)",
    )
    p.add_argument(
        "--keep-float",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep nodes float whose name or initializer (PyTorch parameter) name matches this fnmatch "
        "pattern, e.g. 'backbone.body.0.*' (repeatable; the heads' output convolutions always stay float)",
    )
    p.add_argument(
        "--op-types",
        default="Conv",
        metavar="TYPES",
        help=f"comma-separated operator types to quantize, among {','.join(OP_TYPES)} (default Conv)",
    )
    p.add_argument(
        "--preprocess",
        action="store_true",
        help="run ONNX Runtime's quant_pre_process (shape inference, graph optimisation) first",
    )
    p.add_argument(
        "--quantize-conv-outputs",
        action="store_true",
        help="also quantize Conv outputs, so ONNX Runtime's CPU provider fuses QLinearConv (default: Q/DQ "
        "on operator inputs only, TensorRT's placement; see the model card for what each costs)",
    )
    p.add_argument("--annotations", type=Path, help="ground truth of --eval files: check the AP50 drop")
    p.add_argument(
        "--eval", type=Path, nargs="+", default=[], metavar="DICOM", help="annotated DICOM files/dirs"
    )
    p.add_argument(
        "--max-ap50-drop",
        type=float,
        default=0.02,
        metavar="X",
        help="largest accepted drop of the mean AP50, FP32 minus INT8, 0..1 (default 0.02)",
    )
    p.add_argument("--threads", type=int, help="ONNX Runtime threads of the accuracy check")
    p.add_argument(
        "--target",
        choices=("tensorrt", "openvino"),
        default="tensorrt",
        help="tensorrt (default): the Q/DQ model model.int8.qdq.onnx; openvino: NNCF post-training INT8 for "
        "OpenVINO's CPU plugin, model.int8.openvino.xml (needs the 'openvino' extra; served only after "
        "the openvino backend's precision gate passes on the device)",
    )
    p.add_argument(
        "--ranges",
        choices=("minmax", "default"),
        default="minmax",
        help="--target openvino: activation ranges, minmax (default) or NNCF's default estimator",
    )
    p.add_argument(
        "--no-golden-calibration",
        action="store_true",
        help="--target openvino: do not add the bundle's golden frames to the calibration frames",
    )


def run(args: argparse.Namespace) -> int:
    from retinaedge.export.quantize import AccuracyCheck, quantize_bundle
    from retinaedge.runtime.errors import ConfigError
    from retinaedge.runtime.jsonout import emit

    if args.target == "openvino":
        return _run_openvino(args)
    if bool(args.annotations) != bool(args.eval):
        raise ConfigError("--annotations and --eval go together (the accuracy check)")
    accuracy = (
        AccuracyCheck(args.annotations, tuple(args.eval), args.max_ap50_drop, args.threads)
        if args.annotations
        else None
    )
    report = quantize_bundle(
        args.model,
        args.calibration,
        max_frames=args.max_frames,
        method=args.method,
        keep_float=args.keep_float,
        op_types=[t.strip() for t in args.op_types.split(",") if t.strip()],
        preprocess=args.preprocess,
        conv_outputs=args.quantize_conv_outputs,
        accuracy=accuracy,
    )
    emit(report.to_dict())
    return 1 if report.accepted is False else 0


def _run_openvino(args: argparse.Namespace) -> int:
    """``--target openvino``: NNCF INT8 IR into the bundle (:mod:`retinaedge.export.quantize_openvino`).
    Its accuracy is checked where it runs: the openvino backend's gate (``--annotations``/``--eval`` here
    are refused, say them to the backend: ``openvino_gate_annotations``/``openvino_gate_eval``)."""
    from retinaedge.export.quantize_openvino import quantize_openvino
    from retinaedge.runtime.errors import ConfigError
    from retinaedge.runtime.jsonout import emit

    if args.annotations or args.eval:
        raise ConfigError(
            "--target openvino is checked by the openvino backend's precision gate on the device: pass the "
            "annotated DICOM there (settings openvino_gate_annotations, openvino_gate_eval)"
        )
    emit(
        quantize_openvino(
            args.model,
            args.calibration,
            max_frames=args.max_frames,
            ranges=args.ranges,
            golden=not args.no_golden_calibration,
        )
    )
    return 0
