"""One instance in, model inputs out: the CPU stages of detection, frame by frame.

parse, the model's intended use (:mod:`~.intended_use`, on the header; once per distinct set of the
elements its rules read: :mod:`~.intended_use_memo`) and validate
(:func:`~.dicomio.open_dicom`, :func:`~.dicomio.validate`), then for each frame decode
(:func:`~.dicomio.iter_frames`) and prepare (modality LUT, window, channels, letterbox:
:func:`~.frames.prepare_frame`). Nothing here touches a backend, so the service runs it in a pool of
threads while one thread owns the backend; the sequential :class:`~.detector.Detector` runs it inline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from retinaedge.runtime.bundle import Bundle
from retinaedge.runtime.dicomio import (
    DEFAULT_LIMITS,
    DicomInput,
    ImageInfo,
    Limits,
    iter_frames,
    open_dicom,
    validate,
)
from retinaedge.runtime.errors import MalformedDicomError
from retinaedge.runtime.frames import prepare_frame
from retinaedge.runtime.geometry import Letterbox
from retinaedge.runtime.intended_use import NotApplicableError
from retinaedge.runtime.intended_use_memo import CheckMemo

#: Timing keys (ms) the CPU stages fill in; the backend's stages add ``inference`` and ``postprocess``.
CPU_STAGES = ("parse", "decode", "preprocess")


@dataclass(frozen=True)
class ReadFrame:
    """Frame ``index`` ready for the model: ``image`` float32 (C, H, W) in 0..1, letterboxed to the model
    input; ``letterbox`` maps boxes back to the frame; ``rule`` names the VOI applied; ``unit`` is the
    frame at its own resolution (C, h, w), kept only when asked for (overlays)."""

    index: int
    image: np.ndarray
    letterbox: Letterbox
    rule: str
    unit: np.ndarray | None


class OpenInstance:
    """A parsed and validated instance; :meth:`frames` decodes and prepares it one frame at a time.

    ``timings_ms`` accumulates ``parse``, ``decode`` and ``preprocess`` (milliseconds). Close it (or use it
    as a context manager) to release the file.
    """

    def __init__(
        self, bundle: Bundle, src: DicomInput, info: ImageInfo, timings_ms: dict[str, float]
    ) -> None:
        self.bundle = bundle
        self.src = src
        self.info = info
        self.timings_ms = timings_ms

    @property
    def ds(self) -> Any:
        return self.src.ds

    def frames(self, *, keep_unit: bool = False) -> Iterator[ReadFrame]:
        """Each frame in order; raises :class:`MalformedDicomError` when fewer frames decode than declared."""
        m = self.bundle.manifest
        timings, info, ds = self.timings_ms, self.info, self.src.ds
        decoded = iter_frames(self.src, info)
        index = 0
        while True:
            t = time.perf_counter()
            try:
                arr, photometric = next(decoded)
            except StopIteration:
                break
            timings["decode"] += (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            f = prepare_frame(arr, photometric, ds, index, info.bits_stored, m.preprocessing, m.input)
            timings["preprocess"] += (time.perf_counter() - t) * 1e3
            yield ReadFrame(index, f.image, f.letterbox, f.rule, f.unit if keep_unit else None)
            index += 1
        if index != info.frames:
            raise MalformedDicomError(f"{info.frames} frames declared but {index} decoded")

    def close(self) -> None:
        self.src.close()

    def __enter__(self) -> OpenInstance:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class InstanceReader:
    """Opens instances for one bundle within ``limits``. Thread-safe: it holds no per-instance state."""

    def __init__(self, bundle: Bundle, limits: Limits = DEFAULT_LIMITS) -> None:
        self.bundle = bundle
        self.limits = limits
        use = bundle.manifest.intended_use
        #: The model's intended-use check, once per distinct set of the elements its rules read.
        self._use = CheckMemo(use) if use is not None else None

    def open(self, source: bytes | str | Path) -> OpenInstance:
        """Parse and validate ``source`` (PS3.10 bytes or a file); raises the runtime's DICOM errors, and
        :class:`~.intended_use.NotApplicableError` for an instance outside the model's intended use (its
        header alone is read: nothing is decoded)."""
        timings = {"parse": 0.0, "decode": 0.0, "preprocess": 0.0}
        t = time.perf_counter()
        src = open_dicom(source, self.limits)
        try:
            failures = self._use.check(src.ds) if self._use is not None else []
            if failures:
                raise NotApplicableError(self.bundle.manifest.name, failures)
            info = validate(src, self.limits)
        except BaseException:
            src.close()
            raise
        timings["parse"] = (time.perf_counter() - t) * 1e3
        return OpenInstance(self.bundle, src, info, timings)
