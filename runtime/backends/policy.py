"""The backend policy as a pure function: what was found out -> an ordered list of candidates with reasons.

:func:`plan_candidates` does no I/O and reads no clock: the caller (:func:`retinaedge.runtime.backends.auto.
plan_backend`) probes the device, validates the build options and looks the engine cache up, and hands
the outcome over as :class:`Facts`. The first candidate is what to try; in mode ``auto`` every TensorRT
candidate is followed by ONNX Runtime, used when loading or building the engine fails.

Decisions (stable labels: ``retinaedge boot``, ``/readyz``, ``boot.json`` and tests use them) are
:data:`DECISIONS`. Mode ``tensorrt`` raises instead of planning ONNX Runtime (the error in ``Facts``,
as it is: the TensorRT backend's errors are part of the runtime's hierarchy); mode ``onnxruntime`` plans nothing else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from retinaedge.runtime.backends.tensorrt.errors import BuildOptionsError, EngineBuildError
from retinaedge.runtime.errors import ConfigError, RetinaEdgeError

BACKEND_MODES = ("auto", "onnxruntime", "tensorrt")

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
    "backend-configured",  # another registry backend (backend=triton): nothing to plan on this device
)

#: Engine cache lookup status -> the build decision it leads to (anything else: ``build-new-model``).
BUILD_DECISIONS = {
    "corrupt": "build-corrupt",
    "foreign-device": "build-fingerprint-changed",
    "version-mismatch": "build-fingerprint-changed",
}

#: What :func:`plan_candidates` falls back to in mode ``auto`` when a TensorRT candidate fails.
FALLBACK_REASON = "if the TensorRT engine cannot be loaded or built: ONNX Runtime (backend=auto)"


@dataclass(frozen=True)
class Candidate:
    """One backend to try: registry ``backend`` name, ``action`` (``open``; for TensorRT ``load`` a
    verified cache entry or ``build`` one), the ``decision`` (:data:`DECISIONS`) and a ``reason`` for
    people."""

    backend: str
    action: str
    decision: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {
            "backend": self.backend,
            "action": self.action,
            "decision": self.decision,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Facts:
    """What the caller found out, in the order it is found (later fields only matter once earlier
    ones are clear).

    ``probe_error``: the device probe failed (TensorRT/pycuda missing, no GPU); ``options_error``: the
    build options were refused for this device or model; ``lookup_status``/``lookup_reason``: the engine
    cache's verdict (:data:`retinaedge.runtime.backends.tensorrt.cache.STATUSES`), ``usable`` for a verified hit;
    ``cache_empty``: no engine manifests at all under ``cache_root``; ``precision``/``nms``: the engine's;
    ``allow_build``: engine_build; ``failed_at`` (Unix seconds) and ``failed_error``: this key's last
    recorded build failure; ``retry_after_s``: how long a failure blocks a new attempt; ``now``: Unix s.
    """

    probe_error: Exception | None = None
    options_error: Exception | None = None
    lookup_status: str = "miss"
    lookup_reason: str = ""
    usable: bool = False
    cache_empty: bool = False
    cache_root: str = ""
    precision: str = "fp32"
    nms: str = "builtin"
    allow_build: bool = True
    failed_at: float | None = None
    failed_error: str = ""
    retry_after_s: float = 86400.0
    now: float = 0.0


def describe_error(exc: BaseException) -> str:
    """An error for a reason string: our own errors by their message, anything else with its type."""
    return str(exc) if isinstance(exc, RetinaEdgeError) else f"{type(exc).__name__}: {exc}"


def plan_candidates(mode: str, facts: Facts) -> list[Candidate]:
    """The ordered candidates for ``mode`` given ``facts`` (pure: same inputs, same answer).

    Raises :class:`ConfigError` for an unknown mode, and in mode ``tensorrt`` the reason TensorRT cannot
    be used (instead of planning ONNX Runtime).
    """
    if mode not in BACKEND_MODES:
        raise ConfigError(f"backend must be one of {BACKEND_MODES}, got {mode!r}")
    if mode == "onnxruntime":
        return [
            Candidate("onnxruntime", "open", "onnxruntime-configured", "backend=onnxruntime in the settings")
        ]
    if facts.probe_error is not None:
        return _not_tensorrt(mode, "onnxruntime-no-tensorrt", facts.probe_error)
    if facts.options_error is not None:
        return _not_tensorrt(mode, "onnxruntime-options-refused", facts.options_error)
    if facts.usable:
        return _tensorrt(
            mode, "load", "cache-hit", f"{facts.lookup_reason} ({facts.precision}, {facts.nms} NMS)"
        )
    decision = BUILD_DECISIONS.get(facts.lookup_status, "build-new-model")
    reason = facts.lookup_reason
    if decision == "build-new-model" and facts.cache_empty:
        decision = "build-first"
        reason = f"the engine cache {facts.cache_root} is empty (first start on this device)"
    if not facts.allow_build:
        why = f"{reason}; building at start-up is disabled (engine_build=false): run `retinaedge build`"
        return _not_tensorrt(mode, "onnxruntime-build-disabled", BuildOptionsError(why))
    if facts.failed_at is not None and facts.now - facts.failed_at < facts.retry_after_s:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(facts.failed_at))
        why = (
            f"{reason}; building this engine failed at {when} ({facts.failed_error[-300:]}); not retried "
            f"before engine_build_retry_s={facts.retry_after_s:g} s have passed (`retinaedge build` retries now)"
        )
        return _not_tensorrt(mode, "onnxruntime-build-failed-earlier", EngineBuildError(why))
    return _tensorrt(mode, "build", decision, reason)


def _tensorrt(mode: str, action: str, decision: str, reason: str) -> list[Candidate]:
    first = Candidate("tensorrt", action, decision, reason)
    if mode == "tensorrt":
        return [first]
    return [first, Candidate("onnxruntime", "open", decision, FALLBACK_REASON)]


def _not_tensorrt(mode: str, decision: str, exc: Exception) -> list[Candidate]:
    """ONNX Runtime with the reason (mode auto), or the error raised (mode tensorrt)."""
    if mode == "tensorrt":
        raise exc
    return [Candidate("onnxruntime", "open", decision, f"TensorRT not used: {describe_error(exc)}")]
