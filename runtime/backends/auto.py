"""Which backend serves: a cached TensorRT engine, a freshly built and validated one, or ONNX Runtime.

The structure is registry + loaders + a pure candidate policy:

- backends by name: :mod:`retinaedge.runtime.backends.registry` (``onnxruntime``, ``tensorrt``,
  ``triton``, each a module or folder of this package);
- the TensorRT plan (device probe, build options, engine cache lookup; nothing loaded or built):
  :mod:`retinaedge.runtime.backends.tensorrt.planning`, which asks the policy
  (:func:`retinaedge.runtime.backends.policy.plan_candidates`, a pure function) for the candidates;
- this module opens the first candidate that works (:func:`choose_backend`) and is the registry's
  ``auto`` (:func:`open_auto`): a verified or freshly built TensorRT engine, else ONNX Runtime, with the
  reason. Any TensorRT/CUDA failure falls back, visibly, never a crash; mode ``tensorrt`` raises instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from retinaedge.runtime.backends.base import Backend, BackendOptions
from retinaedge.runtime.backends.policy import (
    describe_error,
)
from retinaedge.runtime.backends.registry import open_backend
from retinaedge.runtime.backends.tensorrt.planning import BackendPlan, plan_for_cli
from retinaedge.runtime.bundle import Bundle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """The backend to serve with, why, the self-test criteria that apply to it and the plan behind it.

    ``deferred``: the plan was a build, left to a background process while ONNX Runtime serves.
    """

    backend: Backend
    reason: str
    criteria: dict[str, float] | None = None
    plan: BackendPlan | None = None
    deferred: bool = False


def _registry_onnxruntime(bundle: Bundle) -> Callable[[], Backend]:
    return lambda: open_backend("onnxruntime", bundle, BackendOptions())


def choose_backend(
    bundle: Bundle,
    plan: BackendPlan,
    *,
    mode: str,
    open_onnxruntime: Callable[[], Backend] | None = None,
    on_status: Callable[[str], None] = lambda _s: None,
    defer_build: bool = False,
) -> Choice:
    """Open the first of ``plan.candidates`` (from :func:`plan_backend`, same ``mode``) that works.
    Call it on the inference thread.

    ``open_onnxruntime``: how to open ONNX Runtime (default: the registry's ``onnxruntime`` with default
    options). ``defer_build``: when the plan is a build, open ONNX Runtime instead and return
    ``deferred=True``; the caller builds elsewhere (``retinaedge build`` in a child process) and plans again.
    """
    from retinaedge.runtime.backends.tensorrt import open_planned

    open_ort = open_onnxruntime or _registry_onnxruntime(bundle)
    if plan.action == "onnxruntime":
        if plan.decision != "onnxruntime-configured":
            log.warning("serving with ONNX Runtime: %s", plan.reason)
        return Choice(open_ort(), plan.reason, plan=plan)
    if plan.action == "build" and defer_build:
        reason = (
            f"serving with ONNX Runtime while a TensorRT engine is built in the background ({plan.reason})"
        )
        log.info("%s", reason)
        return Choice(open_ort(), reason, plan=plan, deferred=True)
    try:
        runner = open_planned(bundle, plan, on_status)
        return Choice(runner, runner.reason, plan.criteria, plan)
    except Exception as exc:  # auto: any TensorRT/CUDA failure falls back, visibly, never a crash
        if mode == "tensorrt":
            raise
        why = describe_error(exc)
        log.warning("TensorRT not used, serving with ONNX Runtime: %s", why)
        return Choice(open_ort(), f"TensorRT not used: {why}", plan=plan)


def open_auto(bundle: Bundle, options: BackendOptions) -> Backend:
    """``--backend auto`` for the CLI verbs: the service's start-up choice for the engine the service
    would serve with, else ONNX Runtime with ``options``; the reason in ``backend.reason``."""
    plan = plan_for_cli(bundle, options, "auto")
    choice = choose_backend(
        bundle,
        plan,
        mode="auto",
        open_onnxruntime=lambda: open_backend("onnxruntime", bundle, options),
    )
    choice.backend.reason = choice.reason
    choice.backend.self_test_criteria = choice.criteria
    return choice.backend
