"""The base class every inference backend derives from, and the options a backend is opened with.

A backend is a loaded model that runs batches: ``infer(images)`` takes float32 ``(N, C, H, W)`` in 0..1
and returns the contract outputs as numpy arrays: ``num_detections`` int32 ``(N,)``, ``boxes`` float32
``(N, K, 4)`` (x1, y1, x2, y2 in model-input pixels), ``scores`` float32 ``(N, K)``, ``labels`` int32
``(N, K)``. Use it as a context manager (``close`` releases the session/engine and its memory).

Backends are made by a factory ``open(bundle, options) -> Backend`` in the module the registry
(:mod:`.registry`) names; this module imports nothing heavy (no onnxruntime, tensorrt, pycuda, torch).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np


class Backend(ABC):
    """A loaded model that runs batches. One small subclass per backend; use as a context manager.

    ``name`` is the registry name (``onnxruntime``, ``tensorrt``); ``providers`` what actually runs the
    graph (ONNX Runtime execution providers in use, ``("TensorRT",)``); ``reason`` why this backend was
    chosen (set by the opener, shown by the service); ``self_test_criteria`` the golden self-test criteria
    that apply to it (None: the bundle's own, i.e. full precision); ``precision`` what it computes in.
    """

    name: str = "backend"
    providers: tuple[str, ...] = ()
    reason: str = ""
    self_test_criteria: dict[str, float] | None = None
    #: The arithmetic the model runs in (``fp32``, ``fp16``, ``bf16``, ``int8``): every result and
    #: ``GET /v1/model`` say it.
    precision: str = "fp32"

    @abstractmethod
    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch ``(N, C, H, W)`` float32 -> dict of contract outputs (see the module docstring)."""

    def unavailable(self) -> str | None:
        """Why this backend cannot run batches right now (e.g. its inference server is unreachable), or
        None. ``/readyz`` answers 503 with it; ``infer`` meanwhile raises
        :class:`~retinaedge.runtime.errors.NotReadyError`, so queued work stays pending. Local backends
        are always available."""
        return None

    def describe(self) -> dict[str, Any]:
        """Backend-specific facts for ``/readyz`` and ``/v1/model`` (a remote server's address and state)."""
        return {}

    def close(self) -> None:  # noqa: B027 (optional hook: a backend without resources keeps it)
        """Release the session/engine and its memory (idempotent; nothing to release by default)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class BackendOptions:
    """How to open a backend; each factory uses the fields that concern it and ignores the others.

    ``threads``: intra-op CPU threads (None: CPU affinity); ``providers``: ONNX Runtime execution
    providers, in order; ``batch_size``: frames per batch the caller will send (TensorRT's profile
    maximum); ``cache_dir``: the TensorRT engine cache (None: the service's, from its settings);
    ``allow_build``: build a missing engine (minutes); ``extra``: backend-specific values
    (e.g. ``build_options``, ``probe``, ``plan`` for ``tensorrt``; an ``url`` for a remote backend).
    """

    threads: int | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    batch_size: int = 4
    cache_dir: Path | None = None
    allow_build: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)
