"""The container entrypoint (``retinaedge boot``) and the engine decisions it takes, on the host.

No GPU here: "this device" is a fixed fingerprint (the probe is the only injected part). The engine cache,
the failure records, the boot record, the bundle, the worker, ONNX Runtime, the child ``retinaedge build``
process (which fails here for want of TensorRT: a real build failure) and the HTTP service are real.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from retinaedge.runtime.backends.onnxruntime import OnnxRuntimeBackend
from retinaedge.runtime.backends.policy import DECISIONS
from retinaedge.runtime.backends.tensorrt import build_cli
from retinaedge.runtime.backends.tensorrt.background import build_argv, failure_summary
from retinaedge.runtime.backends.tensorrt.cache import EngineCache
from retinaedge.runtime.bundle import load_bundle
from retinaedge.runtime.detector import Detector
from retinaedge.service.boot_cli import BOOT_RECORD, EX_CONFIG, EX_UNAVAILABLE, decide, unknown_variables
from retinaedge.service.settings import Settings, load_settings
from support.engines import THIS, flip_a_byte, make_app, seed, this_device, worker_of
from support.paths import DEMO, DICOM
from support.servers import free_port, wait_ready

UPGRADED = dataclasses.replace(THIS, tensorrt="10.13.3", cuda="12.6", l4t="36.4.4")
BEFORE_UPGRADE = dataclasses.replace(THIS, tensorrt="10.3.0", cuda="12.2", l4t="36.3.0")


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(model=DEMO, data_dir=tmp_path / "data", **overrides)


def boot_once(tmp_path: Path, probe: Any = this_device, **overrides: Any) -> Any:
    settings = settings_for(tmp_path, **overrides)
    return decide(settings, [load_bundle(DEMO)], probe=probe)


# -- the decisions ------------------------------------------------------------------------------------
def test_first_boot_on_an_empty_cache_builds(tmp_path: Path) -> None:
    report = boot_once(tmp_path)
    assert report.plan.action == "build" and report.plan.decision == "build-first"
    assert "is empty (first start on this device)" in report.plan.reason
    assert report.changes == ["first start with this data directory"]
    record = json.loads((tmp_path / "data" / BOOT_RECORD).read_text())
    assert record["decision"] == "build-first" and record["fingerprint"]["gpu_name"] == "Orin"
    assert record["key"] == report.plan.lookup.key


def test_cache_hit_loads_the_engine(tmp_path: Path) -> None:
    entry = seed(tmp_path, THIS)
    report = boot_once(tmp_path)
    assert report.plan.action == "load" and report.plan.decision == "cache-hit"
    assert report.plan.lookup.key == entry.key
    assert "built for this device (fp32" in report.plan.reason


def test_jetpack_upgrade_rebuilds_and_says_what_changed(tmp_path: Path) -> None:
    """Last start on TensorRT 10.3 (JetPack 6.0), this one on 10.13: the engine is rebuilt."""
    seed(tmp_path, BEFORE_UPGRADE)
    first = boot_once(tmp_path, probe=lambda: (BEFORE_UPGRADE, this_device()[1]))
    assert first.plan.decision == "cache-hit"
    after = boot_once(tmp_path, probe=lambda: (UPGRADED, this_device()[1]))
    assert after.plan.action == "build" and after.plan.decision == "build-fingerprint-changed"
    assert "built with TensorRT 10.3.0, this device has TensorRT 10.13.3" in after.plan.reason
    assert set(after.changes) == {
        "tensorrt: 10.3.0 -> 10.13.3",
        "cuda: 12.2 -> 12.6",
        "l4t: 36.3.0 -> 36.4.4",
    }


def test_another_module_rebuilds(tmp_path: Path) -> None:
    seed(tmp_path, dataclasses.replace(THIS, gpu_name="Orin Nano", sm_count=8, dla_cores=0))
    report = boot_once(tmp_path)
    assert report.plan.decision == "build-fingerprint-changed"
    assert "built for another device (Orin Nano" in report.plan.reason


def test_model_update_builds_a_new_engine(tmp_path: Path) -> None:
    options = settings_for(tmp_path).build_options()
    EngineCache(tmp_path / "data" / "engines").store(b"an older model's engine", "ab" * 32, options, THIS)
    boot_once(tmp_path, probe=this_device)
    record = json.loads((tmp_path / "data" / BOOT_RECORD).read_text())
    record["model"] = {"name": "older-model", "sha256": "ab" * 32}
    del record["models"]  # as a record written before several models were planned
    (tmp_path / "data" / BOOT_RECORD).write_text(json.dumps(record))
    report = boot_once(tmp_path)
    assert report.plan.decision == "build-new-model"
    sha = load_bundle(DEMO).manifest.model_sha256
    assert report.changes == [f"model older-model (abababababab) -> retinaedge-demo-brainmr ({sha[:12]})"]


def test_corrupt_engine_is_rebuilt(tmp_path: Path) -> None:
    flip_a_byte(seed(tmp_path, THIS))
    report = boot_once(tmp_path)
    assert report.plan.decision == "build-corrupt" and "is corrupt" in report.plan.reason


def test_builds_disabled_serve_onnxruntime_with_the_reason(tmp_path: Path) -> None:
    report = boot_once(tmp_path, engine_build=False)
    assert report.plan.action == "onnxruntime" and report.plan.decision == "onnxruntime-build-disabled"
    assert "engine_build=false" in report.plan.reason


def test_no_tensorrt_and_configured_onnxruntime(tmp_path: Path) -> None:
    def no_gpu() -> Any:
        raise RuntimeError("cuInit failed: no CUDA-capable device is detected")

    report = boot_once(tmp_path, probe=no_gpu)
    assert (
        report.plan.decision == "onnxruntime-no-tensorrt" and "no CUDA-capable device" in report.plan.reason
    )
    assert boot_once(tmp_path, backend="onnxruntime").plan.decision == "onnxruntime-configured"


def test_a_recorded_build_failure_is_not_retried_before_the_retry_time(tmp_path: Path) -> None:
    key = boot_once(tmp_path).plan.lookup.key
    EngineCache(tmp_path / "data" / "engines").record_failure(key, "EngineBuildError: out of memory")
    report = boot_once(tmp_path)
    assert report.plan.action == "onnxruntime" and report.plan.decision == "onnxruntime-build-failed-earlier"
    assert "out of memory" in report.plan.reason and "`retinaedge build` retries now" in report.plan.reason
    assert boot_once(tmp_path, engine_build_retry_s=0).plan.decision == "build-first"


def test_every_decision_label_is_known(tmp_path: Path) -> None:
    assert boot_once(tmp_path).plan.decision in DECISIONS


# -- the build failure, in the load and in the background ---------------------------------------------
def test_failed_build_at_start_up_is_recorded_and_the_next_start_skips_it(tmp_path: Path) -> None:
    with worker_of(make_app(tmp_path)) as worker:  # builds in the load, fails: no TensorRT here
        assert worker.backend == "onnxruntime"
        assert "building a new engine failed: TensorRT is not installed" in worker.backend_reason
    cache = EngineCache(tmp_path / "data" / "engines")
    key = boot_once(tmp_path).plan.lookup.key
    assert "TensorRT is not installed" in cache.failure(key)["error"]
    with worker_of(make_app(tmp_path)) as worker:
        assert worker.backend == "onnxruntime"
        assert "not retried before engine_build_retry_s" in worker.backend_reason


def test_background_build_serves_onnxruntime_meanwhile_and_reports_its_failure(tmp_path: Path) -> None:
    app = make_app(tmp_path, engine_build_while="onnxruntime")
    with worker_of(app) as worker:
        opener = app.state.opener
        assert worker.state == "ready" and worker.backend == "onnxruntime"
        assert opener.build is not None  # started at once; here it may already have failed
        assert "while a TensorRT engine is built in the background" in worker.backend_reason or (
            "engine build in the background failed" in worker.backend_reason
        )
        assert worker.submit(DICOM.read_bytes()).result(60).frames  # serves during the build
        assert opener.build.wait(120), "the child build never ended"
        assert opener.build_status == "failed" and opener.build.returncode != 0
        assert "engine build in the background failed" in worker.backend_reason
        assert "TensorRT is not installed" in worker.backend_reason
    key = boot_once(tmp_path).plan.lookup.key
    assert "TensorRT is not installed" in EngineCache(tmp_path / "data" / "engines").failure(key)["error"]


def test_build_argv_keys_the_same_engine_as_the_service(tmp_path: Path) -> None:
    import argparse

    settings = settings_for(tmp_path, max_batch_size=2, engine_precision="fp16", engine_dla_core=1)
    argv = build_argv(settings.model, settings)
    assert argv[:4] == [sys.executable, "-m", "retinaedge.runtime.cli", "build"]
    parser = argparse.ArgumentParser()
    build_cli.add_arguments(parser)
    args = parser.parse_args(argv[4:])
    assert build_cli.options_from_args(args) == settings.build_options()
    assert args.cache_dir == settings.engine_cache_root


def test_failure_summary_takes_the_error_line() -> None:
    tail = "2026-11-23 10:00:00,000 INFO x: probing\n2026-11-23 10:00:01,000 ERROR retinaedge: TensorRT is missing\n"
    assert failure_summary(tail + '{"error": {"type": "missing-dependency"}}') == "TensorRT is missing"
    assert failure_summary("") == "no output"
    assert (
        failure_summary("INFO building ...", -9) == "the build process was killed by SIGKILL (out of memory?)"
    )
    assert failure_summary("INFO building ...", 1) == "INFO building ..."


def test_a_killed_background_build_is_reported_as_such(tmp_path: Path) -> None:
    """A real child process killed by SIGKILL (as the OOM killer does): the reason says so."""
    import threading

    from retinaedge.runtime.backends.tensorrt.background import BackgroundBuild

    outcome: list[tuple[bool, str]] = []
    done = threading.Event()
    script = "import os, signal, sys; print('building', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    build = BackgroundBuild(
        [sys.executable, "-c", script], lambda ok, tail: (outcome.append((ok, tail)), done.set())
    )
    build.start()
    assert build.wait(60) and done.is_set()
    assert build.status == "failed" and build.returncode == -signal.SIGKILL
    ok, tail = outcome[0]
    assert not ok and tail == "building"
    assert "killed by SIGKILL" in failure_summary(tail, build.returncode)


# -- the swap ---------------------------------------------------------------------------------------
def test_swap_replaces_the_detector_only_after_its_self_test(tmp_path: Path) -> None:
    bundle = load_bundle(DEMO)
    with worker_of(make_app(tmp_path, backend="onnxruntime")) as worker:

        def fresh() -> Detector:
            return Detector(bundle, OnnxRuntimeBackend(bundle.model_path), backend_reason="swapped in")

        assert worker.swap(fresh).result(120) is True
        assert worker.backend_reason == "swapped in" and worker.self_test["passed"]

        def broken() -> Detector:
            raise RuntimeError("engine file vanished")

        assert worker.swap(broken).result(60) is False
        assert "switching backend failed: RuntimeError: engine file vanished" in worker.backend_reason
        assert worker.submit(DICOM.read_bytes()).result(60).frames  # still serving


# -- the verb -----------------------------------------------------------------------------------------
def _boot(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RETINAEDGE_")}
    base.update({"RETINAEDGE_MODEL": str(DEMO), "RETINAEDGE_DATA_DIR": str(tmp_path / "data"), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "retinaedge.runtime.cli", "boot", *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"RETINAEDGE_ENGINE_PRECISON": "fp16"}, "unknown variable(s) RETINAEDGE_ENGINE_PRECISON"),
        ({"RETINAEDGE_MAX_BATCH_SIZE": "0"}, "max_batch_size: Input should be greater than or equal to 1"),
        ({"RETINAEDGE_MODEL": "/nonexistent/bundle"}, "model bundle /nonexistent/bundle"),
        ({"RETINAEDGE_DATA_DIR": "/proc/version/data"}, "is not a writable directory"),
        ({"RETINAEDGE_HOST": "0.0.0.0"}, "beyond loopback an API token is required"),
        ({"RETINAEDGE_API_TOKEN_FILE": "/nonexistent/token"}, "RETINAEDGE_API_TOKEN_FILE /nonexistent/token"),
    ],
    ids=["typo", "invalid-value", "no-bundle", "read-only-data", "no-token", "no-token-file"],
)
def test_bad_configuration_exits_78_saying_what_is_wrong(
    tmp_path: Path, env: dict[str, str], words: str
) -> None:
    proc = _boot(tmp_path, "--check", env=env)
    assert proc.returncode == EX_CONFIG, proc.stderr
    error = json.loads(proc.stdout.splitlines()[-1])["error"]
    assert error["type"] == "invalid-configuration" and words in error["message"]
    assert "configuration refused" in proc.stderr


def test_backend_tensorrt_without_tensorrt_exits_69(tmp_path: Path) -> None:
    proc = _boot(tmp_path, "--check", env={"RETINAEDGE_BACKEND": "tensorrt"})
    assert proc.returncode == EX_UNAVAILABLE and "TensorRT is not installed" in proc.stdout


def test_check_prints_the_decision(tmp_path: Path) -> None:
    proc = _boot(tmp_path, "--check")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert (
        report["decision"] == "onnxruntime-no-tensorrt"
        and report["model"]["name"] == "retinaedge-demo-brainmr"
    )
    assert "engine decision onnxruntime-no-tensorrt" in proc.stderr


def test_unknown_variables_lists_only_typos() -> None:
    env = {"RETINAEDGE_MODEL": "x", "RETINAEDGE_API_TOKEN_FILE": "t", "RETINAEDGE_MODLE": "y", "HOME": "/"}
    assert unknown_variables(env) == ["RETINAEDGE_MODLE"]


def test_boot_serves_beyond_loopback_with_the_token_from_a_file(tmp_path: Path) -> None:
    """What the container does: 0.0.0.0, a token from a secret file, /readyz ready, SIGTERM ends it."""
    token = "a-secret-token-from-a-file-0123"
    (tmp_path / "token").write_text(token + "\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAEDGE_")}
    env.update(
        RETINAEDGE_MODEL=str(DEMO),
        RETINAEDGE_DATA_DIR=str(tmp_path / "data"),
        RETINAEDGE_HOST="0.0.0.0",
        RETINAEDGE_PORT=str(port),
        RETINAEDGE_API_TOKEN_FILE=str(tmp_path / "token"),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "retinaedge.runtime.cli", "boot"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    try:
        ready = wait_ready(proc, base, headers=auth)
        with httpx.Client(timeout=10) as client:
            assert client.get(f"{base}/healthz").status_code == 200
            assert ready["engine"]["decision"] == "onnxruntime-no-tensorrt"
            assert client.get(f"{base}/readyz").status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal: Docker sees 143, systemd a clean stop
    assert proc.returncode in (0, -signal.SIGTERM), err[-2000:]
    assert "Application shutdown complete" in err
    assert "engine decision onnxruntime-no-tensorrt" in err and "first start with this data directory" in err
    assert token not in err and token not in out


def test_every_model_is_planned_for_the_version_the_start_serves(
    tmp_path: Path, any_mr_bundle: Path, demo_version_b: Path
) -> None:
    """Two models, the demo with version B activated since the last start and the second on OpenVINO: the
    boot record plans each (the demo's activated version, not the settings' bundle; each with its own
    backend), reads the versions' state without changing it, and says which model changed since."""
    from retinaedge.service.versions.registry import MODELS, ModelVersions, version_of

    demo, b = load_bundle(DEMO), load_bundle(demo_version_b)
    data = tmp_path / "data"
    versions = ModelVersions(data / MODELS / demo.manifest.name, demo.manifest.name)
    versions.seed(DEMO, demo)
    staged, _ = versions.stage(demo_version_b, None)
    versions.activate(staged)
    state = (data / MODELS / demo.manifest.name / "state.json").read_bytes()
    settings = load_settings(
        models=[str(DEMO), {"path": str(any_mr_bundle), "backend": "openvino"}],
        data_dir=data,
        backend="auto",
    )
    second = load_bundle(any_mr_bundle)
    report = decide(settings, [demo, second], probe=this_device)
    first, other = report.record["models"]
    assert (first["name"], first["version"], first["version_source"]) == (
        demo.manifest.name,
        staged,
        "activated",
    )
    assert first["sha256"] == b.manifest.model_sha256 and first["decision"] == "build-first"
    assert report.record["model"]["sha256"] == b.manifest.model_sha256  # the first model's, at the top
    assert (other["name"], other["version"], other["version_source"]) == (
        second.manifest.name,
        version_of(second),
        "settings",
    )
    assert other["backend"] == "openvino" and other["decision"] == "backend-configured"
    assert (data / MODELS / demo.manifest.name / "state.json").read_bytes() == state  # read-only
    assert not (data / MODELS / second.manifest.name).exists()

    versions.rollback()  # the next start serves the settings' bundle again: one model changed
    again = decide(settings, [demo, second], probe=this_device)
    assert again.changes == [
        f"model {demo.manifest.name}: {b.manifest.model_sha256[:12]} -> {demo.manifest.model_sha256[:12]}"
    ]
