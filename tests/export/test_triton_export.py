"""``retinaedge export-triton``: the repository's ``config.pbtxt`` read back as Triton's own ``ModelConfig``
protobuf (shipped in tritonclient), the model files checked by sha256, TensorRT engines taken from a real
engine cache. No server here: tests/runtime/backends/test_triton_serving.py loads the python variant in a
real tritonserver.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from retinaedge.runtime.cli import main
from retinaedge.runtime.hashing import sha256_file
from support.engines import FAKE_ENGINE
from support.paths import DEMO

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

NAME = "retinaedge-demo-brainmr"


def export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    """``retinaedge export-triton ARGS`` in-process -> (exit status, the JSON object it printed)."""
    capsys.readouterr()
    code = main(["export-triton", *args])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def parse(config: Path) -> Any:
    return text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())


def demo_manifest() -> dict[str, Any]:
    return dict(json.loads((DEMO / "manifest.json").read_text()))


def test_onnxruntime_repository_parses_as_model_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = export(
        capsys, "--model", str(DEMO), "--out", str(tmp_path), "--max-batch", "8", "--instances", "2"
    )
    assert code == 0 and report["model"] == NAME
    cfg = parse(tmp_path / NAME / "config.pbtxt")
    assert cfg.name == NAME and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] == [
        (2, "KIND_GPU")
    ]
    (images,) = cfg.input
    assert images.name == "images" and images.data_type == model_config_pb2.TYPE_FP32
    assert list(images.dims) == [1, 256, 256]  # the batch dimension is Triton's (max_batch_size > 0)
    outputs = {o.name: o for o in cfg.output}
    assert list(outputs) == ["num_detections", "boxes", "scores", "labels"]
    num = outputs["num_detections"]
    assert list(num.dims) == [1] and num.HasField("reshape") and list(num.reshape.shape) == []
    assert num.data_type == model_config_pb2.TYPE_INT32
    assert list(outputs["boxes"].dims) == [300, 4] and list(outputs["labels"].dims) == [300]
    assert outputs["labels"].data_type == model_config_pb2.TYPE_INT32
    # the model Triton serves is the bundle's, byte for byte, and says so in its parameters
    manifest = demo_manifest()
    served = tmp_path / NAME / "1" / "model.onnx"
    assert sha256_file(served) == manifest["model_sha256"] == report["model_sha256"]
    assert cfg.parameters["retinaedge_model_sha256"].string_value == manifest["model_sha256"]
    assert json.loads(cfg.parameters["retinaedge_manifest"].string_value) == manifest
    assert not (tmp_path / NAME / "1" / "model.py").exists()


def test_python_variant_and_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = export(
        capsys,
        *("--model", str(DEMO), "--out", str(tmp_path), "--platform", "python", "--name", "demo-cpu"),
        *("--max-batch", "6", "--preferred-batch", "2,6", "--max-queue-delay-us", "500", "--threads", "1"),
    )
    assert code == 0 and report["kind"] == "KIND_CPU"
    cfg = parse(tmp_path / "demo-cpu" / "config.pbtxt")
    assert cfg.backend == "python" and not cfg.platform and cfg.name == "demo-cpu"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 6] and cfg.max_batch_size == 6
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.parameters["intra_op_threads"].string_value == "1"
    version = tmp_path / "demo-cpu" / "1"
    assert sha256_file(version / "model.onnx") == demo_manifest()["model_sha256"]
    assert "class TritonPythonModel" in (version / "model.py").read_text()
    # an existing model directory is kept unless --replace
    code, again = export(
        capsys, "--model", str(DEMO), "--out", str(tmp_path), "--platform", "python", "--name", "demo-cpu"
    )
    assert code == 2 and "--replace" in again["error"]["message"]
    assert not list(tmp_path.glob(".*staging"))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--max-batch", "4", "--preferred-batch", "8"], "outside 1..--max-batch"),
        (["--name", "../escape"], "not usable as a Triton model directory"),
        (["--platform", "tensorrt"], "needs --engine-cache"),
        (["--platform", "python", "--kind", "gpu"], "runs ONNX Runtime on the CPU"),
    ],
)
def test_bad_options_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], words: str
) -> None:
    code, report = export(capsys, "--model", str(DEMO), "--out", str(tmp_path / "repo"), *args)
    assert code == 2 and words in report["error"]["message"], report
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def _fingerprint(gpu: str, cc: str, dla: int = 0) -> Any:
    from retinaedge.runtime.backends.tensorrt.fingerprint import DeviceFingerprint

    return DeviceFingerprint.from_values(
        gpu_name=gpu, compute_capability=cc, sm_count=80, tensorrt="10.13.3", cuda="12.6", dla_cores=dla
    )


def test_tensorrt_repository_takes_engines_from_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from retinaedge.runtime.backends.tensorrt.cache import EngineCache
    from retinaedge.runtime.backends.tensorrt.options import BuildOptions

    cache = EngineCache(tmp_path / "engines")
    sha = sha256_file(DEMO / "model.onnx")
    ampere = b"A10 engine " + FAKE_ENGINE
    hopper = b"H100 engine " + FAKE_ENGINE
    fp16 = {"validation": {"criteria": {"iou_min": 0.9, "score_tol": 0.02, "min_match_rate": 0.9}}}
    fp32 = {"validation": {"criteria": {"iou_min": 0.99, "score_tol": 0.001, "min_match_rate": 0.99}}}
    cache.store(ampere, sha, BuildOptions(batch_opt=8, batch_max=8), _fingerprint("A10", "8.6"), extra=fp32)
    hopper_options = BuildOptions(precision="fp16", batch_opt=8, batch_max=16)
    cache.store(hopper, sha, hopper_options, _fingerprint("H100", "9.0"), extra=fp16)
    # not taken: a profile too small for --max-batch 8, a DLA engine, another model's engine
    cache.store(b"small", sha, BuildOptions(batch_min=1, batch_opt=4, batch_max=4), _fingerprint("L4", "8.9"))
    dla = BuildOptions(precision="fp16", dla_core=0, batch_min=1, batch_opt=8, batch_max=8)
    cache.store(b"dla", sha, dla, _fingerprint("Orin", "8.7", dla=2))
    cache.store(b"other", "0" * 64, BuildOptions(batch_max=8, batch_opt=8), _fingerprint("T4", "7.5"))

    out = tmp_path / "repo"
    args = [
        "--model",
        str(DEMO),
        "--out",
        str(out),
        "--platform",
        "tensorrt",
        "--engine-cache",
        str(cache.root),
    ]
    code, report = export(capsys, *args, "--max-batch", "8")
    assert code == 0, report
    cfg = parse(out / NAME / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 8
    assert dict(cfg.cc_model_filenames) == {"8.6": "model_sm86.plan", "9.0": "model_sm90.plan"}
    assert (out / NAME / "1" / "model_sm86.plan").read_bytes() == ampere
    assert (out / NAME / "1" / "model_sm90.plan").read_bytes() == hopper
    assert cfg.parameters["retinaedge_model_sha256"].string_value == sha
    # the loosest acceptance criteria of the engines: the appliance's golden self-test through Triton uses them
    criteria = json.loads(cfg.parameters["retinaedge_self_test_criteria"].string_value)
    assert criteria == fp16["validation"]["criteria"]
    engines = json.loads(cfg.parameters["retinaedge_engines"].string_value)
    assert engines["8.6"]["gpu"] == "A10" and engines["9.0"]["options"]["batch"] == [1, 8, 16]
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] == [
        (1, "KIND_GPU")
    ]

    # no engine admits --max-batch 32: refused, naming what the cache holds and how to build one
    code, refused = export(capsys, *args, "--max-batch", "32", "--replace")
    message = refused["error"]["message"]
    assert code == 2 and "no engine" in message and "batch 1-16" in message and "--batch 1,32,32" in message
    assert (out / NAME / "1" / "model_sm86.plan").is_file()  # the earlier export is untouched


def test_tensorrt_engine_changed_in_the_cache_is_not_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from retinaedge.runtime.backends.tensorrt.cache import EngineCache
    from retinaedge.runtime.backends.tensorrt.options import BuildOptions

    cache = EngineCache(tmp_path / "engines")
    entry = cache.store(
        FAKE_ENGINE,
        sha256_file(DEMO / "model.onnx"),
        BuildOptions(batch_opt=8, batch_max=8),
        _fingerprint("A10", "8.6"),
    )
    data = bytearray(entry.engine_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.engine_path.write_bytes(bytes(data))
    code, refused = export(
        capsys,
        *("--model", str(DEMO), "--out", str(tmp_path / "repo"), "--platform", "tensorrt"),
        *("--engine-cache", str(cache.root)),
    )
    assert code == 2 and "no engine" in refused["error"]["message"]
    assert not (tmp_path / "repo" / NAME).exists()


def test_boot_plans_no_engine_for_backend_triton(tmp_path: Path) -> None:
    """``retinaedge boot`` with backend=triton: no device probe, no engine planned, the decision recorded."""
    from retinaedge.runtime.bundle import load_bundle
    from retinaedge.service.boot_cli import BOOT_RECORD, decide
    from retinaedge.service.settings import load_settings

    def no_probe() -> Any:
        raise AssertionError("backend=triton must not probe the device for TensorRT")

    settings = load_settings(model=DEMO, data_dir=tmp_path / "data", backend="triton", triton_url="gpu:8001")
    report = decide(settings, [load_bundle(DEMO)], probe=no_probe)
    assert report.plan.decision == "backend-configured" and "backend=triton" in report.plan.reason
    assert json.loads((tmp_path / "data" / BOOT_RECORD).read_text())["decision"] == "backend-configured"
    assert settings.backend_extra("triton")["url"] == "gpu:8001"
