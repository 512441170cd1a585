"""INT8 by explicit quantization: ``model.onnx`` -> ``model.int8.qdq.onnx`` with Q/DQ nodes.

Calibration frames come from DICOM files through the runtime's exact preprocessing
(:func:`retinaedge.runtime.detector.iter_model_inputs`), one ``(1, C, H, W)`` batch at a time. The
result is a QDQ-format model (onnxruntime ``quantize_static``, ``QuantFormat.QDQ``) that ONNX Runtime runs
on the CPU in INT8 and TensorRT builds with explicit quantization (the implicit calibrators are deprecated
since TensorRT 10.1). TensorRT wants symmetric INT8 (zero point 0), so activations and weights are
symmetric, weights per output channel; only ``Conv`` is quantized: the backbone, FPN and heads' towers,
while the heads' output convolutions, decoding and NMS stay in float32 exactly as exported. Biases stay
float (TensorRT fuses them).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import QDQ_MODEL_FILE, QUANTIZATION_FILE, load_bundle
from .detector import iter_model_inputs
from .dicomio import DEFAULT_LIMITS, Limits
from .errors import ConfigError, DicomInputError
from .hashing import sha256_file
from .manifest import METADATA_KEY, Manifest

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")


def calibration_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files given, and every file under directories given (sorted; DICOM files need no extension)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"calibration path {p} does not exist")
    return out


def calibration_frames(
    files: Iterable[Path], manifest: Manifest, *, max_frames: int, limits: Limits = DEFAULT_LIMITS
) -> Iterator[np.ndarray]:
    """Up to ``max_frames`` model inputs ``(1, C, H, W)`` float32; files the runtime rejects are skipped."""
    count = skipped = 0
    for path in files:
        try:
            for image in iter_model_inputs(path, manifest, limits):
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
class QuantizeReport:
    """What was written: the Q/DQ model, its sha256, frames used, method, seconds and Q/DQ node count."""

    path: Path
    sha256: str
    frames: int
    method: str
    seconds: float
    qdq_nodes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.path.name,
            "sha256": self.sha256,
            "calibration_frames": self.frames,
            "method": self.method,
            "seconds": round(self.seconds, 1),
            "qdq_nodes": self.qdq_nodes,
        }


def quantize_bundle(
    bundle_dir: str | Path,
    calibration: Iterable[str | Path],
    *,
    max_frames: int = 200,
    method: str = "percentile",
    limits: Limits = DEFAULT_LIMITS,
) -> QuantizeReport:
    """Write ``model.int8.qdq.onnx`` and ``quantization.json`` into the bundle; return the report."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise ConfigError(f"calibration method must be one of {METHODS}, got {method!r}")
    if max_frames < 1:
        raise ConfigError(f"max_frames must be >= 1, got {max_frames}")
    bundle = load_bundle(bundle_dir)
    if bundle.root is None:
        raise ConfigError("quantize needs a bundle directory, not a bare model.onnx")
    files = calibration_files(calibration)
    frames = calibration_frames(files, bundle.manifest, max_frames=max_frames, limits=limits)
    first = next(frames, None)
    if first is None:
        raise ConfigError("no usable calibration frame in the files given")
    reader = _Reader(_prepend(first, frames), bundle.manifest.input.name)
    keep_float = output_convs(bundle.model_path)
    out = bundle.root / QDQ_MODEL_FILE
    started = time.monotonic()
    quantize_static(
        str(bundle.model_path),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method={
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[method],
        nodes_to_exclude=keep_float,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
    )
    seconds = time.monotonic() - started
    model = onnx.load(str(out))
    _embed_manifest(model, bundle.manifest)
    onnx.save(model, str(out))
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    report = QuantizeReport(out, sha256_file(out), reader.count, method, seconds, qdq)
    doc = {
        **report.to_dict(),
        "source_model_sha256": bundle.manifest.model_sha256,
        "op_types": ["Conv"],
        "kept_float": keep_float,
    }
    (bundle.root / QUANTIZATION_FILE).write_text(json.dumps(doc, indent=2))
    log.info("wrote %s: %d Q/DQ nodes from %d calibration frame(s)", out.name, qdq, reader.count)
    return report


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


def _prepend(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _embed_manifest(model: Any, manifest: Manifest) -> None:
    """Carry the bundle manifest (as ``manifest.json`` has it, minus its sha256) into the Q/DQ model."""
    doc = manifest.to_dict()
    doc.pop("model_sha256", None)
    doc["nms"] = manifest.nms
    for prop in list(model.metadata_props):
        if prop.key == METADATA_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(doc)


__all__ = ["QuantizeReport", "calibration_files", "calibration_frames", "quantize_bundle"]
