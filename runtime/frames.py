"""DICOM instance -> model inputs, the exact preprocessing the detector applies (for export parity and
engine calibration)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .dicomio import DEFAULT_LIMITS, Limits, iter_frames, open_dicom, validate
from .geometry import Letterbox
from .manifest import Preprocessing
from .preprocess import match_channels, to_unit


def model_inputs(
    source: bytes | str | Path,
    pre: Preprocessing,
    channels: int,
    input_hw: tuple[int, int],
    limits: Limits = DEFAULT_LIMITS,
) -> Iterator[tuple[int, np.ndarray, Letterbox]]:
    """Yield ``(frame index, model input float32 (channels, H, W), letterbox)`` frame by frame."""
    with open_dicom(source, limits) as src:
        info = validate(src, limits)
        for index, (arr, photometric) in enumerate(iter_frames(src, info)):
            unit, _ = to_unit(arr, photometric, src.ds, index, pre, info.bits_stored)
            chw = match_channels(unit, channels)
            box = Letterbox.fit(chw.shape[1], chw.shape[2], *input_hw)
            yield index, box.apply(chw, pre.pad_value), box
