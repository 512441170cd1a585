"""Inference backends: the :class:`Backend` base class and the name registry (see :mod:`.registry`)."""

from retinaedge.runtime.backends.base import Backend, BackendOptions
from retinaedge.runtime.backends.registry import BACKENDS, choices, names, open_backend, register, unregister

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendOptions",
    "choices",
    "names",
    "open_backend",
    "register",
    "unregister",
]
