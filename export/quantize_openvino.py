"""INT8 for OpenVINO on the CPU: NNCF post-training quantization of ``model.onnx`` ->
``model.int8.openvino.xml`` + ``.bin`` (OpenVINO IR) and ``quantization.openvino.json`` in the bundle.

The TensorRT Q/DQ model (:mod:`.quantize`) is placed for TensorRT; this one is made for the CPU plugin:
NNCF inserts FakeQuantize where OpenVINO runs INT8 kernels (VNNI, AMX-INT8). Calibration frames are the
user's DICOM through the runtime's exact preprocessing, as ``retinaedge quantize`` does
(:func:`.quantize.calibration_frames`). Activation ranges: min-max (``MINMAX``; NNCF's default
mean-of-min/max ranges lost confident findings on the demo model). The post-processing subgraph (the
ONNX nodes named ``post/...``: decoding, top-k, NMS; OpenVINO keeps their names) is ignored, so boxes and
scores are decoded in float as exported. The bundle's golden frames are calibration frames too (unless
``golden=False``): the gate compares them, and the demo's synthetic golden image lies outside the
phantoms' ranges (calibrated on the phantoms alone, its confident finding fell from 0.68 to 0.35).

Nothing is served from here: the ``openvino`` backend runs the model only after its precision gate has
passed on the device (docs/openvino.md). nncf and openvino are imported when quantizing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from retinaedge.export.quantize import calibration_frames, spread
from retinaedge.runtime.bundle import OV_INT8_MODEL_FILE, OV_QUANTIZATION_FILE, load_bundle, load_golden
from retinaedge.runtime.dicomio import DEFAULT_LIMITS, Limits
from retinaedge.runtime.discovery import dicom_files
from retinaedge.runtime.errors import ConfigError, MissingDependencyError
from retinaedge.runtime.hashing import sha256_file

log = logging.getLogger(__name__)

#: The post-processing subgraph (export/postgraph.py names its nodes ``post/...``): kept float.
IGNORED_PATTERNS = ("post/.*",)
RANGES = ("minmax", "default")


def quantize_openvino(
    bundle_dir: str | Path,
    calibration: Iterable[str | Path],
    *,
    max_frames: int = 200,
    ranges: str = "minmax",
    golden: bool = True,
    limits: Limits = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """Write the NNCF INT8 IR and its record into the bundle; return the record.

    ``ranges``: ``minmax`` (activation ranges = min/max over the calibration frames) or ``default``
    (NNCF's own estimator, kept for comparison); ``golden``: add the bundle's golden frames."""
    try:
        import nncf
        import openvino as ov
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(exc.name or "nncf", "openvino", "quantize --target openvino") from exc
    if ranges not in RANGES:
        raise ConfigError(f"activation ranges must be one of {RANGES}, got {ranges!r}")
    if max_frames < 1:
        raise ConfigError(f"max_frames must be >= 1, got {max_frames}")
    bundle = load_bundle(bundle_dir)
    if bundle.root is None:
        raise ConfigError("quantize needs a bundle directory, not a bare model.onnx")
    files = spread(dicom_files(calibration), max_frames)
    frames = list(calibration_frames(files, bundle.manifest, max_frames=max_frames, limits=limits))
    if not frames:
        raise ConfigError("no usable calibration frame in the files given")
    dicom_frames = len(frames)
    if golden:
        images, _expected, _criteria = load_golden(bundle)
        frames += [images[i : i + 1] for i in range(images.shape[0])]
    started = time.monotonic()
    model = ov.Core().read_model(str(bundle.model_path))
    advanced = nncf.AdvancedQuantizationParameters()
    if ranges == "minmax":
        advanced = nncf.AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX
        )
    quantized = nncf.quantize(
        model,
        nncf.Dataset(frames),
        preset=nncf.QuantizationPreset.PERFORMANCE,
        target_device=nncf.TargetDevice.CPU,
        subset_size=len(frames),
        ignored_scope=nncf.IgnoredScope(patterns=list(IGNORED_PATTERNS)),
        advanced_parameters=advanced,
    )
    out = bundle.root / OV_INT8_MODEL_FILE
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    record = {
        "model": out.name,
        "sha256": sha256_file(out),
        "bin_sha256": sha256_file(out.with_suffix(".bin")),
        "source_model_sha256": bundle.manifest.model_sha256,
        "tool": f"nncf {nncf.__version__}, openvino {ov.get_version()}",
        "calibration_frames": len(frames),
        "calibration_dicom_frames": dicom_frames,
        "calibration_golden_frames": len(frames) - dicom_frames,
        "activation_ranges": ranges,
        "ignored_patterns": list(IGNORED_PATTERNS),
        "fake_quantize_nodes": fake_quantize,
        "seconds": round(time.monotonic() - started, 1),
    }
    (bundle.root / OV_QUANTIZATION_FILE).write_text(json.dumps(record, indent=2))
    log.info(
        "wrote %s: %d FakeQuantize nodes from %d calibration frame(s)", out.name, fake_quantize, len(frames)
    )
    return record
