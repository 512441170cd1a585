"""Which model file runs each precision: ``model.onnx`` for fp32 and bf16; for int8 the bundle's NNCF
model (``model.int8.openvino.xml`` + ``.bin``, ``retinaedge quantize --target openvino``) or its Q/DQ
model (``model.int8.qdq.onnx``, ``retinaedge quantize``), each only if its record vouches for it.

``int8_model``: ``auto`` (the NNCF model if there is one, else the Q/DQ model), ``nncf`` or ``qdq``.
"""

from __future__ import annotations

import json
from pathlib import Path

from retinaedge.runtime.bundle import OV_INT8_MODEL_FILE, OV_QUANTIZATION_FILE, QDQ_MODEL_FILE, Bundle
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.hashing import sha256_file

INT8_MODELS = ("auto", "nncf", "qdq")


def check_nncf_record(root: Path, bundle_sha256: str | None) -> None:
    """Refuse (:class:`ConfigError`) an NNCF model its record does not vouch for: no record, files whose
    sha256 is not the recorded one, another source model, or a failed accuracy check."""
    record_path = root / OV_QUANTIZATION_FILE
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{OV_INT8_MODEL_FILE} has no readable {OV_QUANTIZATION_FILE}: {exc}") from exc
    xml = root / OV_INT8_MODEL_FILE
    if record.get("sha256") != sha256_file(xml) or record.get("bin_sha256") != sha256_file(
        xml.with_suffix(".bin")
    ):
        raise ConfigError(f"{xml.name} is not the model {OV_QUANTIZATION_FILE} describes (sha256 differs)")
    if record.get("source_model_sha256") != bundle_sha256:
        raise ConfigError(f"{xml.name} was quantized from another model.onnx; quantize again")
    accuracy = record.get("accuracy")
    if accuracy is not None and not accuracy.get("passed"):
        raise ConfigError(f"{xml.name} failed its accuracy check at quantization ({accuracy.get('map50')})")


def int8_model(bundle: Bundle, choice: str = "auto") -> tuple[Path | None, str | None]:
    """``(path, None)`` of the INT8 model to run, or ``(None, why there is none)``."""
    from retinaedge.runtime.quantization_record import check_recorded_accuracy

    if choice not in INT8_MODELS:
        raise ConfigError(f"int8_model must be one of {INT8_MODELS}, got {choice!r}")
    root = bundle.root
    if root is None:
        return None, "a bare model.onnx has no INT8 model (open the bundle directory)"
    nncf, qdq = root / OV_INT8_MODEL_FILE, root / QDQ_MODEL_FILE
    problems = []
    if choice in ("auto", "nncf"):
        if nncf.is_file():
            try:
                check_nncf_record(root, bundle.manifest.model_sha256)
                return nncf, None
            except ConfigError as exc:
                problems.append(str(exc))
        else:
            problems.append(f"no {OV_INT8_MODEL_FILE} (retinaedge quantize --target openvino)")
    if choice in ("auto", "qdq"):
        if qdq.is_file():
            try:
                check_recorded_accuracy(root)
                return qdq, None
            except ConfigError as exc:
                problems.append(str(exc))
        else:
            problems.append(f"no {QDQ_MODEL_FILE} (retinaedge quantize)")
    return None, "the bundle has no usable INT8 model: " + "; ".join(problems)
