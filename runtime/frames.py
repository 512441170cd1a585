"""Decoded DICOM frame -> model input: the one place the runtime's preprocessing is put together.

Modality LUT and window to 0..1 (:func:`~.preprocess.to_unit`), channel count
(:func:`~.preprocess.match_channels`), letterbox to the model's input size (:class:`~.geometry.Letterbox`).
The detector runs :func:`prepare_frame` on each frame it decodes; export parity and INT8 calibration take
whole instances through :func:`model_inputs`, so all three see the same float32 tensors. The service's
secondary captures draw on :func:`seen_frames`: the same frames before the letterbox.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.runtime.dicomio import DEFAULT_LIMITS, Limits, iter_frames, open_dicom, validate
from retinaedge.runtime.geometry import Letterbox
from retinaedge.runtime.manifest import InputSpec, Preprocessing
from retinaedge.runtime.preprocess import match_channels, to_unit


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
    arr: np.ndarray,
    photometric: str,
    ds: Any,
    index: int,
    bits_stored: int,
    pre: Preprocessing,
    inp: InputSpec,
) -> PreparedFrame:
    """Frame ``index`` of dataset ``ds``, decoded to ``arr`` (h, w) or (h, w, 3) -> :class:`PreparedFrame`
    for a model taking ``inp`` (channels, height, width) with preprocessing ``pre`` (the manifest's)."""
    chw, rule = _seen(arr, photometric, ds, index, bits_stored, pre, inp)
    box = Letterbox.fit(chw.shape[1], chw.shape[2], inp.height, inp.width)
    return PreparedFrame(box.apply(chw, pre.pad_value), box, rule, chw)


def _seen(
    arr: np.ndarray,
    photometric: str,
    ds: Any,
    index: int,
    bits_stored: int,
    pre: Preprocessing,
    inp: InputSpec,
) -> tuple[np.ndarray, str]:
    """The frame as the model sees it before the letterbox: (C, h, w) float32 in 0..1, and the VOI rule."""
    unit, rule = to_unit(arr, photometric, ds, index, pre, bits_stored)
    return match_channels(unit, inp.channels), rule


def seen_frames(
    source: bytes | str | Path,
    indices: Sequence[int],
    pre: Preprocessing,
    inp: InputSpec,
    limits: Limits = DEFAULT_LIMITS,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(frame index, frame (C, h, w) float32 in 0..1)`` for the frames ``indices`` (0-based, in
    ascending order) of one instance: each frame windowed exactly as :func:`prepare_frame` prepares it for
    the model, at the frame's own size (rows h, columns w), without the letterbox. Only those frames are
    decoded, one at a time (what the service's secondary captures are drawn on)."""
    wanted = sorted(set(indices))
    with open_dicom(source, limits) as src:
        info = validate(src, limits)
        wanted = [i for i in wanted if 0 <= i < info.frames]
        for index, (arr, photometric) in zip(wanted, iter_frames(src, info, wanted), strict=True):
            chw, _rule = _seen(arr, photometric, src.ds, index, info.bits_stored, pre, inp)
            yield index, chw


def model_inputs(
    source: bytes | str | Path, pre: Preprocessing, inp: InputSpec, limits: Limits = DEFAULT_LIMITS
) -> Iterator[tuple[int, np.ndarray, Letterbox]]:
    """Yield ``(frame index, model input float32 (C, H, W), letterbox)`` of one instance, frame by frame."""
    with open_dicom(source, limits) as src:
        info = validate(src, limits)
        for index, (arr, photometric) in enumerate(iter_frames(src, info)):
            frame = prepare_frame(arr, photometric, src.ds, index, info.bits_stored, pre, inp)
            yield index, frame.image, frame.letterbox
