"""The ``tensorrt`` backend: a TensorRT engine built on this device, run through pycuda.

The registry finds this folder by its name (:mod:`retinaedge.runtime.backends.registry`) and calls the
factory here, :func:`open` (and :func:`check`, which finds tensorrt and pycuda without importing them).
Nothing here imports tensorrt or pycuda at import time. The folder, one module per job:

- :mod:`.backend`: :class:`~.backend.TensorRTBackend`, a deserialised engine as a
  :class:`~retinaedge.runtime.backends.base.Backend` (create, use and close it on ONE thread);
- :mod:`.cuda`: everything that touches pycuda; :mod:`.build`: ONNX -> engine;
- :mod:`.options`: build options and their validation against device and model;
- :mod:`.fingerprint`: the device fingerprint (GPU, TensorRT/CUDA/L4T versions; the machine's facts come
  from :mod:`retinaedge.device`); :mod:`.cache`: the engine cache keyed by model, options and fingerprint;
- :mod:`.loaders`: plan, find, load, build, validate and store an engine;
- :mod:`.settings`: the engine settings (``RETINAEDGE_ENGINE_*``) the service's settings extend;
- :mod:`.background`: a build in a child process while ONNX Runtime serves; :mod:`.build_cli`: the
  ``retinaedge build`` verb; :mod:`.errors`: this backend's errors (part of the runtime's hierarchy).

:func:`open` plans (probe, options, cache: :func:`retinaedge.runtime.backends.tensorrt.planning.plan_backend` in mode
``tensorrt``, so every reason not to use TensorRT is raised) and acts: load a verified cached engine, or
build, validate and store one. :func:`open_planned` acts on a plan made earlier (the service's start-up
choice, :func:`retinaedge.runtime.backends.auto.choose_backend`, words its reasons from the errors).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from retinaedge.runtime.backends.base import Backend, BackendOptions
from retinaedge.runtime.backends.tensorrt.errors import EngineBuildError
from retinaedge.runtime.bundle import Bundle

if TYPE_CHECKING:
    from retinaedge.runtime.backends.tensorrt.backend import TensorRTBackend
    from retinaedge.runtime.backends.tensorrt.planning import BackendPlan

log = logging.getLogger(__name__)


def check() -> None:
    """Raise :class:`~retinaedge.runtime.backends.tensorrt.errors.MissingExtraError` (a
    MissingDependencyError naming ``retinaedge[trt]``) unless tensorrt and pycuda can be found (found,
    not imported)."""
    from retinaedge.runtime.backends.tensorrt.fingerprint import require_trt_extra

    require_trt_extra()


def open(bundle: Bundle, options: BackendOptions) -> Backend:  # noqa: A001 (registry factory)
    """The registry factory: the engine for ``bundle`` on this device, from the cache or built now.

    Which engine: :func:`.settings.engine_settings` (the one the service serves with). ``options.extra`` may also
    hold ``plan`` (a :class:`~retinaedge.runtime.backends.tensorrt.planning.BackendPlan` made earlier: acted on as is),
    ``probe`` (the device probe) and ``on_status`` (progress callback). Raises the reason TensorRT cannot
    be used (missing extra: a :class:`~retinaedge.runtime.errors.MissingDependencyError` naming
    ``retinaedge[trt]``).
    """
    from retinaedge.runtime.backends.tensorrt.planning import plan_for_cli

    extra = options.extra
    on_status: Callable[[str], None] = extra.get("on_status") or (lambda _s: None)
    plan = extra.get("plan")
    if plan is None:
        if extra.get("probe") is None:
            check()  # before the settings: a missing extra is the first thing to say
        plan = plan_for_cli(bundle, options, "tensorrt")
    return open_planned(bundle, plan, on_status)


def open_planned(bundle: Bundle, plan: BackendPlan, on_status: Callable[[str], None]) -> TensorRTBackend:
    """Load the cached engine (``load``) or build, validate and store one (``build``); the runner's
    ``reason`` says which and why. A failed build is recorded in the cache (no retry on every start)."""
    from retinaedge.runtime.backends.policy import describe_error
    from retinaedge.runtime.backends.tensorrt.loaders import (
        build_validate_store,
        load_cached_engine,
        timing_cache_path,
    )

    assert plan.options is not None and plan.engine is not None and plan.lookup is not None
    assert plan.cache is not None and plan.fingerprint is not None
    found, options, cache = plan.lookup, plan.options, plan.cache
    log.info("engine cache %s: %s (%s)", cache.root, found.status, found.reason)
    if plan.action == "load" and found.entry is not None:
        runner = load_cached_engine(bundle, found, plan.criteria)
        runner.reason = plan.reason
        return runner
    on_status(f"building a TensorRT engine ({plan.reason})")
    if options.timing_cache is None:
        options = replace(options, timing_cache=timing_cache_path(cache.root, plan.fingerprint))
    try:
        runner, manifest = build_validate_store(bundle, options, plan.engine, plan.fingerprint, cache)
    except Exception as exc:
        why = describe_error(exc)
        cache.record_failure(found.key, why)
        raise EngineBuildError(f"{plan.reason}; building a new engine failed: {why}") from exc
    runner.reason = (
        f"engine built and validated at start-up ({plan.reason}); stored as {manifest['key'][:12]}"
    )
    runner.self_test_criteria = plan.criteria
    return runner
