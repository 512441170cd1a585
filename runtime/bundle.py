"""Model bundles: a directory with ``model.onnx``, ``manifest.json``, ``parity.json`` and a golden input.

A bare ``model.onnx`` is also accepted: its manifest is read from the ONNX ``metadata_props``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from retinaedge.runtime.detections import ImageDetections, split_outputs
from retinaedge.runtime.errors import BundleError, SelfTestError
from retinaedge.runtime.hashing import sha256_file
from retinaedge.runtime.manifest import METADATA_KEY, Manifest
from retinaedge.runtime.signing import TrustedKey, trusted_keys_from_environment, verify_bundle

if TYPE_CHECKING:
    from retinaedge.runtime.backends.base import Backend
from retinaedge.runtime.matching import MatchReport, match_images

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
PARITY_FILE = "parity.json"
GOLDEN_INPUT_FILE = "golden.npz"
GOLDEN_FILE = "golden.json"
PLUGIN_MODEL_FILE = "model.efficientnms_trt.onnx"
QDQ_MODEL_FILE = "model.int8.qdq.onnx"
QUANTIZATION_FILE = "quantization.json"
#: OpenVINO INT8 by NNCF post-training quantization (`retinaedge quantize --target openvino`).
OV_INT8_MODEL_FILE = "model.int8.openvino.xml"
OV_QUANTIZATION_FILE = "quantization.openvino.json"
#: ``load_bundle``'s default for ``trusted``: the keys ``RETINAEDGE_TRUSTED_KEYS`` names, if any.
FROM_ENVIRONMENT = object()


@dataclass(frozen=True)
class Bundle:
    """A verified model: where ``model.onnx`` is, its manifest, and the bundle directory (if any)."""

    model_path: Path
    manifest: Manifest
    root: Path | None

    @property
    def golden_input_path(self) -> Path | None:
        return self.root / GOLDEN_INPUT_FILE if self.root else None

    @property
    def golden_path(self) -> Path | None:
        return self.root / GOLDEN_FILE if self.root else None


def read_embedded_manifest(model_path: str | Path) -> Manifest:
    """The manifest stored in ``model.onnx``'s ``metadata_props`` (``model_sha256`` filled in)."""
    import onnx

    path = Path(model_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise BundleError(f"{path.name} is not a readable ONNX model: {exc}") from exc
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise BundleError(f"{path.name} carries no retinaedge manifest (metadata key {METADATA_KEY!r})")
    return Manifest.from_json(props[METADATA_KEY]).with_model_sha256(sha256_file(path))


def load_bundle(
    path: str | Path, *, verify: bool = True, trusted: Sequence[TrustedKey] | None | object = FROM_ENVIRONMENT
) -> Bundle:
    """Open a bundle directory or a bare ``model.onnx``; with ``verify``, check the model's sha256.

    ``trusted``: the public keys a bundle must be signed by (:mod:`.signing`; a
    :class:`~.signing.SignatureError` otherwise, before anything of it is used); None: signatures are not
    checked; by default the keys ``RETINAEDGE_TRUSTED_KEYS`` names, when it is set."""
    p = Path(path)
    keys = trusted_keys_from_environment() if trusted is FROM_ENVIRONMENT else trusted
    assert keys is None or isinstance(keys, Sequence)
    if keys:
        verify_bundle(p if p.is_dir() else None, keys, str(p))
    if p.is_file():
        if p.suffix != ".onnx":
            raise BundleError(f"{p} is neither a bundle directory nor an .onnx file")
        return Bundle(model_path=p, manifest=read_embedded_manifest(p), root=None)
    if not p.is_dir():
        raise BundleError(f"model bundle {p} does not exist")
    model_path = p / MODEL_FILE
    manifest_path = p / MANIFEST_FILE
    for needed in (model_path, manifest_path):
        if not needed.is_file():
            raise BundleError(f"bundle {p} has no {needed.name}")
    manifest = Manifest.from_json(manifest_path.read_text())
    if verify:
        actual = sha256_file(model_path)
        if manifest.model_sha256 != actual:
            raise BundleError(
                f"{model_path} sha256 {actual[:12]}... does not match the manifest's "
                f"{str(manifest.model_sha256)[:12]}... (file replaced or corrupted)"
            )
    return Bundle(model_path=model_path, manifest=manifest, root=p)


def write_golden(root: Path, images_u8: np.ndarray, detections: list[ImageDetections], source: str) -> None:
    """Store the golden input (uint8, model input = u8/255) and the reference detections for it."""
    np.savez_compressed(root / GOLDEN_INPUT_FILE, images=images_u8)
    doc = {
        "input": GOLDEN_INPUT_FILE,
        "input_scale": "float32(u8) / 255",
        "reference": source,
        "criteria": {"iou_min": 0.99, "score_tol": 1e-3, "min_match_rate": 0.99},
        "detections": [d.to_json() for d in detections],
    }
    (root / GOLDEN_FILE).write_text(json.dumps(doc))


def load_golden(bundle: Bundle) -> tuple[np.ndarray, list[ImageDetections], dict[str, float]]:
    """``(images float32 (N, C, H, W), expected detections per image, criteria)``."""
    if bundle.golden_input_path is None or bundle.golden_path is None:
        raise BundleError("a bare model.onnx has no golden input; open the bundle directory")
    if not bundle.golden_input_path.is_file() or not bundle.golden_path.is_file():
        raise BundleError(f"bundle {bundle.root} has no golden input ({GOLDEN_INPUT_FILE}, {GOLDEN_FILE})")
    with np.load(bundle.golden_input_path) as data:
        images_u8 = data["images"]
    doc = json.loads(bundle.golden_path.read_text())
    images = (images_u8.astype(np.float32) / np.float32(255.0)).astype(np.float32)
    expected = [ImageDetections.from_json(d) for d in doc["detections"]]
    return images, expected, dict(doc["criteria"])


def self_test(
    backend: Backend, bundle: Bundle, *, criteria: dict[str, float] | None = None
) -> list[MatchReport]:
    """Run the golden input through ``backend`` and match against the recorded PyTorch detections.

    ``criteria`` (``iou_min``, ``score_tol``, ``min_match_rate``) replaces the bundle's own, for backends
    that compute in reduced precision (a TensorRT FP16/INT8 engine). Raises :class:`SelfTestError` when any
    image's match rate is below the criterion.
    """
    images, expected, recorded = load_golden(bundle)
    criteria = {**recorded, **(criteria or {})}
    outputs = backend.infer(images)
    got = split_outputs(outputs)
    reports, worst = match_images(expected, got, criteria)
    if worst < criteria["min_match_rate"]:
        raise SelfTestError(
            f"golden self-test failed: {worst:.2%} of the recorded detections reproduced "
            f"(need {criteria['min_match_rate']:.2%})"
        )
    log.info("golden self-test passed: %s", [f"{r.matched}/{r.reference}" for r in reports])
    return reports
