"""One OpenVINO compiled model on the CPU as a :class:`~retinaedge.runtime.backends.base.Backend`.

``infer(images (N, C, H, W) float32 0..1) -> {num_detections (N,) int32, boxes (N, K, 4) float32,
scores (N, K) float32, labels (N, K) int32}`` like every backend. The precision is pinned with
``INFERENCE_PRECISION_HINT`` (``f32`` for FP32 and for INT8 models, whose float parts must not become
bf16; ``bf16`` only when asked): OpenVINO otherwise picks bf16 by itself on AMX CPUs, which breaks the
export's parity rule. The performance hint, threads and streams are set here and read back from the
compiled model (``settings``). With more than one stream a batch is split over that many infer requests
run at once (throughput mode); with one (latency mode, the default) it runs as one request.

openvino is imported when a model is compiled, never at import time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.runtime.backends.base import Backend
from retinaedge.runtime.detections import OUTPUT_NAMES
from retinaedge.runtime.errors import ConfigError

log = logging.getLogger(__name__)

#: retinaedge precision -> OpenVINO ``INFERENCE_PRECISION_HINT``.
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
PERFORMANCE_HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}


def compile_config(precision: str, *, threads: int, hint: str, cache_dir: Path | None) -> dict[str, Any]:
    """The properties ``Core.compile_model`` gets for ``precision`` on the CPU."""
    if precision not in HINTS:
        raise ConfigError(f"OpenVINO precision must be one of {sorted(HINTS)}, got {precision!r}")
    if hint not in PERFORMANCE_HINTS:
        raise ConfigError(
            f"OpenVINO performance hint must be one of {sorted(PERFORMANCE_HINTS)}, got {hint!r}"
        )
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": HINTS[precision],
        "PERFORMANCE_HINT": PERFORMANCE_HINTS[hint],
        "INFERENCE_NUM_THREADS": int(threads),
    }
    if hint == "latency":
        config["NUM_STREAMS"] = 1
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    return config


class OpenVinoBackend(Backend):
    """A compiled model; ``precision`` is what runs (``fp32``, ``bf16``, ``int8``), ``variant`` which file
    (``model.onnx``, the NNCF IR or the Q/DQ model), ``settings`` what the compiled model reports."""

    name = "openvino"

    def __init__(
        self,
        core: Any,
        model_path: Path,
        *,
        precision: str,
        threads: int,
        hint: str = "latency",
        cache_dir: Path | None = None,
    ) -> None:
        self.precision = precision
        self.model_path = model_path
        config = compile_config(precision, threads=threads, hint=hint, cache_dir=cache_dir)
        model = core.read_model(str(model_path))
        if len(model.inputs) != 1:
            raise ConfigError(f"{model_path.name} has {len(model.inputs)} inputs; expected one ('images')")
        names = tuple(o.get_any_name() for o in model.outputs)
        if names != OUTPUT_NAMES:
            raise ConfigError(f"{model_path.name} outputs {list(names)} do not follow the contract")
        self._compiled = core.compile_model(model, "CPU", config)
        streams = int(self._compiled.get_property("NUM_STREAMS"))
        self.settings: dict[str, Any] = {
            "performance_hint": hint,
            "inference_precision": _type_name(self._compiled.get_property("INFERENCE_PRECISION_HINT")),
            "threads": int(self._compiled.get_property("INFERENCE_NUM_THREADS")),
            "streams": streams,
            "cache_dir": str(cache_dir) if cache_dir is not None else None,
        }
        self._requests = [self._compiled.create_infer_request() for _ in range(max(1, streams))]
        self.providers = (f"OpenVINO CPU {precision}",)
        self.details: dict[str, Any] = {}
        log.info("openvino %s compiled from %s: %s", precision, model_path.name, self.settings)

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch ``(N, C, H, W)`` float32; split over the streams when there are several."""
        if self._compiled is None:
            raise ConfigError("the OpenVINO model is closed")
        if images.dtype != np.float32 or images.ndim != 4:
            raise ConfigError(f"images must be float32 (N, C, H, W), got {images.dtype} {images.shape}")
        images = np.ascontiguousarray(images)
        chunks = np.array_split(images, min(len(self._requests), images.shape[0]))
        used = self._requests[: len(chunks)]
        for request, chunk in zip(used, chunks, strict=True):
            request.start_async({0: chunk})
        parts: list[dict[str, np.ndarray]] = []
        for request in used:
            request.wait()
            parts.append({name: request.get_tensor(name).data.copy() for name in OUTPUT_NAMES})
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in OUTPUT_NAMES}

    def describe(self) -> dict[str, Any]:
        return {"precision": self.precision, "model": self.model_path.name, **self.settings, **self.details}

    def close(self) -> None:
        self._requests = []
        self._compiled = None


def _type_name(value: Any) -> str:
    """An OpenVINO element type as its short name (``f32``, ``bf16``)."""
    to_string = getattr(value, "to_string", None)
    return str(to_string()) if callable(to_string) else str(value)
