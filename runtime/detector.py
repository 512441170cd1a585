"""The inner loop: one DICOM instance in, per-frame detections in frame pixel coordinates out.

read + validate -> decode frame by frame -> preprocess (to 0..1, letterbox) -> backend in batches ->
map boxes back to each frame. Memory is bounded by one batch of frames, not by the instance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from retinaedge.runtime.backends.base import Backend, BackendOptions
from retinaedge.runtime.bundle import Bundle, load_bundle
from retinaedge.runtime.detections import split_outputs
from retinaedge.runtime.dicomio import DEFAULT_LIMITS, Limits
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.instance_result import (
    FrameResult,
    InstanceResult,
    frame_result,
    instance_result,
)
from retinaedge.runtime.reader import InstanceReader, ReadFrame

log = logging.getLogger(__name__)

FrameCallback = Callable[[int, np.ndarray, "FrameResult"], None]


class Detector:
    """A bundle and a backend; ``detect(source)`` runs one instance. Not thread-safe: one owner thread."""

    def __init__(
        self,
        bundle: Bundle,
        backend: Backend,
        *,
        batch_size: int = 4,
        limits: Limits = DEFAULT_LIMITS,
        backend_reason: str = "",
        self_test_criteria: dict[str, float] | None = None,
    ) -> None:
        """``backend_reason`` says why this backend was chosen (shown by the service);
        ``self_test_criteria`` overrides the golden criteria for reduced-precision backends."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.bundle = bundle
        self.backend = backend
        self.backend_reason = backend_reason
        self.self_test_criteria = self_test_criteria
        self.batch_size = batch_size
        self.limits = limits
        self.reader = InstanceReader(bundle, limits)
        self._classes = bundle.manifest.class_names

    @classmethod
    def open(
        cls,
        model: str | Path,
        *,
        backend: str = "onnxruntime",
        threads: int | None = None,
        batch_size: int = 4,
        limits: Limits = DEFAULT_LIMITS,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        options: BackendOptions | None = None,
    ) -> Detector:
        """Open a bundle on ``backend`` (a registry name or ``auto``; ONNX Runtime on ``providers``, CPU
        by default). ``options`` replaces the options made of ``threads``/``batch_size``/``providers``."""
        from retinaedge.runtime.backends.registry import open_backend

        bundle = load_bundle(model)
        opts = options or BackendOptions(threads=threads, providers=providers, batch_size=batch_size)
        opened = open_backend(backend, bundle, opts)
        return cls(
            bundle,
            opened,
            batch_size=batch_size,
            limits=limits,
            backend_reason=opened.reason,
            self_test_criteria=opened.self_test_criteria,
        )

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def detect(self, source: bytes | str | Path, *, on_frame: FrameCallback | None = None) -> InstanceResult:
        """Detect on every frame of one instance. ``on_frame(index, unit (C, h, w), result)`` sees each
        frame's preprocessed image at frame resolution (for overlays)."""
        t_start = time.perf_counter()
        with self.reader.open(source) as inst:
            timings = {**inst.timings_ms, "inference": 0.0, "postprocess": 0.0}
            inst.timings_ms = timings
            results: list[FrameResult] = []
            batch: list[ReadFrame] = []
            for frame in inst.frames(keep_unit=on_frame is not None):
                batch.append(frame)
                if len(batch) == self.batch_size:
                    results += self._run(batch, timings, on_frame)
                    batch = []
            if batch:
                results += self._run(batch, timings, on_frame)
            timings["total"] = (time.perf_counter() - t_start) * 1e3
            return instance_result(self.bundle.manifest, inst.info, results, timings)

    def _run(
        self, batch: list[ReadFrame], timings: dict[str, float], on_frame: FrameCallback | None
    ) -> list[FrameResult]:
        t = time.perf_counter()
        images = np.stack([f.image for f in batch]).astype(np.float32, copy=False)  # (B, C, H, W)
        outputs = self.backend.infer(images)
        timings["inference"] += (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        out = []
        for frame, dets in zip(batch, split_outputs(outputs), strict=True):
            result = frame_result(
                self._classes,
                frame.index,
                frame.rule,
                frame.letterbox,
                dets,
                self.bundle.manifest.operating_point,
            )
            out.append(result)
            if on_frame is not None and frame.unit is not None:
                on_frame(frame.index, frame.unit, result)
        timings["postprocess"] += (time.perf_counter() - t) * 1e3
        return out
