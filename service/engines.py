"""Which backend serves: a cached TensorRT engine, a freshly built and validated one, or ONNX Runtime.

This is where ``device`` (fingerprint, build options, engine cache, TensorRT) meets ``runtime`` (bundle,
golden self-test, detection-aware matching, ONNX Runtime), so it lives in the service, the one layer
allowed to import both (docs/architecture.md, import direction). ``retinaedge build`` uses the same functions.

:func:`plan_backend` decides (pure Python: probe, options, cache) and :func:`choose_backend` acts. Order
(mode ``auto``), each step pure Python until a usable engine is found:

1. probe the device (TensorRT/pycuda missing or no GPU -> ONNX Runtime, reason given);
2. pick the ONNX file for the NMS flavour and precision, validate the build options against device and
   model (an impossible option -> ONNX Runtime with the refusal as the reason; never rewritten);
3. look the engine up in the cache: manifest, fingerprint, TensorRT version and engine sha256 are checked
   before any TensorRT deserialisation (corrupt / foreign-device / version-mismatch -> reason);
4. a hit is deserialised; a miss is built when ``engine_build`` allows it and its last build did not
   fail recently (a failed build is recorded in the cache), then must pass the golden self-test and a
   detection-aware comparison with ONNX Runtime before it is stored and used; the build can also be
   deferred to a child process while ONNX Runtime serves (``engine_build_while=onnxruntime``);
5. anything else -> ONNX Runtime, with every reason collected on the way.

Mode ``tensorrt`` raises instead of falling back; mode ``onnxruntime`` never touches TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.device.buildopts import BuildOptions, ModelFacts, inspect_onnx
from retinaedge.device.enginecache import EngineCache, Lookup
from retinaedge.device.errors import (
    BuildOptionsError,
    DeviceError,
    EngineBuildError,
    EngineLoadError,
    MissingExtraError,
)
from retinaedge.device.fingerprint import DeviceCapabilities, DeviceFingerprint
from retinaedge.runtime.bundle import (
    PARITY_FILE,
    PLUGIN_MODEL_FILE,
    QDQ_MODEL_FILE,
    Bundle,
    load_golden,
    self_test,
)
from retinaedge.runtime.detections import split_outputs
from retinaedge.runtime.errors import (
    ConfigError,
    MissingDependencyError,
    RetinaEdgeError,
    SelfTestError,
)
from retinaedge.runtime.hashing import sha256_file
from retinaedge.runtime.matching import MatchReport, match_images
from retinaedge.runtime.quantization_record import check_recorded_accuracy

log = logging.getLogger(__name__)

BACKEND_MODES = ("auto", "onnxruntime", "tensorrt")

#: Detection-aware acceptance of an engine per precision: against the golden (PyTorch) detections and
#: against ONNX Runtime on the same input. fp32 uses the bundle's own golden criteria.
PRECISION_CRITERIA: dict[str, dict[str, float]] = {
    "fp32": {"iou_min": 0.99, "score_tol": 1e-3, "min_match_rate": 0.99},
    "fp16": {"iou_min": 0.90, "score_tol": 2e-2, "min_match_rate": 0.90},
    "int8": {"iou_min": 0.80, "score_tol": 5e-2, "min_match_rate": 0.80},
}

Probe = Callable[[], tuple[DeviceFingerprint, DeviceCapabilities]]


def default_probe() -> tuple[DeviceFingerprint, DeviceCapabilities]:
    """The real device: :func:`retinaedge.device.fingerprint.probe` (imports TensorRT and pycuda)."""
    from retinaedge.device.fingerprint import probe

    return probe()


def to_runtime_error(exc: DeviceError) -> RetinaEdgeError:
    """Map a device-layer error onto the runtime's hierarchy (CLI exit codes, HTTP statuses)."""
    if isinstance(exc, MissingExtraError):
        err: RetinaEdgeError = MissingDependencyError(exc.what.lower(), "trt", "TensorRT engines")
        err.args = (str(exc),)  # "TensorRT is not installed (pip install '.[trt]', ...)"
        return err
    if isinstance(exc, BuildOptionsError):
        return ConfigError(str(exc))
    return RetinaEdgeError(f"{type(exc).__name__}: {exc}")


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
    candidate: Any, reference: Any, images: np.ndarray, criteria: dict[str, float]
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


PLUGIN_MARGIN = 0.02


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


def validate_engine(backend: Any, bundle: Bundle, plan: EnginePlan, precision: str) -> dict[str, Any]:
    """Golden self-test and comparison with ONNX Runtime (on the same ONNX file when ORT can run it)."""
    from retinaedge.runtime.onnxrt import OnnxRuntimeBackend

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


def build_validate_store(
    bundle: Bundle,
    options: BuildOptions,
    plan: EnginePlan,
    fingerprint: DeviceFingerprint,
    cache: EngineCache,
) -> tuple[Any, dict[str, Any]]:
    """Build an engine, validate it (the backend stays open) and store it; ``(backend, manifest)``."""
    from retinaedge.device.trt_backend import TensorRTBackend
    from retinaedge.device.trt_build import build_engine

    engine, report = build_engine(
        plan.onnx_path,
        options,
        nms=plan.nms,
        strongly_typed=plan.facts.has_fp16,
    )
    backend = TensorRTBackend(engine)
    try:
        validation = validate_engine(backend, bundle, plan, options.precision)
    except BaseException:
        backend.close()
        raise
    entry = cache.store(
        engine,
        plan.onnx_sha256,
        options,
        fingerprint,
        extra={"build": report.to_dict(), "validation": validation, "model": bundle.manifest.name},
    )
    return backend, entry.manifest


def timing_cache_path(cache_root: Path, fingerprint: DeviceFingerprint) -> Path:
    """One timing cache per device fingerprint (timing data is device- and version-specific)."""
    tag = hashlib.sha256(repr(sorted(fingerprint.to_dict().items())).encode()).hexdigest()[:16]
    return cache_root / f"timing-{tag}.cache"


#: The start-up decisions (stable labels: logs, the entrypoint's boot record and tests use them).
DECISIONS = (
    "onnxruntime-configured",  # backend=onnxruntime
    "onnxruntime-no-tensorrt",  # TensorRT/pycuda missing, no GPU, probe failed
    "onnxruntime-options-refused",  # build options this device or model cannot honour
    "onnxruntime-build-disabled",  # no usable engine and engine_build=false
    "onnxruntime-build-failed-earlier",  # this engine's last build failed less than the retry time ago
    "cache-hit",  # a verified engine for this model, options and device
    "build-first",  # the engine cache is empty: first start on this device
    "build-new-model",  # engines exist, none for this model and options (a model update)
    "build-fingerprint-changed",  # an engine for this model was built on another device or TensorRT
    "build-corrupt",  # the entry for this key is damaged
)

_BUILD_DECISIONS = {
    "corrupt": "build-corrupt",
    "foreign-device": "build-fingerprint-changed",
    "version-mismatch": "build-fingerprint-changed",
}


@dataclass(frozen=True)
class BackendPlan:
    """What :func:`choose_backend` will do, decided without loading or building anything.

    ``action`` is ``onnxruntime``, ``load`` (a verified cache entry) or ``build``; ``decision`` one of
    :data:`DECISIONS`; ``reason`` says why, for people. The other fields are set once the device was
    probed and the options accepted.
    """

    action: str
    decision: str
    reason: str
    options: BuildOptions | None = None
    engine: EnginePlan | None = None
    lookup: Lookup | None = None
    fingerprint: DeviceFingerprint | None = None
    cache: EngineCache | None = None
    criteria: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "decision": self.decision,
            "reason": self.reason,
            "key": self.lookup.key if self.lookup else None,
            "fingerprint": self.fingerprint.to_dict() if self.fingerprint else None,
            "options": self.options.to_dict() if self.options else None,
        }


def plan_backend(
    bundle: Bundle,
    *,
    mode: str,
    options: BuildOptions,
    cache_root: Path,
    cache_max_bytes: int | None,
    allow_build: bool,
    probe: Probe = default_probe,
    retry_after_s: float = 86400.0,
    now: float | None = None,
) -> BackendPlan:
    """Decide between ONNX Runtime, a cached engine and a build (see the module docstring).

    Probes the device and reads the engine cache; loads and builds nothing. In mode ``tensorrt`` every
    reason not to use TensorRT is raised (mapped by :func:`to_runtime_error`) instead of planned.
    A build whose last attempt failed less than ``retry_after_s`` seconds before ``now`` is not planned
    again: a crash-looping container must not rebuild (minutes of a Jetson's time) on every start.
    """
    if mode not in BACKEND_MODES:
        raise ConfigError(f"backend must be one of {BACKEND_MODES}, got {mode!r}")
    if mode == "onnxruntime":
        return BackendPlan("onnxruntime", "onnxruntime-configured", "backend=onnxruntime in the settings")
    try:
        fingerprint, caps = probe()
    except Exception as exc:  # anything the probe raises means: no usable TensorRT here
        return _not_tensorrt(mode, "onnxruntime-no-tensorrt", exc)
    try:
        engine = plan_engine(bundle, options, fingerprint, caps)
        cache = EngineCache(cache_root, cache_max_bytes)
    except DeviceError as exc:
        return _not_tensorrt(mode, "onnxruntime-options-refused", exc, fingerprint=fingerprint)
    found = cache.lookup(engine.onnx_sha256, options, fingerprint)
    common: dict[str, Any] = {
        "options": options,
        "engine": engine,
        "lookup": found,
        "fingerprint": fingerprint,
        "cache": cache,
        "criteria": acceptance_criteria(bundle, engine, options.precision),
    }
    if found.usable:
        reason = f"{found.reason} ({options.precision}, {engine.nms} NMS)"
        return BackendPlan("load", "cache-hit", reason, **common)
    decision = _BUILD_DECISIONS.get(found.status, "build-new-model")
    reason = found.reason
    if decision == "build-new-model" and not any(cache.root.glob("*.json")):
        decision, reason = (
            "build-first",
            f"the engine cache {cache.root} is empty (first start on this device)",
        )
    if not allow_build:
        why = f"{reason}; building at start-up is disabled (engine_build=false): run `retinaedge build`"
        return _not_tensorrt(mode, "onnxruntime-build-disabled", BuildOptionsError(why), **common)
    failed = cache.failure(found.key)
    clock = time.time() if now is None else now
    if failed is not None and clock - float(failed["failed_at"]) < retry_after_s:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(failed["failed_at"])))
        why = (
            f"{reason}; building this engine failed at {when} ({str(failed['error'])[-300:]}); not retried "
            f"before engine_build_retry_s={retry_after_s:g} s have passed (`retinaedge build` retries now)"
        )
        return _not_tensorrt(mode, "onnxruntime-build-failed-earlier", EngineBuildError(why), **common)
    return BackendPlan("build", decision, reason, **common)


def describe_error(exc: BaseException) -> str:
    """An error for a reason string: our own errors by their message, anything else with its type."""
    return str(exc) if isinstance(exc, (DeviceError, RetinaEdgeError)) else f"{type(exc).__name__}: {exc}"


def _not_tensorrt(mode: str, decision: str, exc: Exception, **fields: Any) -> BackendPlan:
    """ONNX Runtime with the reason (mode auto), or the error raised (mode tensorrt)."""
    if mode == "tensorrt":
        if isinstance(exc, DeviceError):
            raise to_runtime_error(exc) from exc
        raise exc
    why = describe_error(exc)
    return BackendPlan("onnxruntime", decision, f"TensorRT not used: {why}", **fields)


@dataclass(frozen=True)
class Choice:
    """The backend to serve with, why, the self-test criteria that apply to it and the plan behind it.

    ``deferred``: the plan was a build, left to a background process while ONNX Runtime serves.
    """

    backend: Any
    reason: str
    criteria: dict[str, float] | None = None
    plan: BackendPlan | None = None
    deferred: bool = False


def choose_backend(
    bundle: Bundle,
    plan: BackendPlan,
    *,
    mode: str,
    open_onnxruntime: Callable[[], Any],
    on_status: Callable[[str], None] = lambda _s: None,
    defer_build: bool = False,
) -> Choice:
    """Open the backend ``plan`` (from :func:`plan_backend`, same ``mode``) decided on. Call it on the
    inference thread.

    ``defer_build``: when the plan is a build, open ONNX Runtime instead and return ``deferred=True``;
    the caller builds elsewhere (``retinaedge build`` in a child process) and plans again.
    """
    if plan.action == "onnxruntime":
        if plan.decision != "onnxruntime-configured":
            log.warning("serving with ONNX Runtime: %s", plan.reason)
        return Choice(open_onnxruntime(), plan.reason, plan=plan)
    if plan.action == "build" and defer_build:
        reason = (
            f"serving with ONNX Runtime while a TensorRT engine is built in the background ({plan.reason})"
        )
        log.info("%s", reason)
        return Choice(open_onnxruntime(), reason, plan=plan, deferred=True)
    try:
        backend, reason = _open_tensorrt(bundle, plan, on_status)
        return Choice(backend, reason, plan.criteria, plan)
    except Exception as exc:  # auto: any TensorRT/CUDA failure falls back, visibly, never a crash
        why = describe_error(exc)
        if mode == "tensorrt":
            if isinstance(exc, DeviceError):
                raise to_runtime_error(exc) from exc
            raise
        log.warning("TensorRT not used, serving with ONNX Runtime: %s", why)
        return Choice(open_onnxruntime(), f"TensorRT not used: {why}", plan=plan)


def _open_tensorrt(bundle: Bundle, plan: BackendPlan, on_status: Callable[[str], None]) -> tuple[Any, str]:
    """Load the cached engine (``load``) or build, validate and store one (``build``)."""
    assert plan.options is not None and plan.engine is not None and plan.lookup is not None
    assert plan.cache is not None and plan.fingerprint is not None
    found, options, cache = plan.lookup, plan.options, plan.cache
    log.info("engine cache %s: %s (%s)", cache.root, found.status, found.reason)
    if plan.action == "load" and found.entry is not None:
        from retinaedge.device.trt_backend import TensorRTBackend

        try:
            backend = TensorRTBackend(found.entry.read_engine())
        except DeviceError as exc:
            raise EngineLoadError(f"{found.reason}, but it cannot be loaded: {exc}") from exc
        try:  # every load, not only after the build: a cached engine that now fails is not used
            self_test(backend, bundle, criteria=plan.criteria)
        except BaseException as exc:
            backend.close()
            raise EngineLoadError(f"{found.reason}, but it fails the golden self-test: {exc}") from exc
        return backend, plan.reason
    on_status(f"building a TensorRT engine ({plan.reason})")
    if options.timing_cache is None:
        from dataclasses import replace

        options = replace(options, timing_cache=timing_cache_path(cache.root, plan.fingerprint))
    try:
        backend, manifest = build_validate_store(bundle, options, plan.engine, plan.fingerprint, cache)
    except Exception as exc:
        why = describe_error(exc)
        cache.record_failure(found.key, why)
        raise EngineBuildError(f"{plan.reason}; building a new engine failed: {why}") from exc
    return (
        backend,
        f"engine built and validated at start-up ({plan.reason}); stored as {manifest['key'][:12]}",
    )
