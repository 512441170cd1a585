"""A reduced precision served with an FP32 re-check of the frames it cannot decide (runtime/backends/
openvino/recheck.py): a frame with a detection within the band of its class's threshold is run again at
FP32 and FP32's detections replace the reduced precision's.

Behaviour only, with fake backends whose scores are set per frame (no speed, no CPU's numerics): a score
moved across a threshold by less than the band is re-checked and the gate passes; moved by more, the gate
still fails (its criteria are unchanged); a re-check that re-runs most frames is not served. The OpenVINO
test at the end checks only that what serves says how it ran.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from retinaedge.runtime.backends.base import Backend, BackendOptions
from retinaedge.runtime.backends.openvino.gate import GateResult, compare_findings
from retinaedge.runtime.backends.openvino.gating import Run, gate, gate_inputs, with_recheck
from retinaedge.runtime.backends.openvino.precision import MAX_RECHECK_RATE, decide
from retinaedge.runtime.backends.openvino.recheck import (
    DEFAULT_BANDS,
    RecheckedBackend,
    class_thresholds,
    recheck_band,
    splice,
    undecided,
)
from retinaedge.runtime.bundle import load_bundle
from retinaedge.runtime.detections import split_outputs
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.geometry import Letterbox
from retinaedge.runtime.instance_result import frame_result
from retinaedge.runtime.operating_point import OperatingPoint
from support.paths import DEMO

CLASSES = ("a", "b")
POINT = OperatingPoint({"a": 0.5, "b": 0.3})
THRESHOLDS = class_thresholds(CLASSES, POINT)


def _outputs(frames: list[list[tuple[int, float]]], width: int = 3) -> dict[str, np.ndarray]:
    """Contract outputs of a batch: per frame, (label, score) detections at boxes 10 px apart."""
    n = len(frames)
    out = {
        "num_detections": np.array([len(f) for f in frames], np.int32),
        "boxes": np.zeros((n, width, 4), np.float32),
        "scores": np.zeros((n, width), np.float32),
        "labels": np.full((n, width), -1, np.int32),
    }
    for i, dets in enumerate(frames):
        for j, (label, score) in enumerate(dets):
            out["boxes"][i, j] = [20 * j, 20 * j, 20 * j + 10, 20 * j + 10]
            out["scores"][i, j] = score
            out["labels"][i, j] = label
    return out


class Scripted(Backend):
    """A backend whose detections are scripted per frame; the frame's number is pixel [0, 0, 0]."""

    def __init__(self, frames: list[list[tuple[int, float]]], precision: str) -> None:
        self.frames, self.precision = frames, precision
        self.seen: list[int] = []
        self.providers = (f"scripted {precision}",)
        self.details: dict[str, Any] = {}
        self.settings: dict[str, Any] = {}
        self.model_path = Path("scripted")
        self.closed = False

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        which = [int(round(float(x))) for x in images[:, 0, 0, 0]]
        self.seen += which
        return _outputs([self.frames[k] for k in which])

    def describe(self) -> dict[str, Any]:
        return {"precision": self.precision}

    def close(self) -> None:
        self.closed = True


def _images(n: int) -> np.ndarray:
    images = np.zeros((n, 1, 4, 4), np.float32)
    images[:, 0, 0, 0] = np.arange(n)
    return images


def test_a_frame_is_undecided_when_a_detection_is_within_the_band_of_its_threshold() -> None:
    outputs = _outputs([[(0, 0.9)], [(0, 0.47)], [(1, 0.32), (0, 0.1)], [], [(5, 0.5)], [(1, 0.36)]])
    assert undecided(outputs, THRESHOLDS, 0.05).tolist() == [False, True, True, False, False, False]
    assert undecided(outputs, THRESHOLDS, 0.1).tolist() == [False, True, True, False, False, True]
    assert not undecided(outputs, THRESHOLDS, 0.0).any()  # band 0: the reduced precision alone
    padded = _outputs([[(0, 0.49)]])
    padded["num_detections"][:] = 0  # rows past num_detections are padding, never read
    assert not undecided(padded, THRESHOLDS, 0.05).any()
    assert class_thresholds(CLASSES, None).tolist() == [0.5, 0.5, np.inf]  # no operating point: 0.5
    # A frame that fills the cap (detections_per_img) down to near a threshold: the cap decides what is kept.
    full = _outputs([[(0, 0.9), (1, 0.8), (0, 0.34)], [(0, 0.9), (1, 0.8), (0, 0.1)], [(0, 0.9), (0, 0.34)]])
    assert undecided(full, THRESHOLDS, 0.05, cap=3).tolist() == [True, False, False]
    assert undecided(full, THRESHOLDS, 0.05).tolist() == [False, False, False]


def test_splice_replaces_the_rechecked_rows_and_pads_to_the_wider_output() -> None:
    fast = _outputs([[(0, 0.9)], [(0, 0.47)], [(1, 0.2)]], width=2)
    again = _outputs([[(0, 0.52), (1, 0.31), (1, 0.06)]], width=3)
    out = splice(fast, again, np.array([1]))
    assert out["scores"].shape == (3, 3) and out["boxes"].shape == (3, 3, 4)
    assert out["num_detections"].tolist() == [1, 3, 1]
    assert out["scores"][1].tolist() == pytest.approx([0.52, 0.31, 0.06])
    assert out["labels"][0].tolist() == [0, -1, -1] and out["scores"][0, 0] == pytest.approx(0.9)
    assert out["labels"][2].tolist() == [1, -1, -1]


def test_the_band_per_precision_and_its_setting() -> None:
    assert (
        recheck_band("bf16", None) == DEFAULT_BANDS["bf16"]
        and recheck_band("int8", None) == DEFAULT_BANDS["int8"]
    )
    assert recheck_band("int8", 0) == 0.0 and recheck_band("bf16", 0.2) == 0.2
    with pytest.raises(ConfigError, match="re-check band"):
        recheck_band("bf16", 1.5)


def test_undecided_frames_run_again_at_fp32_and_fp32_detections_serve() -> None:
    fp32 = Scripted([[(0, 0.9)], [(0, 0.51)], [(1, 0.1)], [(1, 0.31)]], "fp32")
    fast = Scripted([[(0, 0.88)], [(0, 0.48)], [(1, 0.12)], [(1, 0.34)]], "int8")
    served = RecheckedBackend(fast, fp32, THRESHOLDS, 0.05)
    got = split_outputs(served.infer(_images(4)))
    assert fp32.seen == [1, 3] and fast.seen == [0, 1, 2, 3]
    assert [float(d.scores[0]) for d in got] == pytest.approx([0.88, 0.51, 0.12, 0.31])
    assert [d.rechecked for d in got] == [False, True, False, True]
    assert (served.frames, served.rechecked, served.rate) == (4, 2, 0.5)
    # Each frame's result names the precision its detections came from when it is not the instance's.
    box = Letterbox.fit(8, 8, 8, 8)
    frames = [frame_result(CLASSES, i, "minmax", box, d, POINT).to_json() for i, d in enumerate(got)]
    assert [f.get("precision") for f in frames] == [None, "fp32", None, "fp32"]
    calm = split_outputs(served.infer(_images(1)))  # frame 0 again: decided at int8, nothing re-run
    assert not calm[0].rechecked
    assert served.precision == "int8" and served.describe()["recheck"]["rechecked"] == 2
    served.release_fast()  # a candidate not chosen: the shared FP32 model stays open
    assert fast.closed and not fp32.closed
    served.close()
    assert fp32.closed


def _gate(fast_scores: list[float], band: float) -> GateResult:
    """The gate on 4 frames of the demo bundle's classes: FP32 has one meningioma per frame at the scores
    below; the candidate moves them to ``fast_scores``."""
    bundle = load_bundle(DEMO)
    point = bundle.manifest.operating_point
    assert point is not None
    thr = point.score_thresholds["meningioma"]
    ref_scores = [0.9, thr + 0.01, thr - 0.01, 0.1]
    fp32 = Scripted([[(1, s)] for s in ref_scores], "fp32")
    fast = Scripted([[(1, s)] for s in fast_scores], "int8")
    images = _images(4)
    reference = Run(split_outputs(fp32.infer(images)), 10.0)
    thresholds = class_thresholds(bundle.manifest.class_names, point)
    candidate: Backend = RecheckedBackend(fast, fp32, thresholds, band) if band else fast
    return gate("int8", candidate, reference, bundle, images, None, 4)


def test_a_threshold_crossed_by_less_than_the_band_is_rechecked_and_the_gate_passes() -> None:
    bundle = load_bundle(DEMO)
    assert bundle.manifest.operating_point is not None
    thr = bundle.manifest.operating_point.score_thresholds["meningioma"]
    crossed = [0.88, thr - 0.02, thr + 0.02, 0.12]  # a finding lost and a new one, each by 0.03
    bare = _gate(crossed, 0.0)
    assert not bare.passed and len(bare.lost) == 1 and len(bare.new) == 1 and bare.recheck_rate is None
    rechecked = _gate(crossed, 0.05)
    assert rechecked.passed and rechecked.kept == rechecked.reference_findings == 2
    assert rechecked.recheck_band == 0.05 and rechecked.recheck_rate == 0.5
    assert rechecked.reduced_ms_per_frame is not None and rechecked.ms_per_frame is not None
    assert "fp32 re-check within 0.05" in rechecked.summary()


def test_a_score_moved_by_more_than_the_band_still_fails_the_gate() -> None:
    bundle = load_bundle(DEMO)
    assert bundle.manifest.operating_point is not None
    thr = bundle.manifest.operating_point.score_thresholds["meningioma"]
    far = [0.88, thr - 0.2, thr - 0.01, 0.12]  # the finding fell 0.21: outside the band, not re-checked
    result = _gate(far, 0.05)
    assert not result.passed and len(result.lost) == 1 and result.recheck_rate == 0.25


def test_recheck_figures_survive_the_record_and_the_band_is_part_of_the_gate_inputs() -> None:
    result = compare_findings("bf16", [], [], CLASSES, POINT)
    result.recheck_band, result.recheck_rate, result.reduced_ms_per_frame = 0.05, 0.0533, 4.2
    back = GateResult.from_dict(result.to_dict())
    assert (back.recheck_band, back.recheck_rate, back.reduced_ms_per_frame) == (0.05, 0.0533, 4.2)
    bundle = load_bundle(DEMO)
    assert gate_inputs(bundle, None, 0.05) != gate_inputs(bundle, None, 0.1) != gate_inputs(bundle, None)
    assert with_recheck(4.0, 0.1, 20.0) == 6.0 and with_recheck(4.0, None, 20.0) == 4.0


def test_a_recheck_that_reruns_most_frames_is_not_served_and_auto_prices_it() -> None:
    result = compare_findings("int8", [], [], CLASSES, POINT)
    result.recheck_band, result.recheck_rate, result.ms_per_frame = 0.1, MAX_RECHECK_RATE + 0.1, 9.0
    asked = decide("int8", {"bf16": None, "int8": None}, {"int8": result}, 10.0)
    assert asked.precision == "fp32" and asked.fallback and "re-ran more than 50%" in asked.reason
    result.recheck_rate = 0.05
    assert decide("int8", {"int8": None}, {"int8": result}, 10.0).precision == "int8"
    result.ms_per_frame = 12.0  # the reduced precision plus its re-check is slower than FP32
    assert decide("auto", {"int8": None}, {"int8": result}, 10.0).precision == "fp32"


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino")
def test_what_serves_says_its_recheck(tmp_path: Path) -> None:
    from retinaedge.runtime.backends.registry import open_backend

    def _open(**extra: Any) -> Any:
        options = BackendOptions(threads=2, extra={"cache_dir": tmp_path, "precision": "bf16", **extra})
        return open_backend("openvino", load_bundle(DEMO), options)

    with _open() as backend:
        gate_doc = backend.describe()["gates"].get("bf16")
        if gate_doc is None:  # this CPU does not offer bf16
            assert backend.precision == "fp32"
            return
        assert gate_doc["recheck_band"] == DEFAULT_BANDS["bf16"] and gate_doc["recheck_rate"] is not None
        if backend.precision == "bf16":
            assert isinstance(backend, RecheckedBackend)
            assert backend.describe()["recheck"]["band"] == DEFAULT_BANDS["bf16"]
            assert "fp32 re-check" in backend.providers
    with _open(recheck_band=0) as bare:
        bare_doc = bare.describe()["gates"]["bf16"]
        assert bare_doc["recheck_band"] == 0.0 and bare_doc["inputs"] != gate_doc["inputs"]
        assert not isinstance(bare, RecheckedBackend)
