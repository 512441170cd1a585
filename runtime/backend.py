"""The backend base class, under its historical import path.

``from retinaedge.runtime.backend import Backend`` keeps working; the class lives in
:mod:`retinaedge.runtime.backends.base` and the registry of backends by name in
:mod:`retinaedge.runtime.backends.registry`.
"""

from __future__ import annotations

from retinaedge.runtime.backends.base import Backend, BackendOptions

__all__ = ["Backend", "BackendOptions"]
