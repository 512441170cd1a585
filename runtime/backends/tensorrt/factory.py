"""The ``tensorrt`` backend of the registry: the TensorRT runner and its factory ``open(bundle, options)``.

Registered by dotted name in :data:`retinaedge.runtime.backends.registry.BACKENDS`. It sits in the
service layer because opening an engine needs both ``device`` (engine cache, builder, the pycuda runner)
and ``runtime`` (bundle, golden self-test); the runtime never imports it, it only names it. Nothing here
imports tensorrt or pycuda at import time: the runner does when it is created.

:class:`TensorRTRunner` is the device's :class:`~retinaedge.runtime.backends.tensorrt.backend.TensorRTBackend` (which
cannot import the runtime) as a runtime :class:`~retinaedge.runtime.backends.base.Backend`: ``infer``
takes float32 ``(N, C, H, W)`` and returns the contract outputs, batches above the engine's profile
maximum in slices. Create, use and close it on ONE thread (the CUDA context is current there).

:func:`open` plans (probe, options, cache: :func:`retinaedge.runtime.backends.auto.plan_backend` in mode
``tensorrt``, so every reason not to use TensorRT is raised) and acts: load a verified cached engine, or
build, validate and store one (:mod:`.trt_loaders`); device errors are mapped onto the runtime's.
:func:`open_planned` acts on a plan made earlier and raises the device's errors as they are (the
service's start-up choice, :func:`retinaedge.runtime.backends.auto.choose_backend`, words its reasons from them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from retinaedge.runtime.backends.base import Backend, BackendOptions
from retinaedge.runtime.backends.tensorrt.backend import TensorRTBackend
from retinaedge.runtime.backends.tensorrt.errors import DeviceError, EngineBuildError
from retinaedge.runtime.backends.tensorrt.options import BuildOptions
from retinaedge.runtime.bundle import Bundle

if TYPE_CHECKING:
    from retinaedge.runtime.backends.auto import BackendPlan

log = logging.getLogger(__name__)


class TensorRTRunner(TensorRTBackend, Backend):
    """A deserialised TensorRT engine run through pycuda, as a :class:`Backend` (see the module docstring)."""

    name = "tensorrt"
    providers: tuple[str, ...] = ("TensorRT",)


def check() -> None:
    """Raise :class:`~retinaedge.runtime.errors.MissingDependencyError` (naming ``retinaedge[trt]``)
    unless tensorrt and pycuda can be found (found, not imported)."""
    from retinaedge.runtime.backends.policy import to_runtime_error
    from retinaedge.runtime.backends.tensorrt.fingerprint import require_trt_extra

    try:
        require_trt_extra()
    except DeviceError as exc:
        raise to_runtime_error(exc) from exc


@dataclass(frozen=True)
class EngineSettings:
    """Which engine to use and where to find it: build options, cache directory and budget (bytes),
    whether a missing engine may be built and how long (s) a failed build blocks another attempt."""

    build_options: BuildOptions
    cache_root: Path
    cache_max_bytes: int | None
    allow_build: bool
    retry_after_s: float


def engine_settings(bundle: Bundle, options: BackendOptions) -> EngineSettings:
    """The engine the service would serve ``bundle`` with: its settings (``RETINAEDGE_*`` environment,
    ``RETINAEDGE_CONFIG_FILE``, defaults; :func:`~retinaedge.service.settings.load_settings`) give the
    build options (precision, DLA, NMS, workspace, batch profile 1 / max_batch_size / max_batch_size) and the
    engine cache. ``options.extra["build_options"]`` and ``options.cache_dir`` override them;
    ``options.allow_build=False`` or ``engine_build=false`` forbid a build."""
    from retinaedge.service.settings import load_settings

    settings = load_settings(model=bundle.root or bundle.model_path.parent)
    return EngineSettings(
        build_options=options.extra.get("build_options") or settings.build_options(),
        cache_root=options.cache_dir or settings.engine_cache_root,
        cache_max_bytes=options.extra.get("cache_max_bytes", settings.engine_cache_max_bytes),
        allow_build=options.allow_build and settings.engine_build,
        retry_after_s=settings.engine_build_retry_s,
    )


def open(bundle: Bundle, options: BackendOptions) -> Backend:  # noqa: A001 (registry factory)
    """The registry factory: the engine for ``bundle`` on this device, from the cache or built now.

    Which engine: :func:`engine_settings` (the one the service serves with). ``options.extra`` may also
    hold ``plan`` (a :class:`~retinaedge.runtime.backends.auto.BackendPlan` made earlier: acted on as is),
    ``probe`` (the device probe) and ``on_status`` (progress callback). Raises the reason TensorRT cannot
    be used (missing extra: a :class:`~retinaedge.runtime.errors.MissingDependencyError` naming
    ``retinaedge[trt]``).
    """
    from retinaedge.runtime.backends.auto import plan_for_cli
    from retinaedge.runtime.backends.policy import to_runtime_error

    extra = options.extra
    on_status: Callable[[str], None] = extra.get("on_status") or (lambda _s: None)
    plan = extra.get("plan")
    if plan is None:
        if extra.get("probe") is None:
            check()  # before the settings: a missing extra is the first thing to say
        plan = plan_for_cli(bundle, options, "tensorrt")
    try:
        return open_planned(bundle, plan, on_status)
    except DeviceError as exc:  # registry callers see the runtime's hierarchy only (one CLI error line)
        raise to_runtime_error(exc) from exc


def open_planned(bundle: Bundle, plan: BackendPlan, on_status: Callable[[str], None]) -> TensorRTRunner:
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
