"""Inference backends: the :class:`Backend` base class and the name registry (see :mod:`.registry`)."""

from .base import Backend, BackendOptions
from .registry import BACKENDS, choices, names, open_backend, register, unregister

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
