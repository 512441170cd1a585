"""Decoded DICOM frame -> model input: the one place the runtime's preprocessing is put together.

Modality LUT and window to 0..1 (:func:`~.preprocess.to_unit`), channel count
(:func:`~.preprocess.match_channels`), letterbox to the model's input size (:class:`~.geometry.Letterbox`).
The detector runs :func:`prepare_frame` on each frame it decodes; export parity and INT8 calibration take
whole instances through :func:`model_inputs`, so all three see the same float32 tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dicomio import DEFAULT_LIMITS, Limits, iter_frames, open_dicom, validate
from .geometry import Letterbox
from .manifest import Manifest, Preprocessing
from .preprocess import match_channels, to_unit


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: ``preprocessing``, ``channels`` (C) and ``input_hw`` (H, W) in pixels."""

    preprocessing: Preprocessing
    channels: int
    input_hw: tuple[int, int]

    @classmethod
    def of(cls, manifest: Manifest) -> InputSpec:
        return cls(
            manifest.preprocessing, manifest.input.channels, (manifest.input.height, manifest.input.width)
        )


@dataclass(frozen=True)
class PreparedFrame:
    """One frame ready for the model: ``image`` (C, H, W) float32 in 0..1 (letterboxed), the
    ``letterbox`` that maps boxes back to the frame, the VOI ``rule`` applied and ``unit`` (C, h, w), the
    frame at its own resolution (for overlays)."""

    image: np.ndarray
    letterbox: Letterbox
    rule: str
    unit: np.ndarray


def prepare_frame(
    arr: np.ndarray, photometric: str, ds: Any, index: int, bits_stored: int, spec: InputSpec
) -> PreparedFrame:
    """Frame ``index`` of dataset ``ds``, decoded to ``arr`` (h, w) or (h, w, 3) -> :class:`PreparedFrame`."""
    unit, rule = to_unit(arr, photometric, ds, index, spec.preprocessing, bits_stored)
    chw = match_channels(unit, spec.channels)
    box = Letterbox.fit(chw.shape[1], chw.shape[2], *spec.input_hw)
    return PreparedFrame(box.apply(chw, spec.preprocessing.pad_value), box, rule, chw)


def model_inputs(
    source: bytes | str | Path, spec: InputSpec, limits: Limits = DEFAULT_LIMITS
) -> Iterator[tuple[int, np.ndarray, Letterbox]]:
    """Yield ``(frame index, model input float32 (C, H, W), letterbox)`` of one instance, frame by frame."""
    with open_dicom(source, limits) as src:
        info = validate(src, limits)
        for index, (arr, photometric) in enumerate(iter_frames(src, info)):
            frame = prepare_frame(arr, photometric, src.ds, index, info.bits_stored, spec)
            yield index, frame.image, frame.letterbox
