"""INT8 by explicit quantization: ``model.onnx`` -> ``model.int8.qdq.onnx`` with Q/DQ nodes.

Calibration frames come from DICOM files through the runtime's exact preprocessing
(:func:`retinaedge.runtime.frames.model_inputs`), one ``(1, C, H, W)`` batch at a time. The
result is a QDQ-format model (onnxruntime ``quantize_static``, ``QuantFormat.QDQ``) that ONNX Runtime runs
on the CPU in INT8 and TensorRT builds with explicit quantization (the implicit calibrators are deprecated
since TensorRT 10.1). TensorRT wants symmetric INT8 (zero point 0), so activations and weights are
symmetric, weights per output channel; by default only ``Conv`` is quantized: the backbone, FPN and heads'
towers, while the heads' output convolutions, decoding and NMS stay in float32 exactly as exported. Biases
stay float (TensorRT fuses them). ``keep_float`` patterns keep more layers float, ``op_types`` quantizes
more operator types, ``preprocess`` runs ONNX Runtime's quantization pre-processing first.

With ``accuracy`` (annotated DICOM files and a limit), the FP32 and the Q/DQ model are both evaluated
(:mod:`retinaedge.runtime.evaluate`, COCO AP50) and the result is recorded in ``quantization.json``; a Q/DQ model whose mean
AP50 drops by more than the limit is marked ``accepted: false`` there, which ``retinaedge build --precision
int8`` and the service refuse (:func:`retinaedge.runtime.quantization_record.check_recorded_accuracy`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.export.assemble import embed_manifest
from retinaedge.runtime.bundle import QDQ_MODEL_FILE, QUANTIZATION_FILE, load_bundle
from retinaedge.runtime.dicomio import DEFAULT_LIMITS, Limits
from retinaedge.runtime.discovery import dicom_files
from retinaedge.runtime.errors import ConfigError, DicomInputError
from retinaedge.runtime.frames import model_inputs
from retinaedge.runtime.hashing import sha256_file
from retinaedge.runtime.manifest import Manifest

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
#: Operator types ``op_types`` may name: those onnxruntime's QDQ quantizer handles and ONNX Runtime's CPU
#: provider and TensorRT both run as INT8 (Conv; Add/Mul as QLinearAdd/QLinearMul; pooling, resize and
#: concatenation as pass-through Q/DQ).
OP_TYPES = ("Conv", "Add", "Mul", "Relu", "Concat", "Resize", "MaxPool", "GlobalAveragePool", "ReduceMean")


def spread(files: Sequence[Path], max_frames: int) -> list[Path]:
    """At most ``max_frames`` of ``files``, evenly spaced in their order (all of them when fewer), so a
    capped calibration set covers every study of a sorted directory tree instead of the first few."""
    if len(files) <= max_frames:
        return list(files)
    step = len(files) / max_frames
    return [files[int(i * step)] for i in range(max_frames)]


def calibration_frames(
    files: Iterable[Path], manifest: Manifest, *, max_frames: int, limits: Limits = DEFAULT_LIMITS
) -> Iterator[np.ndarray]:
    """Up to ``max_frames`` model inputs ``(1, C, H, W)`` float32; files the runtime rejects are skipped."""
    count = skipped = 0
    for path in files:
        try:
            for _, image, _ in model_inputs(path, manifest.preprocessing, manifest.input, limits):
                yield image[None]
                count += 1
                if count >= max_frames:
                    return
        except DicomInputError as exc:
            skipped += 1
            log.info("calibration: a file was skipped (%s)", exc.type)
    if skipped:
        log.info("calibration: %d file(s) skipped", skipped)


class _Reader:
    """An onnxruntime ``CalibrationDataReader``: ``get_next() -> {"images": (1, C, H, W)} | None``."""

    def __init__(self, frames: Iterator[np.ndarray], input_name: str) -> None:
        self._frames = frames
        self._name = input_name
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        frame = next(self._frames, None)
        if frame is None:
            return None
        self.count += 1
        return {self._name: frame}

    def rewind(self) -> None:  # part of the reader interface; one pass is all quantize_static needs
        return None


@dataclass(frozen=True)
class AccuracyCheck:
    """Evaluate FP32 and Q/DQ on annotated DICOM files; the Q/DQ model is accepted when the mean AP50
    drops by at most ``max_ap50_drop`` (absolute, 0..1)."""

    annotations: Path
    files: tuple[Path, ...]
    max_ap50_drop: float = 0.02
    threads: int | None = None

    def validate(self) -> None:
        if not 0.0 <= self.max_ap50_drop <= 1.0:
            raise ConfigError(f"max AP50 drop must be within 0..1, got {self.max_ap50_drop}")
        if not self.annotations.is_file():
            raise ConfigError(f"annotations {self.annotations} do not exist")
        if not self.files:
            raise ConfigError("the accuracy check needs annotated DICOM files")


@dataclass(frozen=True)
class QuantizeReport:
    """What was written: the Q/DQ model, its sha256, frames used, method, seconds and Q/DQ node count;
    with an accuracy check, its figures and whether the model was accepted."""

    path: Path
    sha256: str
    frames: int
    method: str
    seconds: float
    qdq_nodes: int
    accuracy: dict[str, Any] | None = field(default=None)

    @property
    def accepted(self) -> bool | None:
        """``None`` when no accuracy check ran."""
        return None if self.accuracy is None else bool(self.accuracy["passed"])

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "model": self.path.name,
            "sha256": self.sha256,
            "calibration_frames": self.frames,
            "method": self.method,
            "seconds": round(self.seconds, 1),
            "qdq_nodes": self.qdq_nodes,
        }
        if self.accuracy is not None:
            doc["accuracy"] = self.accuracy
            doc["accepted"] = self.accepted
        return doc


def quantize_bundle(
    bundle_dir: str | Path,
    calibration: Iterable[str | Path],
    *,
    max_frames: int = 200,
    method: str = "minmax",
    keep_float: Sequence[str] = (),
    op_types: Sequence[str] = ("Conv",),
    preprocess: bool = False,
    conv_outputs: bool = False,
    accuracy: AccuracyCheck | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> QuantizeReport:
    """Write ``model.int8.qdq.onnx`` and ``quantization.json`` into the bundle; return the report.

    ``keep_float``: fnmatch patterns; a node stays float when one matches its name or the name of one of
    its initializers (PyTorch parameter names, e.g. ``backbone.body.0.*`` or ``*.fc?.weight``), in
    addition to the heads' output convolutions. ``op_types``: operator types to quantize (``OP_TYPES``).
    ``preprocess``: ONNX Runtime's ``quant_pre_process`` (shape inference, graph optimisation) first.
    Calibration frames are spread evenly over the files (:func:`spread`).

    Placement: by default Q/DQ sit on the inputs of the quantized operators only (weights and
    activations), TensorRT's recommended placement: it fuses Conv with the activation that follows and the
    next layer's quantization, so each tensor is quantized once. ``conv_outputs`` also quantizes every
    Conv's output (before its ReLU/HardSwish): the ``DQ -> Conv -> Q`` pattern ONNX Runtime's CPU provider
    fuses into ``QLinearConv`` (integer arithmetic on the CPU); most tensors are then quantized twice,
    which costs accuracy (measured in models/demo/MODEL_CARD.md)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise ConfigError(f"calibration method must be one of {METHODS}, got {method!r}")
    if max_frames < 1:
        raise ConfigError(f"max_frames must be >= 1, got {max_frames}")
    unknown = sorted(set(op_types) - set(OP_TYPES))
    if unknown or "Conv" not in op_types:
        raise ConfigError(f"op types must include Conv and be among {OP_TYPES}; got {list(op_types)}")
    if accuracy is not None:
        accuracy.validate()
    bundle = load_bundle(bundle_dir)
    if bundle.root is None:
        raise ConfigError("quantize needs a bundle directory, not a bare model.onnx")
    files = spread(dicom_files(calibration), max_frames)  # no spread selection lands on notes or DICOMDIR
    frames = calibration_frames(files, bundle.manifest, max_frames=max_frames, limits=limits)
    first = next(frames, None)
    if first is None:
        raise ConfigError("no usable calibration frame in the files given")
    reader = _Reader(_prepend(first, frames), bundle.manifest.input.name)
    out = bundle.root / QDQ_MODEL_FILE
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="retinaedge-quantize-") as tmp:
        source = bundle.model_path
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            source = Path(tmp) / "preprocessed.onnx"
            quant_pre_process(str(bundle.model_path), str(source), skip_symbolic_shape=True)
        kept = output_convs(source) + matching_nodes(source, keep_float)
        kept = list(dict.fromkeys(kept))
        quantize_static(
            str(source),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[method],
            nodes_to_exclude=kept,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                "OpTypesToExcludeOutputQuantization": [] if conv_outputs else ["Conv"],
            },
        )
    seconds = time.monotonic() - started
    model = onnx.load(str(out))
    embed_manifest(model, bundle.manifest, producer_name=None)  # the bundle's manifest, as model.onnx has it
    onnx.save(model, str(out))
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    checked = None if accuracy is None else check_accuracy(bundle.root, out, accuracy, limits)
    report = QuantizeReport(out, sha256_file(out), reader.count, method, seconds, qdq, checked)
    doc = {
        **report.to_dict(),
        "source_model_sha256": bundle.manifest.model_sha256,
        "op_types": list(op_types),
        "keep_float": list(keep_float),
        "kept_float": kept,
        "preprocess": preprocess,
        "conv_outputs": conv_outputs,
    }
    (bundle.root / QUANTIZATION_FILE).write_text(json.dumps(doc, indent=2))
    log.info("wrote %s: %d Q/DQ nodes from %d calibration frame(s)", out.name, qdq, reader.count)
    if checked is not None and not checked["passed"]:
        m = checked["map50"]
        log.error(
            "%s is NOT accepted: mean AP50 %s -> %s, a drop of %s, above the limit %s",
            out.name, m["fp32"], m["int8"], m["drop"], checked["max_ap50_drop"],
        )  # fmt: skip
    return report


def evaluate_model(
    model: Path, annotations: Path, files: Sequence[Path], *, threads: int | None, limits: Limits
) -> dict[str, Any]:
    """``retinaedge eval``'s figures (COCO AP per class, ``map50``) of ``model`` on annotated files."""
    from retinaedge.runtime.detector import Detector
    from retinaedge.runtime.eval_runs import detect_all
    from retinaedge.runtime.evaluate import evaluate, evaluated_classes, load_ground_truth, split_unmatched

    gt = load_ground_truth(annotations)
    paths = dicom_files(files, exclude=[annotations])
    with Detector.open(model, threads=threads, limits=limits) as det:
        names = det.bundle.manifest.class_names
        detected = detect_all(det, paths, skip_rejected=False)
    matched, unmatched = split_unmatched(gt.annotations, detected.frames_per_instance)
    if unmatched:  # annotations of other files: the check covers the files given
        log.warning("accuracy check: %d annotation(s) of files not given are left out", len(unmatched))
    doc = dict(evaluate(detected.frames, matched, names, evaluated_classes(gt, names)).to_json())
    doc["unmatched_annotations"] = len(unmatched)
    return doc


def check_accuracy(root: Path, qdq: Path, check: AccuracyCheck, limits: Limits) -> dict[str, Any]:
    """FP32 (the bundle) against the Q/DQ model on ``check.files``: AP50 per class, means, drop, verdict."""
    fp32 = evaluate_model(root, check.annotations, check.files, threads=check.threads, limits=limits)
    int8 = evaluate_model(qdq, check.annotations, check.files, threads=check.threads, limits=limits)
    a, b = fp32["map50"], int8["map50"]
    drop = None if a is None or b is None else round(a - b, 4)
    return {
        "frames": fp32["images"],
        "annotations": str(check.annotations),
        "unmatched_annotations": fp32["unmatched_annotations"],
        "map50": {"fp32": a, "int8": b, "drop": drop},
        "ap50_per_class": {
            name: {"fp32": fp32["classes"][name]["ap50"], "int8": int8["classes"][name]["ap50"]}
            for name in fp32["classes"]
        },
        "max_ap50_drop": check.max_ap50_drop,
        "passed": drop is not None and drop <= check.max_ap50_drop,
    }


#: torchvision RetinaNet's last convolutions of each head (their weights' initializer names).
FLOAT_HEAD_LAYERS = ("cls_logits.weight", "bbox_reg.weight")


def output_convs(model_path: Path) -> list[str]:
    """Names of the heads' output convolutions, kept in float: they produce the logits and box deltas
    whose small differences move scores across the 0.05 threshold and boxes across NMS decisions."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1].endswith(FLOAT_HEAD_LAYERS)
    ]


def matching_nodes(model_path: Path, patterns: Sequence[str]) -> list[str]:
    """Names of the nodes ``patterns`` select (by node name or initializer input name); a pattern that
    selects nothing is an error (a typo would otherwise silently quantize the layer)."""
    import onnx

    if not patterns:
        return []
    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    out: list[str] = []
    for pattern in patterns:
        hits = [
            n.name
            for n in model.graph.node
            if fnmatch.fnmatchcase(n.name, pattern)
            or any(i in initializers and fnmatch.fnmatchcase(i, pattern) for i in n.input)
        ]
        if not hits:
            raise ConfigError(f"keep-float pattern {pattern!r} matches no node or initializer of the model")
        out += hits
    return out


def _prepend(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


__all__ = [
    "AccuracyCheck",
    "QuantizeReport",
    "calibration_frames",
    "quantize_bundle",
    "spread",
]
