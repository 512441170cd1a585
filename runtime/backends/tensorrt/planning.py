"""Planning a TensorRT engine for a bundle on this device, without loading or building anything.

:func:`plan_backend` gathers the facts (device probe, build options, engine cache lookup; pure Python)
and asks the policy (:func:`retinaedge.runtime.backends.policy.plan_candidates`, a pure function) for the
candidates; :func:`retinaedge.runtime.backends.auto.choose_backend` opens the first that works.
``retinaedge build``, ``retinaedge boot``, the service's start-up and the CLI verbs' ``--backend
tensorrt|auto`` (:func:`plan_for_cli`) plan with the same function.

Order (mode ``auto``), each step pure Python until a usable engine is found:

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

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaedge.runtime.backends.base import BackendOptions
from retinaedge.runtime.backends.policy import (
    BACKEND_MODES,
    Candidate,
    Facts,
    plan_candidates,
)
from retinaedge.runtime.backends.registry import names
from retinaedge.runtime.backends.tensorrt.cache import EngineCache, Lookup
from retinaedge.runtime.backends.tensorrt.errors import TensorRTError
from retinaedge.runtime.backends.tensorrt.fingerprint import DeviceCapabilities, DeviceFingerprint
from retinaedge.runtime.backends.tensorrt.loaders import (
    EnginePlan,
    acceptance_criteria,
    find_engine,
    plan_engine,
)
from retinaedge.runtime.backends.tensorrt.options import BuildOptions
from retinaedge.runtime.bundle import Bundle

log = logging.getLogger(__name__)

Probe = Callable[[], tuple[DeviceFingerprint, DeviceCapabilities]]


def default_probe() -> tuple[DeviceFingerprint, DeviceCapabilities]:
    """The real device: :func:`retinaedge.runtime.backends.tensorrt.fingerprint.probe` (imports TensorRT and pycuda)."""
    from retinaedge.runtime.backends.tensorrt.fingerprint import probe

    return probe()


@dataclass(frozen=True)
class BackendPlan:
    """What :func:`choose_backend` will do, decided without loading or building anything.

    ``candidates``: the policy's ordered list (:class:`~retinaedge.runtime.backends.policy.Candidate`). ``action`` (``onnxruntime``,
    ``load`` a verified cache entry or ``build``), ``decision`` (one of :data:`DECISIONS`) and ``reason``
    (for people) are the first candidate's. The other fields are set once the device was probed and the
    options accepted.
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
    candidates: tuple[Candidate, ...] = ()

    @classmethod
    def of(cls, candidates: list[Candidate], **fields: Any) -> BackendPlan:
        first = candidates[0]
        action = first.action if first.backend == "tensorrt" else "onnxruntime"
        return cls(action, first.decision, first.reason, candidates=tuple(candidates), **fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "decision": self.decision,
            "reason": self.reason,
            "key": self.lookup.key if self.lookup else None,
            "fingerprint": self.fingerprint.to_dict() if self.fingerprint else None,
            "options": self.options.to_dict() if self.options else None,
            "candidates": [c.to_dict() for c in self.candidates],
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
    """Gather the facts (see the module docstring) and ask :func:`~retinaedge.runtime.backends.policy.plan_candidates`.

    Probes the device and reads the engine cache; loads and builds nothing. In mode ``tensorrt`` every
    reason not to use TensorRT is raised instead of planned.
    A build whose last attempt failed less than ``retry_after_s`` seconds before ``now`` (Unix s) is not
    planned again: a crash-looping container must not rebuild (minutes of a Jetson's time) every start.
    """
    if mode not in BACKEND_MODES and mode in names():  # another registry backend (triton): no engine here
        return BackendPlan(
            "open", "backend-configured", f"backend={mode}: no TensorRT engine is planned here"
        )
    if mode not in BACKEND_MODES or mode == "onnxruntime":
        return BackendPlan.of(plan_candidates(mode, Facts()))
    try:
        fingerprint, caps = probe()
    except Exception as exc:  # anything the probe raises means: no usable TensorRT here
        return BackendPlan.of(plan_candidates(mode, Facts(probe_error=exc)))
    try:
        engine = plan_engine(bundle, options, fingerprint, caps)
        cache = EngineCache(cache_root, cache_max_bytes)
    except TensorRTError as exc:
        return BackendPlan.of(plan_candidates(mode, Facts(options_error=exc)), fingerprint=fingerprint)
    found = find_engine(cache, engine, options, fingerprint)
    common: dict[str, Any] = {
        "options": options,
        "engine": engine,
        "lookup": found,
        "fingerprint": fingerprint,
        "cache": cache,
        "criteria": acceptance_criteria(bundle, engine, options.precision),
    }
    failed = None if found.usable or not allow_build else cache.failure(found.key)
    facts = Facts(
        lookup_status=found.status,
        lookup_reason=found.reason,
        usable=found.usable,
        cache_empty=not any(cache.root.glob("*.json")),
        cache_root=str(cache.root),
        precision=options.precision,
        nms=engine.nms,
        allow_build=allow_build,
        failed_at=float(failed["failed_at"]) if failed is not None else None,
        failed_error=str(failed["error"]) if failed is not None else "",
        retry_after_s=retry_after_s,
        now=time.time() if now is None else now,
    )
    return BackendPlan.of(plan_candidates(mode, facts), **common)


def plan_for_cli(bundle: Bundle, options: BackendOptions, mode: str) -> BackendPlan:
    """:func:`plan_backend` for a CLI verb: the engine settings the service would use
    (:func:`retinaedge.runtime.backends.tensorrt.settings.engine_settings`), the probe from ``options.extra`` or the real one."""
    from retinaedge.runtime.backends.tensorrt.settings import engine_settings

    engine = engine_settings(bundle, options)
    return plan_backend(
        bundle,
        mode=mode,
        options=engine.build_options,
        cache_root=engine.cache_root,
        cache_max_bytes=engine.cache_max_bytes,
        allow_build=engine.allow_build,
        probe=options.extra.get("probe") or default_probe,
        retry_after_s=engine.retry_after_s,
    )
