"""The Python decode + NMS baseline gives the fused graph's detections, on real frames of the demo model
and on a biased test model whose NMS has hundreds of candidates to suppress."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from retinaedge.bench.graphs import write_heads_and_post
from retinaedge.bench.pypost import PostPlan, make_anchors, postprocess
from retinaedge.bench.worker import TappedBackend
from retinaedge.runtime.backends.onnxruntime import OnnxRuntimeBackend
from retinaedge.runtime.boxes import nms
from retinaedge.runtime.bundle import load_bundle
from retinaedge.runtime.detections import ImageDetections, split_outputs
from retinaedge.runtime.detector import Detector
from support.paths import DEMO, REPO_ROOT

# Frames with lesions of several classes, one without, and the JPEG 2000 instance.
FRAMES = ["study_01/IM0005.dcm", "study_01/IM0014.dcm", "study_01/IM0015.dcm", "study_01/IM0001.dcm"]


def assert_same_detections(fused: ImageDetections, python: ImageDetections) -> None:
    """Same count; every fused detection has a Python one with the same label, score within 1e-5 and
    box within 1e-3 px (matched one to one, so ties in score may come in either order)."""
    assert len(fused) == len(python), (len(fused), len(python))
    free = np.ones(len(python), bool)
    for box, score, label in zip(fused.boxes, fused.scores, fused.labels, strict=True):
        ok = (
            free
            & (python.labels == label)
            & (np.abs(python.scores - score) <= 1e-5)
            & (np.abs(python.boxes - box).max(axis=1) <= 1e-3)
        )
        assert ok.any(), f"no Python detection for label {label} score {score} box {box}"
        free[np.flatnonzero(ok)[0]] = False


def split_model(bundle_dir: Path, tmp: Path) -> tuple[object, object, PostPlan]:
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    heads, post = write_heads_and_post(
        bundle.model_path, tmp, anchors=sum(m.anchors.anchors_per_level), classes=m.num_classes
    )
    cpu = ["CPUExecutionProvider"]
    return (
        ort.InferenceSession(str(heads), providers=cpu),
        ort.InferenceSession(str(post), providers=cpu),
        PostPlan.from_manifest(m),
    )


@pytest.fixture(scope="module")
def demo_frames() -> np.ndarray:
    """The demo bundle's exact inputs for FRAMES (runtime decode + preprocess), ``(F, 1, 256, 256)``."""
    bundle = load_bundle(DEMO)
    tap = TappedBackend(OnnxRuntimeBackend(bundle.model_path, threads=1))
    with Detector(bundle, tap, batch_size=1) as detector:  # type: ignore[arg-type]
        for name in [*FRAMES, "compressed/study_01_IM0016_J2K.dcm"]:
            detector.detect(REPO_ROOT / "examples" / name)
    return np.concatenate(tap.batches)


def test_python_post_equals_the_fused_graph_on_real_frames(demo_frames: np.ndarray, tmp_path: Path) -> None:
    heads, post, plan = split_model(DEMO, tmp_path)
    fused = split_outputs(OnnxRuntimeBackend(DEMO / "model.onnx", threads=1).infer(demo_frames))
    logits, deltas = heads.run(["cls_logits", "bbox_regression"], {"images": demo_frames})
    python = postprocess(logits, deltas, plan)
    # The post-processing cut out of model.onnx gives the whole model's detections too.
    cut = split_outputs(
        dict(
            zip(
                ["num_detections", "boxes", "scores", "labels"],
                post.run(None, {"cls_logits": logits, "bbox_regression": deltas}),
                strict=True,
            )
        )
    )
    assert sum(len(d) for d in fused) >= 10 and len({int(x) for d in fused for x in d.labels}) >= 2
    for f, p, c in zip(fused, python, cut, strict=True):
        assert_same_detections(f, p)
        assert_same_detections(f, c)


@pytest.mark.export
def test_python_post_equals_the_fused_graph_when_nms_is_busy(small_bundle: Path, tmp_path: Path) -> None:
    """The biased ResNet-18 test model scores most anchors high: thousands of candidates, many kept."""
    from retinaedge.export.synthetic import synthetic_images_u8, to_float

    heads, _, plan = split_model(small_bundle, tmp_path)
    images = to_float(synthetic_images_u8(2, 3, 256, 320, seed=11))
    fused = split_outputs(OnnxRuntimeBackend(small_bundle / "model.onnx", threads=2).infer(images))
    logits, deltas = heads.run(["cls_logits", "bbox_regression"], {"images": images})
    python = postprocess(logits, deltas, plan)
    assert min(len(d) for d in fused) >= 50
    for f, p in zip(fused, python, strict=True):
        assert_same_detections(f, p)


def test_anchors_follow_torchvision_layout() -> None:
    plan = PostPlan.from_manifest(load_bundle(DEMO).manifest)
    anchors = plan.anchors
    assert anchors.shape == (12276, 4) and anchors.dtype == np.float32
    # First location of level 0 (stride 8, sizes 8/10/12, ratios 0.5/1/2), ratio-major: ratio 0.5 size 8
    # is w = 8/sqrt(.5) = 11.31, h = 8*sqrt(.5) = 5.66 -> round(+-5.66), round(+-2.83).
    assert anchors[0].tolist() == [-6.0, -3.0, 6.0, 3.0]
    assert anchors[3].tolist() == [-4.0, -4.0, 4.0, 4.0]  # ratio 1, size 8
    assert anchors[9].tolist() == [8 - 6.0, -3.0, 8 + 6.0, 3.0]  # next location: shifted by the stride in x
    assert make_anchors(load_bundle(DEMO).manifest.anchors).tobytes() == anchors.tobytes()


def test_nms_suppresses_above_the_threshold_only() -> None:
    boxes = np.array(
        [[0, 0, 10, 10], [0, 0, 10, 5], [1, 0, 11, 10], [20, 20, 30, 30], [5, 5, 5, 5]], np.float32
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32)
    # IoU(0,1) = 0.5 exactly: kept (only > 0.5 suppresses); IoU(0,2) = 90/110: suppressed; the empty box
    # has IoU NaN with everything and is kept, as in torchvision.
    assert nms(boxes, scores, 0.5).tolist() == [0, 1, 3, 4]
