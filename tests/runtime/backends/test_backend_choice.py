"""Backend choice ``auto`` on the real service, worker and ONNX Runtime backend with the demo bundle.

There is no GPU here, so "this device" is a fixed fingerprint handed to ``create_app`` (the probe is the
only injected part); the engine cache, its manifests and sha256 checks, the build-option validation, the
worker, ONNX Runtime and the HTTP service are all real. Cache validation happens before any TensorRT
import, so corrupt, foreign and version-mismatched engines are all reached here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from retinaedge.service.app import create_app
from retinaedge.service.settings import load_settings
from support.engines import CAPS, THIS, flip_a_byte, make_app, seed, this_device, worker_of
from support.paths import DEMO, DICOM
from support.servers import free_port, serve_app

CASES = {
    "corrupt": (lambda tmp: flip_a_byte(seed(tmp, THIS)), "is corrupt (sha256 differs from its manifest)"),
    "another-device": (
        lambda tmp: seed(tmp, dataclasses.replace(THIS, gpu_name="Orin Nano", sm_count=8, dla_cores=0)),
        "built for another device (Orin Nano (sm_87, 8 SMs, 0 DLA)",
    ),
    "another-tensorrt": (
        lambda tmp: seed(tmp, dataclasses.replace(THIS, tensorrt="10.3.0")),
        "built with TensorRT 10.3.0, this device has TensorRT 10.13.3",
    ),
}


@pytest.mark.parametrize("build", [False, True], ids=["no-build", "build-allowed"])
@pytest.mark.parametrize("case", list(CASES))
def test_unusable_engine_falls_back_to_onnxruntime_with_the_reason(
    tmp_path: Path, case: str, build: bool, caplog: pytest.LogCaptureFixture
) -> None:
    make_entry, words = CASES[case]
    make_entry(tmp_path)
    caplog.set_level(logging.INFO)
    with worker_of(make_app(tmp_path, engine_build=build)) as worker:
        assert worker.state == "ready" and worker.backend == "onnxruntime"
        assert words in worker.backend_reason
        if build:  # the build is attempted, and here fails for want of TensorRT, which is said too
            assert "building a new engine failed: TensorRT is not installed" in worker.backend_reason
        else:
            assert "building at start-up is disabled" in worker.backend_reason
    assert any(
        "serving with ONNX Runtime" in r.getMessage() and words in r.getMessage() for r in caplog.records
    )


def test_the_plan_lists_tensorrt_then_onnxruntime_and_the_registry_opens_the_fallback(tmp_path: Path) -> None:
    """The policy's candidates reach the service: TensorRT (build, corrupt entry) first, ONNX Runtime after;
    the fallback is the registry's ``onnxruntime`` backend (a :class:`Backend`)."""
    from retinaedge.runtime.backends import Backend

    flip_a_byte(seed(tmp_path, THIS))
    app = make_app(tmp_path)
    with worker_of(app) as worker:
        plan = app.state.opener.plan
        assert [(c.backend, c.action, c.decision) for c in plan.candidates] == [
            ("tensorrt", "build", "build-corrupt"),
            ("onnxruntime", "open", "build-corrupt"),
        ]
        assert plan.to_dict()["candidates"][0]["reason"] == plan.reason
        assert worker.backend == "onnxruntime"
    with app.state.opener.open(allow_build=False, defer_build=False) as detector:
        assert isinstance(detector.backend, Backend) and detector.backend.name == "onnxruntime"
        assert "building at start-up is disabled" in detector.backend_reason


def test_valid_entry_is_accepted_before_tensorrt_is_needed(tmp_path: Path) -> None:
    """A sound entry passes every pure-Python check; only loading it needs TensorRT (absent here)."""
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: the fake engine bytes would reach deserialisation")
    seed(tmp_path, THIS)
    with worker_of(make_app(tmp_path)) as worker:
        assert worker.backend == "onnxruntime"
        assert "cached engine" in worker.backend_reason and "built for this device" in worker.backend_reason
        assert "cannot be loaded: TensorRT is not installed (pip install '.[trt]'" in worker.backend_reason


def test_impossible_settings_are_refused_not_rewritten(tmp_path: Path) -> None:
    no_dla = dataclasses.replace(THIS, dla_cores=0)
    app = make_app(tmp_path, probe=lambda: (no_dla, CAPS), engine_precision="fp16", engine_dla_core=1)
    with worker_of(app) as worker:
        assert worker.backend == "onnxruntime"
        assert "DLA core 1 requested but Orin has no DLA" in worker.backend_reason


def test_backend_tensorrt_does_not_fall_back(tmp_path: Path) -> None:
    flip_a_byte(seed(tmp_path, THIS))
    with worker_of(make_app(tmp_path, backend="tensorrt", engine_build=False)) as worker:
        assert worker.state == "failed" and worker.backend == ""
        assert "is corrupt" in worker.reason


def test_backend_onnxruntime_never_probes(tmp_path: Path) -> None:
    def probe() -> Any:
        raise AssertionError("backend=onnxruntime must not probe the device")

    with worker_of(make_app(tmp_path, probe=probe, backend="onnxruntime")) as worker:
        assert (
            worker.backend == "onnxruntime" and worker.backend_reason == "backend=onnxruntime in the settings"
        )


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_default_probe_without_tensorrt(tmp_path: Path) -> None:
    with worker_of(_default_app(tmp_path)) as worker:
        assert worker.backend == "onnxruntime"
        assert worker.backend_reason.startswith(
            "TensorRT not used: TensorRT is not installed (pip install '.[trt]'"
        )


def _default_app(tmp_path: Path) -> FastAPI:
    settings = load_settings(model=DEMO, data_dir=tmp_path / "data", port=free_port())
    return create_app(settings)


def test_reason_is_visible_in_readyz_model_and_every_result(tmp_path: Path) -> None:
    seed(tmp_path, dataclasses.replace(THIS, sm_count=8, gpu_name="Orin Nano"))
    port = free_port()
    settings = load_settings(model=DEMO, data_dir=tmp_path / "data", port=port, engine_build=False)
    app = create_app(settings, probe=this_device)
    with serve_app(app, port) as base, httpx.Client(timeout=60) as client:
        ready = client.get(f"{base}/readyz").json()
        assert ready["backend"] == "onnxruntime" and "built for another device" in ready["backend_reason"]
        model = client.get(f"{base}/v1/model").json()["backend"]
        assert model["name"] == "onnxruntime" and model["reason"] == ready["backend_reason"]
        result = client.post(
            f"{base}/v1/detect", content=DICOM.read_bytes(), headers={"Content-Type": "application/dicom"}
        )
        assert result.status_code == 200, result.text
        body = result.json()
        assert body["backend"] == "onnxruntime" and body["backend_reason"] == ready["backend_reason"]
        assert sum(len(f["detections"]) for f in body["frames"]) > 0
