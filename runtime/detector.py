"""The inner loop: one DICOM instance in, per-frame detections in frame pixel coordinates out.

read + validate -> decode frame by frame -> preprocess (to 0..1, letterbox) -> backend in batches ->
map boxes back to each frame. Memory is bounded by one batch of frames, not by the instance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import Backend, BackendOptions
from .bundle import Bundle, load_bundle
from .detections import split_outputs
from .dicomio import DEFAULT_LIMITS, Limits, iter_frames, open_dicom, validate
from .errors import ConfigError, MalformedDicomError
from .frames import prepare_frame
from .geometry import Letterbox

log = logging.getLogger(__name__)

FrameCallback = Callable[[int, np.ndarray, "FrameResult"], None]


@dataclass(frozen=True)
class Detection:
    """One box in the original frame's pixel grid: x1, y1, x2, y2 (column, row), edges in pixels."""

    label: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "class_id": self.class_id,
            "score": round(self.score, 6),
            "box": [round(v, 3) for v in self.box],
        }


@dataclass(frozen=True)
class FrameResult:
    """Detections of frame ``index`` (0-based, in the instance's frame order)."""

    index: int
    detections: list[Detection]
    voi: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "detections": [d.to_json() for d in self.detections]}


@dataclass(frozen=True)
class InstanceResult:
    """The ``/v1/detect`` response body (docs/integration.md)."""

    sop_instance_uid: str
    model_name: str
    model_sha256: str
    frames: list[FrameResult]
    timings_ms: dict[str, float]
    image: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "model": {"name": self.model_name, "sha256": self.model_sha256},
            "image": self.image,
            "frames": [f.to_json() for f in self.frames],
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }


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
        m = bundle.manifest
        self._classes = m.class_names

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
        from .backends.registry import open_backend

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
        timings = {"parse": 0.0, "decode": 0.0, "preprocess": 0.0, "inference": 0.0, "postprocess": 0.0}
        t_start = time.perf_counter()
        with open_dicom(source, self.limits) as src:
            return self._detect(src, t_start, timings, on_frame)

    def _detect(
        self, src: Any, t_start: float, timings: dict[str, float], on_frame: FrameCallback | None
    ) -> InstanceResult:
        ds = src.ds
        info = validate(src, self.limits)
        timings["parse"] = (time.perf_counter() - t_start) * 1e3
        m = self.bundle.manifest
        results: list[FrameResult] = []
        batch: list[tuple[int, np.ndarray, Letterbox, str, np.ndarray | None]] = []
        frames = iter_frames(src, info)
        index = 0
        while True:
            t = time.perf_counter()
            try:
                arr, photometric = next(frames)
            except StopIteration:
                break
            timings["decode"] += (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            f = prepare_frame(arr, photometric, ds, index, info.bits_stored, m.preprocessing, m.input)
            batch.append((index, f.image, f.letterbox, f.rule, f.unit if on_frame else None))
            timings["preprocess"] += (time.perf_counter() - t) * 1e3
            index += 1
            if len(batch) == self.batch_size:
                results += self._run(batch, timings, on_frame)
                batch = []
        if batch:
            results += self._run(batch, timings, on_frame)
        if index != info.frames:
            raise MalformedDicomError(f"{info.frames} frames declared but {index} decoded")
        timings["total"] = (time.perf_counter() - t_start) * 1e3
        return InstanceResult(
            sop_instance_uid=info.sop_instance_uid,
            model_name=self.bundle.manifest.name,
            model_sha256=str(self.bundle.manifest.model_sha256),
            frames=results,
            timings_ms=timings,
            image={
                "rows": info.rows,
                "columns": info.columns,
                "frames": info.frames,
                "photometric_interpretation": info.photometric,
                "transfer_syntax": info.transfer_syntax,
            },
        )

    def _run(
        self, batch: list[Any], timings: dict[str, float], on_frame: FrameCallback | None
    ) -> list[FrameResult]:
        t = time.perf_counter()
        images = np.stack([item[1] for item in batch]).astype(np.float32, copy=False)  # (B, C, H, W)
        outputs = self.backend.infer(images)
        timings["inference"] += (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        out = []
        for (index, _, box, rule, chw), dets in zip(batch, split_outputs(outputs), strict=True):
            frame_boxes = box.to_frame(dets.boxes)
            result = FrameResult(
                index=index,
                voi=rule,
                detections=[
                    Detection(
                        label=self._classes[int(c)] if 0 <= int(c) < len(self._classes) else str(int(c)),
                        class_id=int(c),
                        score=float(s),
                        box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
                    )
                    for b, s, c in zip(frame_boxes, dets.scores, dets.labels, strict=True)
                ],
            )
            out.append(result)
            if on_frame is not None and chw is not None:
                on_frame(index, chw, result)
        timings["postprocess"] += (time.perf_counter() - t) * 1e3
        return out
