"""Build options: impossible requests are refused with a message naming the problem, never rewritten."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from retinaedge.runtime.backends.tensorrt.errors import BuildOptionsError
from retinaedge.runtime.backends.tensorrt.fingerprint import DeviceCapabilities, DeviceFingerprint
from retinaedge.runtime.backends.tensorrt.loaders import plan_engine
from retinaedge.runtime.backends.tensorrt.options import BuildOptions, ModelFacts, inspect_onnx
from retinaedge.runtime.bundle import load_bundle
from support.paths import DEMO

ORIN = DeviceFingerprint.from_values(
    gpu_name="Orin", compute_capability="8.7", sm_count=16, tensorrt="10.3.0", cuda="12.6", dla_cores=2
)
X86 = DeviceFingerprint.from_values(
    gpu_name="GeForce GTX 1050", compute_capability="6.1", sm_count=5, tensorrt="10.13.3", cuda="12.9"
)
TRT10_3 = DeviceCapabilities.for_tensorrt("10.3.0", fast_fp16=True, fast_int8=True)
TRT10_13_NO_FAST = DeviceCapabilities.for_tensorrt("10.13.3", fast_fp16=False, fast_int8=False)
TRT11 = DeviceCapabilities.for_tensorrt("11.0.0", fast_fp16=False, fast_int8=False)
PLAIN = ModelFacts(has_qdq=False, has_fp16=False, has_plugin_variant=True)
QDQ = ModelFacts(has_qdq=True, has_fp16=False, has_plugin_variant=True)


@pytest.mark.parametrize(
    "options, words",
    [
        (BuildOptions(precision="bf16"), "precision must be one of"),
        (BuildOptions(nms="efficient"), "nms flavour must be one of"),
        (BuildOptions(batch_min=4, batch_opt=2, batch_max=8), "min=4 opt=2 max=8"),
        (BuildOptions(batch_min=0), "1 <= min"),
        (BuildOptions(workspace_mib=0), "at least 1 MiB"),
        (BuildOptions(dla_core=-1, precision="fp16"), "DLA core must be >= 0"),
        (BuildOptions(dla_core=0, precision="fp32"), "DLA runs only FP16 and INT8"),
    ],
)
def test_invalid_anywhere(options: BuildOptions, words: str) -> None:
    with pytest.raises(BuildOptionsError, match=words.replace("(", r"\(")):
        options.validate()


@pytest.mark.parametrize(
    "options, fingerprint, caps, facts, words",
    [
        (BuildOptions(precision="fp16", dla_core=2), ORIN, TRT10_3, PLAIN, r"DLA core 2 requested but Orin has 2 DLA core\(s\), 0\.\.1"),
        (BuildOptions(precision="fp16", dla_core=0), X86, TRT10_13_NO_FAST, PLAIN, "GeForce GTX 1050 has no DLA"),
        (BuildOptions(precision="fp16"), X86, TRT10_13_NO_FAST, PLAIN, "has no fast FP16"),
        (BuildOptions(precision="fp16"), X86, TRT11, PLAIN, "no FP16 builder flag"),
        (BuildOptions(precision="int8"), ORIN, TRT10_3, PLAIN, "needs a model with Q/DQ nodes"),
        (BuildOptions(precision="int8"), X86, TRT10_13_NO_FAST, QDQ, "has no fast INT8"),
        (BuildOptions(precision="fp32"), ORIN, TRT10_3, QDQ, "carries Q/DQ nodes"),
        (BuildOptions(), ORIN, TRT10_3, dataclasses.replace(PLAIN, has_plugin_variant=False), "--trt-plugin"),
    ],
    ids=["dla-core-absent", "no-dla", "fp16-not-fast", "fp16-trt11-fp32-graph", "int8-no-qdq",
         "int8-not-fast", "fp32-on-qdq", "auto-nms-needs-plugin"],
)  # fmt: skip
def test_refused_for_this_device_or_model(
    options: BuildOptions,
    fingerprint: DeviceFingerprint,
    caps: DeviceCapabilities,
    facts: ModelFacts,
    words: str,
) -> None:
    before = dataclasses.asdict(options)
    with pytest.raises(BuildOptionsError, match=words):
        options.validate_against(fingerprint, caps, facts)
    assert dataclasses.asdict(options) == before


def test_accepted_combinations_and_nms_flavour_by_version() -> None:
    assert BuildOptions(precision="fp16", dla_core=1).validate_against(ORIN, TRT10_3, PLAIN) == "plugin"
    assert BuildOptions(precision="int8").validate_against(ORIN, TRT10_3, QDQ) == "plugin"
    trt_10_13 = DeviceCapabilities.for_tensorrt("10.13.3", fast_fp16=True, fast_int8=True)
    assert BuildOptions(precision="fp16").validate_against(X86, trt_10_13, PLAIN) == "builtin"
    assert BuildOptions(nms="plugin").validate_against(X86, trt_10_13, PLAIN) == "plugin"
    assert BuildOptions(nms="builtin").validate_against(ORIN, TRT10_3, PLAIN) == "builtin"
    fp16_graph = dataclasses.replace(PLAIN, has_fp16=True)
    assert BuildOptions(precision="fp16").validate_against(X86, TRT11, fp16_graph) == "builtin"
    assert TRT11.strongly_typed_only and not TRT10_3.strongly_typed_only


def _tiny_model(path: Path, *, qdq: bool, fp16: bool) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes, inits = [], []
    if qdq:
        inits += [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.int8), "z")]  # fmt: skip
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]  # fmt: skip
    elif fp16:
        inits.append(numpy_helper.from_array(np.ones(4, np.float16), "h"))
        nodes += [helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
                  helper.make_node("Mul", ["xh", "h"], ["yh"]),
                  helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT)]  # fmt: skip
    else:
        nodes.append(helper.make_node("Identity", ["x"], ["y"]))
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits)), str(path))
    return path


def test_inspect_onnx_finds_qdq_and_float16(tmp_path: Path) -> None:
    plain = inspect_onnx(_tiny_model(tmp_path / "p.onnx", qdq=False, fp16=False), plugin_variant=False)
    assert plain == ModelFacts(False, False, False)
    assert inspect_onnx(_tiny_model(tmp_path / "q.onnx", qdq=True, fp16=False), plugin_variant=True).has_qdq
    assert inspect_onnx(_tiny_model(tmp_path / "h.onnx", qdq=False, fp16=True), plugin_variant=False).has_fp16
    demo = inspect_onnx(DEMO / "model.onnx", plugin_variant=False)
    assert not demo.has_qdq and not demo.has_fp16


def test_plan_on_the_demo_bundle(tmp_path: Path) -> None:
    bundle = load_bundle(DEMO)
    trt_10_13 = DeviceCapabilities.for_tensorrt("10.13.3", fast_fp16=True, fast_int8=True)
    plan = plan_engine(bundle, BuildOptions(precision="fp16"), X86, trt_10_13)
    assert plan.onnx_path == bundle.model_path and plan.nms == "builtin"
    assert plan.onnx_sha256 == bundle.manifest.model_sha256
    with pytest.raises(BuildOptionsError, match=r"model.int8.qdq.onnx.*retinaedge quantize"):
        plan_engine(bundle, BuildOptions(precision="int8", nms="builtin"), X86, trt_10_13)
    # TensorRT 10.3 wants the plugin flavour, which the demo bundle was not exported with.
    with pytest.raises(BuildOptionsError, match="--trt-plugin"):
        plan_engine(bundle, BuildOptions(), ORIN, TRT10_3)
    copy = tmp_path / "demo"
    shutil.copytree(DEMO, copy)
    _tiny_model(copy / "model.int8.qdq.onnx", qdq=False, fp16=False)
    with pytest.raises(BuildOptionsError, match="Q/DQ"):
        plan_engine(load_bundle(copy), BuildOptions(precision="int8", nms="builtin"), X86, trt_10_13)


def test_build_verb_without_tensorrt_names_the_extra(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "retinaedge.runtime.cli",
            "build",
            "--model",
            str(DEMO),
            "--cache-dir",
            str(tmp_path / "engines"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert err["type"] == "missing-dependency"
    assert "TensorRT is not installed (pip install '.[trt]'" in err["message"]
    assert not (tmp_path / "engines").exists()


def test_build_verb_refuses_impossible_options_before_probing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "retinaedge.runtime.cli",
            "build",
            "--model",
            str(DEMO),
            "--dla-core",
            "0",
            "--cache-dir",
            str(tmp_path / "engines"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert err["type"] == "invalid-configuration" and "DLA runs only FP16 and INT8" in err["message"]


def test_plugin_flavour_is_held_to_its_measured_parity(tmp_path: Path) -> None:
    """EfficientNMS_TRT differs from torchvision by design; its engine is judged by what export measured."""
    from retinaedge.runtime.backends.tensorrt.loaders import PRECISION_CRITERIA, acceptance_criteria

    copy = tmp_path / "demo"
    shutil.copytree(DEMO, copy)
    _tiny_model(copy / "model.efficientnms_trt.onnx", qdq=False, fp16=False)
    parity = json.loads((copy / "parity.json").read_text())
    parity["efficientnms_trt"] = {"emulated_parity": {"totals": {"match_rate": 0.95}}}
    (copy / "parity.json").write_text(json.dumps(parity))
    bundle = load_bundle(copy)
    plugin_plan = plan_engine(bundle, BuildOptions(precision="fp16"), ORIN, TRT10_3)
    assert plugin_plan.nms == "plugin" and plugin_plan.onnx_path.name == "model.efficientnms_trt.onnx"
    assert acceptance_criteria(bundle, plugin_plan, "fp32")["min_match_rate"] == pytest.approx(0.93)
    assert acceptance_criteria(bundle, plugin_plan, "fp16") == PRECISION_CRITERIA["fp16"]
    builtin_plan = plan_engine(bundle, BuildOptions(nms="builtin"), ORIN, TRT10_3)
    assert acceptance_criteria(bundle, builtin_plan, "fp32") == PRECISION_CRITERIA["fp32"]


def test_build_verb_defaults_key_the_same_engine_as_the_service_defaults(tmp_path: Path) -> None:
    """`retinaedge build --model DIR` must leave the engine a default `retinaedge serve` looks up."""
    from retinaedge.runtime.backends.tensorrt.build_cli import options_from_args
    from retinaedge.runtime.backends.tensorrt.cache import cache_key
    from retinaedge.runtime.cli import build_parser
    from retinaedge.service.settings import load_settings

    args = build_parser().parse_args(["build", "--model", str(DEMO)])
    cli = options_from_args(args)
    service = load_settings(model=DEMO, data_dir=tmp_path).build_options()
    assert cache_key("ab" * 32, cli, X86) == cache_key("ab" * 32, service, X86)
    assert args.cache_dir == load_settings(model=DEMO).engine_cache_root
