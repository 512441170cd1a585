"""Backends by name, imported only when used (the way Polygraphy keeps loaders apart from runners).

Each entry maps a name to a dotted module path; the module exposes a factory
``open(bundle: Bundle, options: BackendOptions) -> Backend`` and optionally ``check() -> None`` (raise
:class:`~retinaedge.runtime.errors.MissingDependencyError` when its packages are missing, cheaply). Nothing is imported until
:func:`open_backend` (or :func:`factory`) asks for that name, so importing this module never imports
onnxruntime, tensorrt or pycuda.

Adding a backend is one new file that registers its name: either a line in :data:`BACKENDS` or, from
the new module's package, ``register("openvino", "retinaedge.runtime.backends.openvino")``.

Placement: ``tensorrt`` lives in the service layer (:mod:`retinaedge.service.tensorrt_backend`), the one
layer allowed to import both ``device`` (engine cache, TensorRT runner) and ``runtime`` (bundle, golden
self-test). The runtime refers to it only by its dotted name here, never by an import statement, so the
import direction ``service -> runtime, device`` holds. ``auto`` is not a backend but the service's
policy (:func:`retinaedge.service.engines.open_auto`): a verified or freshly built TensorRT engine, else
ONNX Runtime, with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .base import Backend, BackendOptions

if TYPE_CHECKING:
    from ..bundle import Bundle

log = logging.getLogger(__name__)

#: name -> module exposing ``open(bundle, options) -> Backend`` (imported on first use).
BACKENDS: dict[str, str] = {
    "onnxruntime": "retinaedge.runtime.onnxrt",
    "tensorrt": "retinaedge.service.tensorrt_backend",
}

AUTO = "auto"
#: The module whose ``open_auto(bundle, options) -> Backend`` implements ``auto``.
AUTO_POLICY = "retinaedge.service.engines"


def register(name: str, module: str) -> None:
    """Register (or replace) backend ``name`` as the dotted ``module`` exposing ``open(bundle, options)``."""
    if not name or name == AUTO:
        raise ConfigError(f"backend name {name!r} is reserved or empty")
    BACKENDS[name] = module


def unregister(name: str) -> None:
    """Forget backend ``name`` (tests)."""
    BACKENDS.pop(name, None)


def names() -> tuple[str, ...]:
    """Registered backend names, in registration order."""
    return tuple(BACKENDS)


def choices() -> tuple[str, ...]:
    """What ``--backend`` accepts: ``auto`` and every registered name."""
    return (AUTO, *BACKENDS)


def _unknown(name: str) -> ConfigError:
    return ConfigError(f"unknown backend {name!r}; known: {', '.join(choices())}")


def factory(name: str) -> Any:
    """The ``open(bundle, options)`` factory of backend ``name`` (imports its module now)."""
    if name == AUTO:
        return importlib.import_module(AUTO_POLICY).open_auto
    try:
        module = BACKENDS[name]
    except KeyError:
        raise _unknown(name) from None
    return importlib.import_module(module).open


def check_available(name: str) -> None:
    """Raise now when backend ``name`` cannot be opened for want of packages (the module's optional
    ``check()``: finds, does not import, e.g. tensorrt); ``auto`` always passes (it falls back)."""
    if name == AUTO:
        return
    if name not in BACKENDS:
        raise _unknown(name)
    check = getattr(importlib.import_module(BACKENDS[name]), "check", None)
    if check is not None:
        check()


def open_backend(name: str, bundle: Bundle, options: BackendOptions | None = None) -> Backend:
    """Open backend ``name`` (``auto`` or a registered name) on ``bundle``.

    Raises :class:`~retinaedge.runtime.errors.ConfigError` naming the known backends for an unknown
    name, :class:`~retinaedge.runtime.errors.MissingDependencyError` (naming the extra to install) when
    the backend's packages are missing, or the backend's own error.
    """
    if name != AUTO and name not in BACKENDS:
        raise _unknown(name)
    opts = options if options is not None else BackendOptions()
    backend = factory(name)(bundle, opts)
    if not isinstance(backend, Backend):
        raise TypeError(f"backend {name!r} factory returned {type(backend).__name__}, not a Backend")
    log.info("backend %s open: providers=%s", backend.name, list(backend.providers))
    return backend


def add_backend_arguments(p: argparse.ArgumentParser, *, default: str) -> None:
    """``--backend NAME`` (``auto`` or a registered name) and ``--engine-cache DIR`` for a CLI verb."""
    p.add_argument(
        "--backend",
        choices=choices(),
        default=default,
        help=f"inference backend (default {default}); tensorrt: the engine the service serves with (its "
        "RETINAEDGE_ENGINE_* settings), from the engine cache or built; needs the 'trt' extra and a GPU; "
        "auto: that engine, else ONNX Runtime",
    )
    p.add_argument(
        "--engine-cache",
        type=Path,
        help="TensorRT engine cache directory (default: the service's, RETINAEDGE_ENGINE_CACHE_DIR or "
        "RETINAEDGE_DATA_DIR/engines; retinaedge-data/engines)",
    )
