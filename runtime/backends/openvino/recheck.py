"""A reduced precision with an FP32 re-check of the frames whose findings it cannot decide.

Why: a reduced precision moves every score a little (bf16 by about 0.01, NNCF INT8 by about 0.05 on the
demo model near its thresholds). A detection whose FP32 score lies closer to its class's threshold than
that can change sides: a finding lost or a new one, which the gate refuses. No choice of layers kept in
float removes this (measured on the demo: the heads in f32 under bf16 still made a new finding, because the
perturbation comes from the backbone), and there is always some detection closer to the threshold than
any perturbation. What can be bounded is *where* the reduced precision is trusted.

How: every frame runs at the reduced precision. A frame where any detection scores within ``band`` of its
class's threshold (the bundle's operating point, or :data:`~.gate.DEFAULT_FINDING_SCORE`), or whose
detections fill the bundle's ``detections_per_img`` down to within ``band`` of a threshold, is run again at
FP32 and FP32's detections replace the reduced precision's for that frame; the outputs' ``rechecked``
marks those frames, and each one's result says ``"precision": "fp32"``. A frame's findings can then
differ from FP32's only through a detection whose score moved by ``band`` or more, which the gate still
checks on the device (the gate's criteria are unchanged; it compares what is served). The cost is the
share of frames re-checked times FP32's time; it depends on the data and is measured by the gate
(``recheck_rate``).

``band`` per precision (:data:`DEFAULT_BANDS`): about twice the 99th percentile of the score change of
detections near a threshold, measured on the calibration phantoms (``tools/make_phantoms.py --seed
200000``), which the held-out phantoms the gate uses do not share (docs/openvino.md). ``0`` switches the
re-check off (the reduced precision alone, as before).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from retinaedge.runtime.backends.base import Backend
from retinaedge.runtime.backends.openvino.gate import DEFAULT_FINDING_SCORE
from retinaedge.runtime.detections import OUTPUT_NAMES, RECHECKED_OUTPUT
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.operating_point import OperatingPoint

log = logging.getLogger(__name__)

#: The re-check band per reduced precision (score units; see the module docstring).
DEFAULT_BANDS: dict[str, float] = {"bf16": 0.05, "int8": 0.1}


def recheck_band(precision: str, setting: float | None) -> float:
    """The band for ``precision``: the setting when given (``0``: no re-check), else the default."""
    if setting is None:
        return DEFAULT_BANDS.get(precision, 0.0)
    band = float(setting)
    if not 0.0 <= band < 1.0:
        raise ConfigError(f"the re-check band must be in [0, 1), got {setting!r}")
    return band


def class_thresholds(class_names: Sequence[str], point: OperatingPoint | None) -> np.ndarray:
    """Threshold per label (``len(class_names) + 1`` entries, the last for an unknown label: never a
    finding, never re-checked): the operating point's, or the default finding score without one."""
    if point is None:
        known = [DEFAULT_FINDING_SCORE] * len(class_names)
    else:
        known = [float(point.score_thresholds.get(name, np.inf)) for name in class_names]
    return np.array([*known, np.inf], np.float64)


def undecided(
    outputs: Mapping[str, np.ndarray], thresholds: np.ndarray, band: float, cap: int | None = None
) -> np.ndarray:
    """Per frame of ``outputs`` (the contract outputs of a batch): True when one of its detections scores
    within ``band`` of its class's threshold (``|score - threshold| < band``), or when the frame holds
    ``cap`` detections (the bundle's ``detections_per_img``) and the lowest of them scores within ``band``
    of the lowest threshold or above it: the cap then decides which detections are kept, and a small
    change of scores can drop a finding from the list or let a new one in."""
    counts = np.asarray(outputs["num_detections"]).reshape(-1)
    scores = np.asarray(outputs["scores"], np.float64)
    labels = np.asarray(outputs["labels"])
    out = np.zeros(counts.shape[0], bool)
    if band <= 0.0:
        return out
    last = thresholds.shape[0] - 1
    lowest = float(np.min(thresholds))
    for i, n in enumerate(counts):
        n = int(n)
        if n <= 0:
            continue
        lab = labels[i, :n]
        lab = np.where((lab < 0) | (lab > last), last, lab)
        out[i] = bool(np.any(np.abs(scores[i, :n] - thresholds[lab]) < band))
        if cap is not None and n >= cap and float(np.min(scores[i, :n])) > lowest - band:
            out[i] = True
    return out


def splice(
    fast: Mapping[str, np.ndarray], again: Mapping[str, np.ndarray], frames: np.ndarray
) -> dict[str, np.ndarray]:
    """``fast``'s outputs with the rows of ``frames`` (indices) replaced by ``again``'s, in order; the
    detection axis is padded to the wider of the two (boxes 0, scores 0, labels -1)."""
    width = max(int(fast["scores"].shape[1]), int(again["scores"].shape[1]))
    pads = {"boxes": 0.0, "scores": 0.0, "labels": -1}

    def widen(name: str, arr: np.ndarray) -> np.ndarray:
        if name == "num_detections" or arr.shape[1] == width:
            return np.array(arr, copy=True)
        shape = (arr.shape[0], width, *arr.shape[2:])
        wide = np.full(shape, pads[name], dtype=arr.dtype)
        wide[:, : arr.shape[1]] = arr
        return wide

    out = {name: widen(name, np.asarray(fast[name])) for name in OUTPUT_NAMES}
    for name in OUTPUT_NAMES:
        out[name][frames] = widen(name, np.asarray(again[name])).astype(out[name].dtype)
    return out


class RecheckedBackend(Backend):
    """``fast`` (bf16 or INT8) with ``reference`` (FP32) re-running the undecided frames (module
    docstring). Owns both once served (``close`` closes them); :meth:`release_fast` closes only ``fast``
    (a candidate not chosen: the reference is shared). ``frames``/``rechecked`` count what ran."""

    name = "openvino"

    def __init__(
        self, fast: Any, reference: Any, thresholds: np.ndarray, band: float, cap: int | None = None
    ) -> None:
        self.fast, self.reference = fast, reference
        self.thresholds, self.band, self.cap = thresholds, float(band), cap
        self.precision = str(fast.precision)
        self.providers = (*tuple(fast.providers), "fp32 re-check")
        self.details: dict[str, Any] = fast.details
        self.frames = 0
        self.rechecked = 0
        self._lock = threading.Lock()

    def reset_counts(self) -> None:
        with self._lock:
            self.frames = self.rechecked = 0

    @property
    def rate(self) -> float | None:
        """The share of frames re-checked so far (None before any frame)."""
        return self.rechecked / self.frames if self.frames else None

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs: dict[str, np.ndarray] = self.fast.infer(images)
        which = np.flatnonzero(undecided(outputs, self.thresholds, self.band, self.cap))
        with self._lock:
            self.frames += int(images.shape[0])
            self.rechecked += int(which.size)
        rechecked = np.zeros(int(images.shape[0]), bool)
        rechecked[which] = True
        if which.size == 0:
            return {**outputs, RECHECKED_OUTPUT: rechecked}
        again = self.reference.infer(np.ascontiguousarray(images[which]))
        return {**splice(outputs, again, which), RECHECKED_OUTPUT: rechecked}

    def describe(self) -> dict[str, Any]:
        facts = dict(self.fast.describe())
        facts["recheck"] = {
            "band": self.band,
            "reference": "fp32",
            "frames": self.frames,
            "rechecked": self.rechecked,
        }
        return facts

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.fast.settings)

    @property
    def model_path(self) -> Any:
        return self.fast.model_path

    def release_fast(self) -> None:
        self.fast.close()

    def close(self) -> None:
        self.fast.close()
        self.reference.close()
