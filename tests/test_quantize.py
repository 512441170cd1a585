"""retinaedge quantize on the demo bundle: a Q/DQ model from DICOM calibration frames, run in ONNX Runtime.

Accuracy (AP50 against FP32 on held-out phantoms) and speed are measured elsewhere (not in a test).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from retinaedge.device.buildopts import BuildOptions, inspect_onnx
from retinaedge.device.fingerprint import DeviceCapabilities, DeviceFingerprint
from retinaedge.runtime.bundle import QDQ_MODEL_FILE, load_bundle, load_golden
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.manifest import METADATA_KEY
from retinaedge.runtime.onnxrt import OnnxRuntimeBackend
from retinaedge.runtime.quantize import calibration_files, calibration_frames, quantize_bundle
from retinaedge.service.engines import plan_engine

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
STUDY = ROOT / "examples" / "study_01"


def test_calibration_frames_skip_non_dicom_and_stop_at_the_cap(tmp_path: Path) -> None:
    for name in ("IM0014.dcm", "IM0015.dcm"):
        shutil.copy(STUDY / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not DICOM")
    files = calibration_files([tmp_path])
    assert len(files) == 3
    manifest = load_bundle(DEMO).manifest
    frames = list(calibration_frames(files, manifest, max_frames=10))
    shape = (1, manifest.input.channels, manifest.input.height, manifest.input.width)
    assert len(frames) == 2 and all(f.shape == shape and f.dtype == np.float32 for f in frames)
    assert 0.0 <= min(f.min() for f in frames) and max(f.max() for f in frames) <= 1.0
    assert len(list(calibration_frames(files, manifest, max_frames=1))) == 1
    with pytest.raises(ConfigError, match="does not exist"):
        calibration_files([tmp_path / "missing"])


def test_quantize_writes_a_qdq_model_onnxruntime_runs(tmp_path: Path) -> None:
    bundle_dir = tmp_path / "demo"
    shutil.copytree(DEMO, bundle_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "retinaedge.runtime.cli", "--log-level", "WARNING", "quantize",
         "--model", str(bundle_dir), "--calibration", str(STUDY), "--max-frames", "6", "--method", "minmax"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["calibration_frames"] == 6 and report["qdq_nodes"] > 100
    qdq = bundle_dir / QDQ_MODEL_FILE
    model = onnx.load(str(qdq))
    zero_points = [i for i in model.graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)  # symmetric
    assert any(p.key == METADATA_KEY for p in model.metadata_props)
    assert inspect_onnx(qdq, plugin_variant=False).has_qdq
    saved = json.loads((bundle_dir / "quantization.json").read_text())
    assert saved["sha256"] == report["sha256"] and saved["kept_float"]
    bundle = load_bundle(bundle_dir)
    images, _, _ = load_golden(bundle)
    with OnnxRuntimeBackend(qdq) as backend:
        out = backend.infer(images)
    assert out["boxes"].shape == (len(images), 300, 4) and out["num_detections"].shape == (len(images),)
    fingerprint = DeviceFingerprint.from_values(
        gpu_name="RTX", compute_capability="8.9", sm_count=60, tensorrt="10.13.3", cuda="12.9"
    )
    caps = DeviceCapabilities.for_tensorrt("10.13.3", fast_fp16=True, fast_int8=True)
    plan = plan_engine(bundle, BuildOptions(precision="int8"), fingerprint, caps)
    assert plan.onnx_path == qdq and plan.nms == "builtin" and plan.facts.has_qdq


def test_quantize_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="calibration method"):
        quantize_bundle(DEMO, [STUDY], method="kl")
    empty = tmp_path / "empty"
    empty.mkdir()
    bundle_dir = tmp_path / "demo"
    shutil.copytree(DEMO, bundle_dir)
    with pytest.raises(ConfigError, match="no usable calibration frame"):
        quantize_bundle(bundle_dir, [empty])


def test_engine_validation_accepts_a_faithful_backend_and_refuses_int8_drift(tmp_path: Path) -> None:
    """The acceptance step a fresh engine goes through, run with ONNX Runtime backends standing as
    candidates: the FP32 model passes it; the Q/DQ model, judged by FP32 criteria, does not."""
    from retinaedge.runtime.errors import SelfTestError
    from retinaedge.service.engines import PRECISION_CRITERIA, compare_backends, validate_engine

    bundle_dir = tmp_path / "demo"
    shutil.copytree(DEMO, bundle_dir)
    quantize_bundle(bundle_dir, [STUDY], max_frames=6, method="minmax")
    bundle = load_bundle(bundle_dir)
    fingerprint = DeviceFingerprint.from_values(
        gpu_name="RTX", compute_capability="8.9", sm_count=60, tensorrt="10.13.3", cuda="12.9"
    )
    caps = DeviceCapabilities.for_tensorrt("10.13.3", fast_fp16=True, fast_int8=True)
    plan = plan_engine(bundle, BuildOptions(precision="fp32"), fingerprint, caps)
    with OnnxRuntimeBackend(bundle.model_path) as fp32:
        result = validate_engine(fp32, bundle, plan, "fp32")
        assert result["golden"] == [1.0, 1.0] and result["versus_onnxruntime"] == [1.0, 1.0]
        images, _, _ = load_golden(bundle)
        with OnnxRuntimeBackend(bundle_dir / QDQ_MODEL_FILE) as int8:
            with pytest.raises(SelfTestError, match="reproduces"):
                compare_backends(int8, fp32, images, PRECISION_CRITERIA["fp32"])
