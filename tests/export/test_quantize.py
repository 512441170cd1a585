"""retinaedge quantize on the demo bundle: a Q/DQ model from DICOM calibration frames, run in ONNX Runtime;
its accuracy check (AP50 drop against FP32 on annotated files, gated by a limit) and the int8 build's refusal
of a Q/DQ model that failed it.

The held-out figures (AP50 and speed on the phantoms of models/demo/MODEL_CARD.md) are measured by
tools/int8_report.py, not in a test; here the accuracy check runs on a few annotated example frames.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from retinaedge.export.quantize import AccuracyCheck, calibration_frames, quantize_bundle, spread
from retinaedge.runtime.backends.onnxruntime import OnnxRuntimeBackend
from retinaedge.runtime.backends.tensorrt.errors import BuildOptionsError
from retinaedge.runtime.backends.tensorrt.fingerprint import DeviceCapabilities, DeviceFingerprint
from retinaedge.runtime.backends.tensorrt.loaders import plan_engine
from retinaedge.runtime.backends.tensorrt.options import BuildOptions, inspect_onnx
from retinaedge.runtime.bundle import QDQ_MODEL_FILE, load_bundle, load_golden
from retinaedge.runtime.cli import main
from retinaedge.runtime.discovery import dicom_files
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.manifest import METADATA_KEY
from retinaedge.runtime.quantization_record import check_recorded_accuracy
from support.paths import DEMO, REPO_ROOT

STUDY = REPO_ROOT / "examples" / "study_01"
GROUND_TRUTH = REPO_ROOT / "examples" / "ground_truth.json"
#: Annotated example frames with every class (pituitary 4-7, glioma and meningioma 14-16).
EVAL_FILES = tuple(STUDY / f"IM{n:04d}.dcm" for n in (4, 5, 6, 7, 14, 15, 16))
FINGERPRINT = dict(gpu_name="RTX", compute_capability="8.9", sm_count=60, tensorrt="10.13.3", cuda="12.9")


def test_calibration_frames_skip_non_dicom_and_stop_at_the_cap(tmp_path: Path) -> None:
    for name in ("IM0014.dcm", "IM0015.dcm"):
        shutil.copy(STUDY / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not DICOM")  # no DICOM header: left out
    (tmp_path / "IM0099").write_bytes(
        bytes(128) + b"DICM truncated"
    )  # read, rejected by the runtime, skipped
    files = dicom_files([tmp_path])
    assert [f.name for f in files] == ["IM0014.dcm", "IM0015.dcm", "IM0099"]
    manifest = load_bundle(DEMO).manifest
    frames = list(calibration_frames(files, manifest, max_frames=10))
    shape = (1, manifest.input.channels, manifest.input.height, manifest.input.width)
    assert len(frames) == 2 and all(f.shape == shape and f.dtype == np.float32 for f in frames)
    assert 0.0 <= min(f.min() for f in frames) and max(f.max() for f in frames) <= 1.0
    assert len(list(calibration_frames(files, manifest, max_frames=1))) == 1
    many = [Path(f"f{i:02d}") for i in range(10)]
    assert spread(many, 20) == many and spread(many, 4) == [many[0], many[2], many[5], many[7]]
    with pytest.raises(ConfigError, match="does not exist"):
        dicom_files([tmp_path / "missing"])


def test_quantize_writes_a_qdq_model_onnxruntime_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bundle_dir = tmp_path / "demo"
    shutil.copytree(DEMO, bundle_dir)
    code = main(
        ["--log-level", "WARNING", "quantize",
         "--model", str(bundle_dir), "--calibration", str(STUDY), "--max-frames", "6", "--method", "minmax",
         "--keep-float", "backbone.body.0.*", "--keep-float", "*.fc?.weight", "--op-types", "Conv,Add"]
    )  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    report = json.loads(out.out.strip().splitlines()[-1])
    assert report["calibration_frames"] == 6 and report["qdq_nodes"] > 100
    qdq = bundle_dir / QDQ_MODEL_FILE
    model = onnx.load(str(qdq))
    zero_points = [i for i in model.graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)  # symmetric
    assert any(p.key == METADATA_KEY for p in model.metadata_props)
    assert inspect_onnx(qdq, plugin_variant=False).has_qdq
    saved = json.loads((bundle_dir / "quantization.json").read_text())
    assert saved["sha256"] == report["sha256"] and "accuracy" not in saved and saved["conv_outputs"] is False
    conv_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Conv"}
    activated = {n.input[0] for n in model.graph.node if n.op_type in ("Relu", "HardSwish")} & conv_outputs
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert activated and not activated & quantized  # Conv -> ReLU/HardSwish: quantized after the activation
    assert saved["keep_float"] == ["backbone.body.0.*", "*.fc?.weight"] and saved["op_types"] == [
        "Conv",
        "Add",
    ]
    float_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1}
    assert "backbone.body.0.0.weight" in float_weights  # the first conv reads its float weight directly
    assert "backbone.body.4.block.2.fc1.weight" in float_weights  # and so do the SE blocks
    assert "backbone.body.1.block.0.0.weight" not in float_weights  # the next conv reads a DequantizeLinear
    assert len(saved["kept_float"]) == 10 + 1 + 2 * 8  # heads' output convs, first conv, SE fc1/fc2
    assert any(
        n.op_type == "Add" and n.input[0].endswith("DequantizeLinear_Output") for n in model.graph.node
    )
    bundle = load_bundle(bundle_dir)
    images, _, _ = load_golden(bundle)
    with OnnxRuntimeBackend(qdq) as backend:
        out = backend.infer(images)
    assert out["boxes"].shape == (len(images), 300, 4) and out["num_detections"].shape == (len(images),)
    fingerprint = DeviceFingerprint.from_values(**FINGERPRINT)
    caps = DeviceCapabilities.for_tensorrt("10.13.3", fast_fp16=True, fast_int8=True)
    plan = plan_engine(bundle, BuildOptions(precision="int8"), fingerprint, caps)  # unmeasured: allowed
    assert plan.onnx_path == qdq and plan.nms == "builtin" and plan.facts.has_qdq
    # a record that does not describe the Q/DQ file (re-quantized or replaced since) is refused
    record = bundle_dir / "quantization.json"
    record.write_text(json.dumps({**saved, "sha256": "0" * 64}))
    with pytest.raises(BuildOptionsError, match="sha256 differs"):
        plan_engine(bundle, BuildOptions(precision="int8"), fingerprint, caps)
    record.unlink()
    with pytest.raises(ConfigError, match="no quantization.json"):
        check_recorded_accuracy(bundle_dir)


def test_quantize_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="calibration method"):
        quantize_bundle(DEMO, [STUDY], method="kl")
    empty = tmp_path / "empty"
    empty.mkdir()
    bundle_dir = tmp_path / "demo"
    shutil.copytree(DEMO, bundle_dir)
    with pytest.raises(ConfigError, match="no DICOM files"):
        quantize_bundle(bundle_dir, [empty])
    with pytest.raises(ConfigError, match="op types"):
        quantize_bundle(bundle_dir, [STUDY], op_types=["Conv", "Softmax"])
    with pytest.raises(ConfigError, match="matches no node"):
        quantize_bundle(bundle_dir, [STUDY], max_frames=1, keep_float=["backbone.body.99.*"])
    with pytest.raises(ConfigError, match="within 0..1"):
        quantize_bundle(bundle_dir, [STUDY], accuracy=AccuracyCheck(GROUND_TRUTH, EVAL_FILES, 1.5))
    assert not (bundle_dir / QDQ_MODEL_FILE).exists()


def _spoil_activation_scales(monkeypatch: pytest.MonkeyPatch, factor: float = 1e4) -> list[str]:
    """Make every Q/DQ model quantize written in this test degraded on purpose, whatever the CPU: each
    QuantizeLinear's scale (shared with its DequantizeLinear) is multiplied by ``factor``, so every
    quantized activation rounds to exactly 0 and the detections no longer depend on the image. Wraps
    ONNX Runtime's ``quantize_static`` (which quantize imports when it runs), so the real quantizer still
    writes the model; only its scales are spoilt afterwards. Returns the list of models spoilt, for the test
    to check the wrapper was used (a module-level import of quantize_static would bypass it)."""
    import onnxruntime.quantization as ortq

    real = ortq.quantize_static
    spoilt_models: list[str] = []

    def spoiling(model_input: str, model_output: str, *args: object, **kwargs: object) -> None:
        real(model_input, model_output, *args, **kwargs)
        model = onnx.load(model_output)
        scales = {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear"}
        for init in model.graph.initializer:
            if init.name in scales:
                spoilt = onnx.numpy_helper.to_array(init) * np.float32(factor)
                init.CopyFrom(onnx.numpy_helper.from_array(spoilt.astype(np.float32), init.name))
        onnx.save(model, model_output)
        spoilt_models.append(str(model_output))

    monkeypatch.setattr(ortq, "quantize_static", spoiling)
    return spoilt_models


def test_accuracy_gate_marks_a_degraded_qdq_model_and_int8_builds_refuse_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Q/DQ model degraded on purpose (activation scales spoilt after quantization, see
    :func:`_spoil_activation_scales`: independent of the CPU's integer kernels) loses AP50 on the annotated
    frames; with --max-ap50-drop 0.1 quantize exits 1, records the figures and ``accepted: false``, and an
    int8 build plan refuses the model. --quantize-conv-outputs puts a QuantizeLinear on Conv outputs and
    is recorded."""
    spoilt = _spoil_activation_scales(monkeypatch)
    bundle_dir = tmp_path / "demo"
    shutil.copytree(DEMO, bundle_dir)
    caplog.set_level(logging.WARNING)
    code = main(
        ["--log-level", "WARNING", "quantize",
         "--model", str(bundle_dir), "--calibration", str(STUDY / "IM0001.dcm"), "--max-frames", "1",
         "--method", "minmax", "--annotations", str(GROUND_TRUTH), "--eval", *map(str, EVAL_FILES),
         "--max-ap50-drop", "0.1", "--quantize-conv-outputs"]
    )  # fmt: skip
    out = capsys.readouterr()
    assert spoilt == [str(bundle_dir / QDQ_MODEL_FILE)]  # the degradation did happen
    assert code == 1, out.err[-3000:]
    assert "NOT accepted" in caplog.text
    report = json.loads(out.out.strip().splitlines()[-1])
    saved = json.loads((bundle_dir / "quantization.json").read_text())
    assert saved["accepted"] is False and report["accuracy"] == saved["accuracy"]
    accuracy = saved["accuracy"]
    assert accuracy["frames"] == len(EVAL_FILES) and accuracy["max_ap50_drop"] == 0.1
    assert saved["conv_outputs"] is True
    model = onnx.load(str(bundle_dir / QDQ_MODEL_FILE))
    conv_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Conv"}
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert conv_outputs & quantized  # the QLinearConv placement: Conv -> Q
    assert accuracy["map50"]["fp32"] > 0.5  # the FP32 model does find the tumours on these frames
    assert accuracy["map50"]["drop"] > 0.1 and accuracy["passed"] is False
    assert accuracy["map50"]["fp32"] - accuracy["map50"]["int8"] == pytest.approx(
        accuracy["map50"]["drop"], abs=1e-4
    )
    assert set(accuracy["ap50_per_class"]) == {"glioma", "meningioma", "pituitary"}
    fingerprint = DeviceFingerprint.from_values(**FINGERPRINT)
    caps = DeviceCapabilities.for_tensorrt("10.13.3", fast_fp16=True, fast_int8=True)
    with pytest.raises(BuildOptionsError, match="failed its accuracy check"):
        plan_engine(load_bundle(bundle_dir), BuildOptions(precision="int8"), fingerprint, caps)
    assert plan_engine(load_bundle(bundle_dir), BuildOptions(precision="fp16"), fingerprint, caps)


def test_engine_validation_accepts_a_faithful_backend_and_refuses_int8_drift(tmp_path: Path) -> None:
    """The acceptance step a fresh engine goes through, run with ONNX Runtime backends standing as
    candidates: the FP32 model passes it; the Q/DQ model, judged by FP32 criteria, does not."""
    from retinaedge.runtime.backends.tensorrt.loaders import (
        PRECISION_CRITERIA,
        compare_backends,
        validate_engine,
    )
    from retinaedge.runtime.errors import SelfTestError

    bundle_dir = tmp_path / "demo"
    shutil.copytree(DEMO, bundle_dir)
    check = AccuracyCheck(GROUND_TRUTH, EVAL_FILES[:2], max_ap50_drop=1.0)
    report = quantize_bundle(bundle_dir, [STUDY], max_frames=6, method="minmax", accuracy=check)
    assert report.accepted is True and report.accuracy is not None and report.accuracy["frames"] == 2
    assert check_recorded_accuracy(bundle_dir)["accuracy"]["passed"] is True
    bundle = load_bundle(bundle_dir)
    fingerprint = DeviceFingerprint.from_values(**FINGERPRINT)
    caps = DeviceCapabilities.for_tensorrt("10.13.3", fast_fp16=True, fast_int8=True)
    plan = plan_engine(bundle, BuildOptions(precision="fp32"), fingerprint, caps)
    with OnnxRuntimeBackend(bundle.model_path) as fp32:
        result = validate_engine(fp32, bundle, plan, "fp32")
        assert result["golden"] == [1.0, 1.0] and result["versus_onnxruntime"] == [1.0, 1.0]
        images, _, _ = load_golden(bundle)
        with OnnxRuntimeBackend(bundle_dir / QDQ_MODEL_FILE) as int8:
            with pytest.raises(SelfTestError, match="reproduces"):
                compare_backends(int8, fp32, images, PRECISION_CRITERIA["fp32"])
