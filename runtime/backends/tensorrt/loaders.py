"""TensorRT *loaders*: find, build, validate and store an engine; the runner that executes it is elsewhere.

Polygraphy separates loaders (produce an engine) from runners (execute one); so does this module. Each
loader is pure Python up to the point where TensorRT is really needed:

- :func:`plan_engine`: which ONNX file to build for the NMS flavour and precision, the build options
  validated against device and model (raises :class:`BuildOptionsError`; never rewritten);
- :func:`find_engine`: the engine cache lookup (manifest, fingerprint, TensorRT version and sha256 checked
  before any deserialisation);
- :func:`load_cached_engine`: a verified cache entry deserialised into a runner and self-tested;
- :func:`build_validate_store`: build, golden self-test plus detection-aware comparison with ONNX Runtime
  (:func:`validate_engine`), then store in the cache.

The runner is :class:`~retinaedge.runtime.backends.tensorrt.backend.TensorRTBackend`. TensorRT itself is
imported only by a build or load.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.runtime.backends.base import Backend
from retinaedge.runtime.backends.tensorrt.backend import TensorRTBackend
from retinaedge.runtime.backends.tensorrt.cache import EngineCache, Lookup
from retinaedge.runtime.backends.tensorrt.errors import BuildOptionsError, EngineLoadError, TensorRTError
from retinaedge.runtime.backends.tensorrt.fingerprint import DeviceCapabilities, DeviceFingerprint
from retinaedge.runtime.backends.tensorrt.options import BuildOptions, ModelFacts, inspect_onnx
from retinaedge.runtime.bundle import (
    PARITY_FILE,
    PLUGIN_MODEL_FILE,
    QDQ_MODEL_FILE,
    Bundle,
    load_golden,
    self_test,
)
from retinaedge.runtime.detections import split_outputs
from retinaedge.runtime.errors import ConfigError, SelfTestError
from retinaedge.runtime.hashing import sha256_file
from retinaedge.runtime.matching import MatchReport, match_images
from retinaedge.runtime.quantization_record import check_recorded_accuracy

log = logging.getLogger(__name__)

#: Detection-aware acceptance of an engine per precision: against the golden (PyTorch) detections and
#: against ONNX Runtime on the same input. fp32 uses the bundle's own golden criteria.
PRECISION_CRITERIA: dict[str, dict[str, float]] = {
    "fp32": {"iou_min": 0.99, "score_tol": 1e-3, "min_match_rate": 0.99},
    "fp16": {"iou_min": 0.90, "score_tol": 2e-2, "min_match_rate": 0.90},
    "int8": {"iou_min": 0.80, "score_tol": 5e-2, "min_match_rate": 0.80},
}

#: Below the emulated EfficientNMS_TRT parity export measured, by this much (match rate, 0..1).
PLUGIN_MARGIN = 0.02


@dataclass(frozen=True)
class EnginePlan:
    """The ONNX file to build, its sha256, the NMS flavour and what the graph offers."""

    onnx_path: Path
    onnx_sha256: str
    nms: str
    facts: ModelFacts


def plan_engine(
    bundle: Bundle, options: BuildOptions, fingerprint: DeviceFingerprint, caps: DeviceCapabilities
) -> EnginePlan:
    """Pick the ONNX file and validate ``options`` against device and model (raises BuildOptionsError)."""
    options.validate()
    root = bundle.model_path.parent
    plugin = root / PLUGIN_MODEL_FILE
    nms = options.resolve_nms(caps, ModelFacts(False, False, has_plugin_variant=plugin.is_file()))
    if options.precision == "int8":
        if nms == "plugin":
            raise BuildOptionsError(
                "precision int8 with the EfficientNMS_TRT flavour is not produced by retinaedge quantize; "
                "pass --nms builtin (TensorRT >= 10.12) or build fp16"
            )
        path = root / QDQ_MODEL_FILE
        if not path.is_file():
            raise BuildOptionsError(
                f"precision int8 needs {QDQ_MODEL_FILE} in the bundle (explicit quantization); "
                "make it with `retinaedge quantize --model DIR --calibration DICOM_DIR`"
            )
    else:
        path = plugin if nms == "plugin" else bundle.model_path
    facts = inspect_onnx(path, plugin_variant=plugin.is_file())
    options.validate_against(fingerprint, caps, facts)
    if options.precision == "int8":
        try:  # a Q/DQ model whose recorded AP50 drop exceeded the quantize limit is never built
            check_recorded_accuracy(root)
        except ConfigError as exc:
            raise BuildOptionsError(str(exc)) from exc
    return EnginePlan(path, sha256_file(path), nms, facts)


def compare_backends(
    candidate: Backend, reference: Backend, images: np.ndarray, criteria: dict[str, float]
) -> list[MatchReport]:
    """Detection-aware comparison of ``candidate`` against ``reference`` on ``images`` ``(N, C, H, W)``.

    Raises :class:`SelfTestError` when any image's match rate is below ``criteria["min_match_rate"]``.
    """
    ref = split_outputs(reference.infer(images))
    got = split_outputs(candidate.infer(images))
    reports, worst = match_images(ref, got, criteria)
    if worst < criteria["min_match_rate"]:
        raise SelfTestError(
            f"{candidate.name} reproduces {worst:.2%} of {reference.name}'s detections on the golden input "
            f"(need {criteria['min_match_rate']:.2%})"
        )
    return reports


def acceptance_criteria(bundle: Bundle, plan: EnginePlan, precision: str) -> dict[str, float]:
    """:data:`PRECISION_CRITERIA` for ``precision``; for the EfficientNMS_TRT flavour, whose semantics
    differ from torchvision's (global top-4096, no dw/dh clamp), the match rate export measured for it
    by emulation (``parity.json``) less :data:`PLUGIN_MARGIN` when that is lower: stated, not silent."""
    criteria = dict(PRECISION_CRITERIA[precision])
    if plan.nms != "plugin" or bundle.root is None:
        return criteria
    try:
        parity = json.loads((bundle.root / PARITY_FILE).read_text())
        measured = float(parity["efficientnms_trt"]["emulated_parity"]["totals"]["match_rate"])
    except (OSError, ValueError, KeyError, TypeError):
        log.warning(
            "no emulated EfficientNMS_TRT parity in %s; plugin engines are held to %s", PARITY_FILE, criteria
        )
        return criteria
    criteria["min_match_rate"] = min(criteria["min_match_rate"], max(0.0, measured - PLUGIN_MARGIN))
    return criteria


def validate_engine(backend: Backend, bundle: Bundle, plan: EnginePlan, precision: str) -> dict[str, Any]:
    """Golden self-test and comparison with ONNX Runtime (on the same ONNX file when ORT can run it)."""
    from retinaedge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    criteria = acceptance_criteria(bundle, plan, precision)
    golden = self_test(backend, bundle, criteria=criteria)
    reference_model = plan.onnx_path if plan.nms == "builtin" else bundle.model_path
    images, _, _ = load_golden(bundle)
    with OnnxRuntimeBackend(reference_model) as ort:
        versus = compare_backends(backend, ort, images, criteria)
    return {
        "criteria": criteria,
        "golden": [r.match_rate for r in golden],
        "versus_onnxruntime": [r.match_rate for r in versus],
        "reference_model": reference_model.name,
    }


def timing_cache_path(cache_root: Path, fingerprint: DeviceFingerprint) -> Path:
    """One timing cache per device fingerprint (timing data is device- and version-specific)."""
    tag = hashlib.sha256(repr(sorted(fingerprint.to_dict().items())).encode()).hexdigest()[:16]
    return cache_root / f"timing-{tag}.cache"


def find_engine(
    cache: EngineCache, plan: EnginePlan, options: BuildOptions, fingerprint: DeviceFingerprint
) -> Lookup:
    """The cache entry for ``plan``'s ONNX file, ``options`` and ``fingerprint`` (pure Python, no TensorRT)."""
    return cache.lookup(plan.onnx_sha256, options, fingerprint)


def load_cached_engine(bundle: Bundle, found: Lookup, criteria: dict[str, float] | None) -> TensorRTBackend:
    """Deserialise a verified entry and self-test it (every load: a cached engine that now fails is not
    used). Raises :class:`EngineLoadError` with the lookup's reason and what went wrong."""
    if found.entry is None:
        raise EngineLoadError(f"{found.reason}: no engine to load")
    try:
        runner = TensorRTBackend(found.entry.read_engine())
    except TensorRTError as exc:
        raise EngineLoadError(f"{found.reason}, but it cannot be loaded: {exc}") from exc
    try:
        self_test(runner, bundle, criteria=criteria)
    except BaseException as exc:
        runner.close()
        raise EngineLoadError(f"{found.reason}, but it fails the golden self-test: {exc}") from exc
    runner.self_test_criteria = criteria
    return runner


def build_validate_store(
    bundle: Bundle,
    options: BuildOptions,
    plan: EnginePlan,
    fingerprint: DeviceFingerprint,
    cache: EngineCache,
) -> tuple[TensorRTBackend, dict[str, Any]]:
    """Build an engine, validate it (the runner stays open) and store it; ``(runner, manifest)``."""
    from retinaedge.runtime.backends.tensorrt.build import build_engine

    engine, report = build_engine(
        plan.onnx_path,
        options,
        nms=plan.nms,
        strongly_typed=plan.facts.has_fp16,
    )
    runner = TensorRTBackend(engine)
    try:
        validation = validate_engine(runner, bundle, plan, options.precision)
    except BaseException:
        runner.close()
        raise
    entry = cache.store(
        engine,
        plan.onnx_sha256,
        options,
        fingerprint,
        extra={"build": report.to_dict(), "validation": validation, "model": bundle.manifest.name},
    )
    runner.self_test_criteria = validation["criteria"]
    return runner, entry.manifest
