"""ONNX Runtime backend: runs ``model.onnx`` (NMS included) on the CPU or an explicitly chosen provider.

Registered as ``onnxruntime`` (:mod:`retinaedge.runtime.backends.registry`); :func:`open` is its factory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from retinaedge.runtime.backends.base import Backend, BackendOptions
from retinaedge.runtime.detections import OUTPUT_NAMES
from retinaedge.runtime.errors import ConfigError

if TYPE_CHECKING:
    from retinaedge.runtime.bundle import Bundle

log = logging.getLogger(__name__)

KNOWN_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")


def affinity_threads() -> int:
    """Cores this process may run on (CPU affinity, cgroup-agnostic), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class OnnxRuntimeBackend(Backend):
    """``infer(images (N, C, H, W) float32) -> {num_detections, boxes, scores, labels}``.

    ``providers`` are chosen explicitly; after the session is created the providers actually in use
    are checked, so a missing CUDA/TensorRT provider is an error rather than a silent CPU fallback.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model: str | Path | bytes,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        unknown = [p for p in providers if p not in KNOWN_PROVIDERS]
        if unknown:
            raise ConfigError(f"unknown ONNX Runtime provider(s) {unknown}; known: {list(KNOWN_PROVIDERS)}")
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise ConfigError(
                f"ONNX Runtime provider(s) {missing} are not available in this installation "
                f"(available: {available})"
            )
        opts = ort.SessionOptions()
        self.threads = threads or affinity_threads()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # The intra-op threads spin while a Run lasts, then stop: by default they keep spinning after it,
        # burning a core between requests (docs/operations.md, "CPU between requests": half the CPU
        # per request at one request every 50 ms, no loss of frames/s back to back).
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        source: Any = model if isinstance(model, bytes) else str(model)
        self._session = ort.InferenceSession(source, sess_options=opts, providers=list(providers))
        in_use = self._session.get_providers()
        if in_use[: len(providers)] != list(providers):
            raise ConfigError(f"requested providers {list(providers)} but the session uses {in_use}")
        self.providers = tuple(in_use)
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(f"model has {len(inputs)} inputs; expected one ('images')")
        self.input_name = inputs[0].name
        self.input_shape = tuple(inputs[0].shape)
        names = [o.name for o in self._session.get_outputs()]
        if tuple(names) != OUTPUT_NAMES:
            raise ConfigError(f"model outputs {names} do not follow the contract {list(OUTPUT_NAMES)}")
        log.info("onnxruntime session ready: providers=%s threads=%d", in_use, self.threads)

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch; ``images`` float32 ``(N, C, H, W)``."""
        if images.dtype != np.float32:
            raise ConfigError(f"images must be float32, got {images.dtype}")
        expected = self.input_shape[1:]
        if images.ndim != 4 or any(
            isinstance(e, int) and e != a for e, a in zip(expected, images.shape[1:], strict=True)
        ):
            raise ConfigError(f"images shape {images.shape} does not fit the model input {self.input_shape}")
        outs = self._session.run(list(OUTPUT_NAMES), {self.input_name: np.ascontiguousarray(images)})
        return dict(zip(OUTPUT_NAMES, outs, strict=True))

    def close(self) -> None:
        """Drop the session (its memory goes with it)."""
        self._session = None


def open(bundle: Bundle, options: BackendOptions) -> OnnxRuntimeBackend:  # noqa: A001 (registry factory)
    """The registry factory: ``bundle.model_path`` on ``options.providers`` with ``options.threads``."""
    return OnnxRuntimeBackend(bundle.model_path, providers=options.providers, threads=options.threads)
