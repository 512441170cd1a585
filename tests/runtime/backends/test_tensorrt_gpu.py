"""TensorRT on a real GPU: build, run and parity with ONNX Runtime per precision (marked ``gpu``).

Skipped without TensorRT, pycuda and a CUDA device; required (strict xfail otherwise) with REQUIRE_GPU=1
(see conftest.py). Uses the demo bundle; INT8 first makes the Q/DQ model with ``retinaedge quantize`` on
the sample study.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.paths import DEMO, REPO_ROOT
from support.polling import poll

pytestmark = pytest.mark.gpu

CALIBRATION = REPO_ROOT / "examples" / "study_01"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo bundle plus its Q/DQ INT8 model (calibrated on the sample study)."""
    from retinaedge.export.quantize import quantize_bundle

    out = tmp_path_factory.mktemp("gpu") / "demo"
    shutil.copytree(DEMO, out)
    quantize_bundle(out, [CALIBRATION], max_frames=27)
    return out


def _probe() -> Any:
    from retinaedge.runtime.backends.tensorrt.fingerprint import probe

    return probe()


def _build(bundle_dir: Path, cache_root: Path, options: Any) -> tuple[Any, dict[str, Any], Any]:
    from retinaedge.runtime.backends.tensorrt.cache import EngineCache
    from retinaedge.runtime.backends.tensorrt.loaders import build_validate_store, plan_engine
    from retinaedge.runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    fingerprint, caps = _probe()
    plan = plan_engine(bundle, options, fingerprint, caps)
    backend, manifest = build_validate_store(bundle, options, plan, fingerprint, EngineCache(cache_root))
    return backend, manifest, plan


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_run_and_parity_with_onnxruntime(bundle_dir: Path, tmp_path: Path, precision: str) -> None:
    from retinaedge.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from retinaedge.runtime.backends.tensorrt.loaders import PRECISION_CRITERIA, compare_backends
    from retinaedge.runtime.backends.tensorrt.options import BuildOptions
    from retinaedge.runtime.bundle import load_bundle, load_golden

    options = BuildOptions(precision=precision, nms="builtin", timing_cache=tmp_path / "timing.cache")
    backend, manifest, plan = _build(bundle_dir, tmp_path / "engines", options)
    with backend:
        bundle = load_bundle(bundle_dir)
        images, _, _ = load_golden(bundle)
        out = backend.infer(images)
        n, k = len(images), bundle.manifest.postprocess.detections_per_img
        assert out["num_detections"].shape == (n,) and out["num_detections"].dtype == np.int32
        assert out["boxes"].shape == (n, k, 4) and out["scores"].shape == (n, k)
        assert out["labels"].shape == (n, k) and out["labels"].dtype == np.int32
        assert int(out["num_detections"].min()) > 0
        with OnnxRuntimeBackend(plan.onnx_path) as ort:
            reports = compare_backends(backend, ort, images, PRECISION_CRITERIA[precision])
        assert all(r.reference > 0 for r in reports)
        many = np.concatenate([images] * 3)  # 6 images > max batch 4: run in slices, same answers
        sliced = backend.infer(many)
        np.testing.assert_array_equal(sliced["num_detections"], np.tile(out["num_detections"], 3))
    assert manifest["validation"]["criteria"] == PRECISION_CRITERIA[precision]
    assert manifest["build"]["timing_cache_saved"] and (tmp_path / "timing.cache").stat().st_size > 0


def test_cached_engine_is_found_and_loads(bundle_dir: Path, tmp_path: Path) -> None:
    from retinaedge.runtime.backends import Backend
    from retinaedge.runtime.backends.tensorrt.backend import TensorRTBackend
    from retinaedge.runtime.backends.tensorrt.cache import EngineCache
    from retinaedge.runtime.backends.tensorrt.options import BuildOptions

    options = BuildOptions(nms="builtin")
    backend, manifest, plan = _build(bundle_dir, tmp_path / "engines", options)
    assert isinstance(backend, TensorRTBackend) and isinstance(backend, Backend)
    assert backend.self_test_criteria == manifest["validation"]["criteria"]
    backend.close()
    fingerprint, _ = _probe()
    found = EngineCache(tmp_path / "engines").lookup(plan.onnx_sha256, options, fingerprint)
    assert found.status == "hit" and found.entry is not None and found.key == manifest["key"]
    with TensorRTBackend(found.entry.read_engine()) as again:
        assert again.max_batch == 4


def test_tensorrt_runner_through_the_registry_builds_then_loads(bundle_dir: Path, tmp_path: Path) -> None:
    """``open_backend("tensorrt")``: an empty cache is built into (validated, stored), the next open loads
    the verified entry; the runner is a Backend and runs the golden input like ONNX Runtime."""
    from retinaedge.runtime.backends import Backend, BackendOptions, open_backend
    from retinaedge.runtime.backends.tensorrt.loaders import PRECISION_CRITERIA, compare_backends
    from retinaedge.runtime.backends.tensorrt.options import BuildOptions
    from retinaedge.runtime.bundle import load_bundle, load_golden

    bundle = load_bundle(bundle_dir)
    options = BackendOptions(
        cache_dir=tmp_path / "engines", batch_size=4, extra={"build_options": BuildOptions(nms="builtin")}
    )
    with open_backend("tensorrt", bundle, options) as built:
        assert isinstance(built, Backend) and built.name == "tensorrt" and built.providers == ("TensorRT",)
        assert "built and validated" in built.reason
    no_build = BackendOptions(
        cache_dir=tmp_path / "engines",
        allow_build=False,
        extra={"build_options": BuildOptions(nms="builtin")},
    )
    images, _, _ = load_golden(bundle)
    with open_backend("tensorrt", bundle, no_build) as loaded, open_backend("onnxruntime", bundle) as ort:
        assert "cached engine" in loaded.reason
        compare_backends(loaded, ort, images, PRECISION_CRITERIA["fp32"])


def test_detect_cli_backend_tensorrt(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``retinaedge detect --backend tensorrt`` runs the engine the service would serve with."""
    import json

    from retinaedge.runtime.cli import main

    argv = ["detect", "--model", str(bundle_dir), "--backend", "tensorrt", "--engine-cache", str(tmp_path)]
    assert main([*argv, str(CALIBRATION / "IM0001.dcm")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["frames"] and "error" not in line


def test_garbage_engine_bytes_are_refused_by_deserialisation() -> None:
    from retinaedge.runtime.backends.tensorrt.backend import TensorRTBackend
    from retinaedge.runtime.backends.tensorrt.errors import EngineLoadError

    with pytest.raises(EngineLoadError, match="could not deserialize"):
        TensorRTBackend(b"\x00" * 4096)


def test_impossible_dla_core_is_refused_on_this_device(bundle_dir: Path) -> None:
    from retinaedge.runtime.backends.tensorrt.errors import BuildOptionsError
    from retinaedge.runtime.backends.tensorrt.loaders import plan_engine
    from retinaedge.runtime.backends.tensorrt.options import BuildOptions
    from retinaedge.runtime.bundle import load_bundle

    fingerprint, caps = _probe()
    options = BuildOptions(precision="int8", dla_core=fingerprint.dla_cores, nms="builtin")
    with pytest.raises(BuildOptionsError, match=f"DLA core {fingerprint.dla_cores} requested"):
        plan_engine(load_bundle(bundle_dir), options, fingerprint, caps)


def test_dla_build_reports_layer_placement(bundle_dir: Path, tmp_path: Path) -> None:
    from retinaedge.runtime.backends.tensorrt.options import BuildOptions

    fingerprint, _ = _probe()
    if fingerprint.dla_cores == 0:
        pytest.skip(f"{fingerprint.gpu_name} has no DLA")
    options = BuildOptions(precision="fp16", dla_core=0, nms="builtin")
    backend, manifest, _ = _build(bundle_dir, tmp_path / "engines", options)
    backend.close()
    report = manifest["build"]
    assert report["dla_core"] == 0 and report["layers_on_dla"] > 0
    assert report["layers_on_dla"] + report["layers_on_gpu"] > 0


def test_service_auto_builds_and_serves_tensorrt(bundle_dir: Path, tmp_path: Path) -> None:
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings
    from support.servers import free_port

    port = free_port()
    settings = load_settings(model=bundle_dir, data_dir=tmp_path / "data", port=port, engine_nms="builtin")
    app = create_app(settings)
    worker = app.state.worker
    worker.start()
    try:
        assert worker.wait_ready(1800), worker.reason
        assert worker.backend == "tensorrt", worker.backend_reason
        assert "built and validated" in worker.backend_reason
    finally:
        worker.stop()
    app2 = create_app(settings)
    worker2 = app2.state.worker
    worker2.start()
    try:
        assert worker2.wait_ready(600) and worker2.backend == "tensorrt"
        assert "cached engine" in worker2.backend_reason
    finally:
        worker2.stop()


def test_background_build_swaps_onnxruntime_for_the_engine(bundle_dir: Path, tmp_path: Path) -> None:
    """engine_build_while=onnxruntime: ONNX Runtime serves at once, the child builds, the worker swaps."""
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings

    settings = load_settings(
        model=bundle_dir, data_dir=tmp_path / "data", engine_nms="builtin", engine_build_while="onnxruntime"
    )
    app = create_app(settings)
    worker, opener = app.state.worker, app.state.opener
    worker.start()
    try:
        assert worker.wait_ready(600) and worker.backend == "onnxruntime", worker.reason
        assert "built in the background" in worker.backend_reason
        assert opener.build.wait(1800), "the background build never ended"
        assert opener.build_status == "succeeded", worker.backend_reason
        poll(lambda: worker.backend == "tensorrt", timeout=600, interval=1)
        assert worker.backend == "tensorrt", worker.backend_reason
        assert worker.self_test["passed"] and opener.describe()["decision"] == "cache-hit"
    finally:
        opener.stop()
        worker.stop()
