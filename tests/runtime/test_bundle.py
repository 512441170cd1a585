"""Manifest validation and round trips, bundle integrity, detection matching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from retinaedge.runtime.backends.onnxruntime import OnnxRuntimeBackend
from retinaedge.runtime.boxes import pairwise_iou
from retinaedge.runtime.bundle import load_bundle, self_test
from retinaedge.runtime.detections import ImageDetections
from retinaedge.runtime.errors import BundleError, ConfigError, SelfTestError
from retinaedge.runtime.manifest import InputSpec, Manifest, PostprocessSpec, WindowPolicy
from retinaedge.runtime.matching import match_detections
from support.paths import DEMO


def test_manifest_round_trip(small_bundle: Path) -> None:
    m = load_bundle(small_bundle).manifest
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert m.postprocess == PostprocessSpec()  # torchvision's defaults when nothing was given
    assert m.anchors.anchors_per_level[0] == 32 * 40 * 9 and len(m.anchors.strides) == 5
    assert m.versions["torch"] and m.versions["onnxruntime"] and m.exporter["name"] == "retinaedge"


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        (InputSpec(height=100, width=128), "multiple of 32"),
        (InputSpec(height=128, width=128, channels=2), "channels"),
        (WindowPolicy(policy="fixed", center=40.0), "center and a width"),
        (WindowPolicy(policy="minmax", percentiles=(99.0, 1.0)), "percentiles"),
        (WindowPolicy(policy="auto"), "window policy"),
        (PostprocessSpec(score_thresh=1.0), "score threshold"),
        (PostprocessSpec(detections_per_img=0), "detections per image"),
    ],
)
def test_invalid_specs_are_refused(obj: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        obj.validate()  # type: ignore[attr-defined]


def test_bundle_integrity(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(DEMO, copy)
    with open(copy / "model.onnx", "r+b") as fh:  # flip one byte in the weights
        fh.seek(4096)
        byte = fh.read(1)
        fh.seek(4096)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="does not match the manifest"):
        load_bundle(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(copy)
    data = json.loads((DEMO / "manifest.json").read_text())
    data["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="no model.onnx"):
        load_bundle(copy)


def test_self_test_detects_wrong_golden(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(DEMO, copy)
    golden = json.loads((copy / "golden.json").read_text())
    golden["detections"][0]["labels"] = [(x + 1) % 3 for x in golden["detections"][0]["labels"]]
    (copy / "golden.json").write_text(json.dumps(golden))
    bundle = load_bundle(copy)
    with (
        OnnxRuntimeBackend(bundle.model_path) as backend,
        pytest.raises(SelfTestError, match="golden self-test"),
    ):
        self_test(backend, bundle)


def test_backend_rejects_wrong_input() -> None:
    with OnnxRuntimeBackend(DEMO / "model.onnx") as backend:
        with pytest.raises(ConfigError, match="float32"):
            backend.infer(np.zeros((1, 1, 256, 256), np.float64))  # the demo's input: 1x256x256
        with pytest.raises(ConfigError, match="does not fit"):
            backend.infer(np.zeros((1, 1, 256, 320), np.float32))
        with pytest.raises(ConfigError, match="does not fit"):
            backend.infer(np.zeros((1, 3, 256, 256), np.float32))
    with pytest.raises(ConfigError, match="not available"):
        OnnxRuntimeBackend(DEMO / "model.onnx", providers=["TensorrtExecutionProvider"])


def test_matching() -> None:
    a = ImageDetections.from_arrays(
        [[0, 0, 10, 10], [20, 20, 30, 30], [5, 0, 5, 9]], [0.9, 0.8, 0.7], [1, 1, 2]
    )
    b = ImageDetections.from_arrays(
        [[20, 20, 30, 30.05], [0, 0, 10, 10], [5, 0, 5, 9.001]], [0.8, 0.9004, 0.7], [1, 1, 2]
    )
    rep = match_detections(a, b)
    assert rep.matched == 3 and rep.match_rate == 1.0 and rep.max_score_delta == pytest.approx(4e-4, abs=1e-6)
    c = ImageDetections.from_arrays(
        [[0, 0, 10, 10], [20, 20, 30, 30], [5, 0, 5, 9]], [0.9, 0.8, 0.7], [0, 1, 2]
    )
    rep = match_detections(a, c)
    assert rep.matched == 2 and rep.unmatched_reference[0]["label"] == 1
    assert pairwise_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3]]))[0, 0] == pytest.approx(1 / 7)
    assert match_detections(ImageDetections.empty(), ImageDetections.empty()).match_rate == 1.0
