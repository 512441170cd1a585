"""Backends by name, imported only when used (the way Polygraphy keeps loaders apart from runners).

Each entry maps a name to a dotted module path; the module exposes a factory
``open(bundle: Bundle, options: BackendOptions) -> Backend`` and optionally ``check() -> None`` (raise
:class:`~retinaedge.runtime.errors.MissingDependencyError` when its packages are missing, cheaply). Nothing is imported until
:func:`open_backend` (or :func:`factory`) asks for that name, so importing this module never imports
onnxruntime, tensorrt or pycuda.

Adding a backend is one new module or folder in this package (``runtime/backends/openvino.py``,
``runtime/backends/tensorrt/``) exposing ``open``: it is registered under its name, found by listing the
package (:func:`discovered`; nothing is imported). A module elsewhere (a plugin, a test) is registered
by ``register("name", "dotted.module")``.

``auto`` is not a backend but a policy over them (:func:`retinaedge.runtime.backends.auto.open_auto`):
a verified or freshly built TensorRT engine, else ONNX Runtime, with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinaedge.runtime.backends.base import Backend, BackendOptions
from retinaedge.runtime.errors import ConfigError

if TYPE_CHECKING:
    from retinaedge.runtime.bundle import Bundle

log = logging.getLogger(__name__)

#: name -> module exposing ``open(bundle, options) -> Backend``, for backends outside this package
#: (imported on first use; the package's own are :func:`discovered`).
BACKENDS: dict[str, str] = {}

AUTO = "auto"
#: The module whose ``open_auto(bundle, options) -> Backend`` implements ``auto``.
AUTO_POLICY = "retinaedge.runtime.backends.auto"


#: Modules of this package that are not backends.
NOT_BACKENDS = frozenset({"auto", "base", "policy", "registry"})


def discovered() -> dict[str, str]:
    """Backend modules dropped into this package (``name.py`` -> ``name``), found without importing them."""
    package = __name__.rpartition(".")[0]
    found = {}
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if not info.name.startswith("_") and info.name not in NOT_BACKENDS:
            found[info.name] = f"{package}.{info.name}"
    return found


def _all() -> dict[str, str]:
    """This package's backends (in name order), then registered ones under other names (a registered
    name replaces a discovered one's module)."""
    return {**discovered(), **BACKENDS}


def register(name: str, module: str) -> None:
    """Register (or replace) backend ``name`` as the dotted ``module`` exposing ``open(bundle, options)``."""
    if not name or name == AUTO:
        raise ConfigError(f"backend name {name!r} is reserved or empty")
    BACKENDS[name] = module


def unregister(name: str) -> None:
    """Forget backend ``name`` (tests)."""
    BACKENDS.pop(name, None)


def names() -> tuple[str, ...]:
    """Backend names: registered ones in registration order, then discovered ones."""
    return tuple(_all())


def choices() -> tuple[str, ...]:
    """What ``--backend`` accepts: ``auto`` and every registered name."""
    return (AUTO, *_all())


def _unknown(name: str) -> ConfigError:
    return ConfigError(f"unknown backend {name!r}; known: {', '.join(choices())}")


def factory(name: str) -> Any:
    """The ``open(bundle, options)`` factory of backend ``name`` (imports its module now)."""
    if name == AUTO:
        return importlib.import_module(AUTO_POLICY).open_auto
    module = _all().get(name)
    if module is None:
        raise _unknown(name)
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module.startswith(exc.name):
            raise  # a package the backend needs: the backend should say which extra provides it
        raise ConfigError(f"backend {name!r} is registered as module {module}, which does not exist") from exc
    open_ = getattr(loaded, "open", None)
    if not callable(open_):
        raise ConfigError(f"backend {name!r}: module {module} has no open(bundle, options) factory")
    return open_


def check_available(name: str) -> None:
    """Raise now when backend ``name`` cannot be opened for want of packages (the module's optional
    ``check()``: finds, does not import, e.g. tensorrt); ``auto`` always passes (it falls back)."""
    if name == AUTO:
        return
    module = _all().get(name)
    if module is None:
        raise _unknown(name)
    check = getattr(importlib.import_module(module), "check", None)
    if check is not None:
        check()


def open_backend(name: str, bundle: Bundle, options: BackendOptions | None = None) -> Backend:
    """Open backend ``name`` (``auto`` or a registered name) on ``bundle``.

    Raises :class:`~retinaedge.runtime.errors.ConfigError` naming the known backends for an unknown
    name, :class:`~retinaedge.runtime.errors.MissingDependencyError` (naming the extra to install) when
    the backend's packages are missing, or the backend's own error.
    """
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
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "int8", "auto"),
        default="fp32",
        help="--backend openvino: fp32 (default), or bf16/int8/auto, each behind a gate on this CPU against "
        "the bundle's FP32 outputs (a failed gate serves fp32 and says why; docs/openvino.md)",
    )


def backend_extra(args: argparse.Namespace) -> dict[str, Any]:
    """``options.extra`` from a verb's ``--backend``/``--precision``: ``{"precision": ...}`` for
    ``openvino``; a reduced ``--precision`` with another backend is refused, not silently ignored."""
    precision = getattr(args, "precision", "fp32")
    backend = getattr(args, "backend", "onnxruntime")
    if backend == "openvino":
        return {"precision": precision}
    if precision != "fp32":
        raise ConfigError(
            f"--precision {precision} applies to --backend openvino, not to --backend {backend}"
        )
    return {}
