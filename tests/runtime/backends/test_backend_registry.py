"""The backend registry: names, lazy imports, a backend registered by a test, ``--backend`` on the verbs.

In-process calls of :func:`retinaedge.runtime.cli.main` with the committed demo bundle; no export, no GPU.
Without TensorRT, ``--backend tensorrt`` must be one clear error (naming the ``trt`` extra), no traceback.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from retinaedge.runtime.backends import Backend, BackendOptions, open_backend, register, unregister
from retinaedge.runtime.backends.registry import check_available, choices, names
from retinaedge.runtime.backends.tensorrt.cache import EngineCache
from retinaedge.runtime.backends.tensorrt.options import BuildOptions
from retinaedge.runtime.bundle import Bundle, load_bundle
from retinaedge.runtime.cli import build_parser, main
from retinaedge.runtime.detector import Detector
from retinaedge.runtime.errors import ConfigError, MissingDependencyError, RetinaEdgeError
from retinaedge.runtime.hashing import sha256_file
from support.engines import THIS, this_device
from support.paths import DEMO, REPO_ROOT

DICOM = REPO_ROOT / "examples" / "study_01" / "IM0001.dcm"
GROUND_TRUTH = REPO_ROOT / "examples" / "ground_truth.json"
NO_TENSORRT = importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("pycuda") is None


class EmptyBackend(Backend):
    """A backend that finds nothing: ``(N, C, H, W)`` -> zero detections padded to K=5."""

    name = "empty"
    providers = ("numpy",)

    def __init__(self) -> None:
        self.closed = False

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        n = len(images)
        return {
            "num_detections": np.zeros(n, np.int32),
            "boxes": np.zeros((n, 5, 4), np.float32),
            "scores": np.zeros((n, 5), np.float32),
            "labels": np.zeros((n, 5), np.int32),
        }

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def empty_backend() -> Iterator[str]:
    """Backend ``empty`` registered as a module of its own (as a ``coreml`` file would be)."""
    module = types.ModuleType("retinaedge_test_empty_backend")
    module.open = lambda bundle, options: EmptyBackend()  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    register("empty", module.__name__)
    try:
        yield "empty"
    finally:
        unregister("empty")
        del sys.modules[module.__name__]


@pytest.fixture(scope="module")
def demo() -> Bundle:
    return load_bundle(DEMO)


def test_registered_names_and_choices() -> None:
    assert list(names())[:3] == ["onnxruntime", "openvino", "tensorrt"]
    assert choices()[0] == "auto" and set(choices()) >= {"auto", "onnxruntime", "openvino", "tensorrt"}


def test_unknown_name_is_a_clear_error_listing_the_known_ones(demo: Bundle) -> None:
    with pytest.raises(
        ConfigError, match=r"unknown backend 'coreml'; known: auto, onnxruntime, openvino, tensorrt"
    ):
        open_backend("coreml", demo)
    with pytest.raises(ConfigError, match="unknown backend"):
        check_available("coreml")


def test_reserved_names_cannot_be_registered() -> None:
    with pytest.raises(ConfigError, match="reserved"):
        register("auto", "anything")


def test_importing_the_registry_imports_no_backend() -> None:
    code = (
        "import sys, retinaedge.runtime.backends.registry, retinaedge.runtime.backends.base;"
        "heavy = [m for m in ('tensorrt', 'pycuda', 'onnxruntime', 'torch', 'retinaedge.service',"
        " 'retinaedge.device', 'retinaedge.runtime.backends.onnxruntime') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_onnxruntime_opens_by_name_without_the_tensorrt_module(demo: Bundle) -> None:
    code = (
        "import sys; from retinaedge.runtime.backends import open_backend;"
        "from retinaedge.runtime.bundle import load_bundle;"
        f"b = open_backend('onnxruntime', load_bundle({str(DEMO)!r}));"
        "assert b.name == 'onnxruntime' and b.providers[0] == 'CPUExecutionProvider';"
        "assert 'tensorrt' not in sys.modules and 'retinaedge.runtime.backends.tensorrt' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_onnxruntime_by_name_is_a_backend(demo: Bundle) -> None:
    with open_backend("onnxruntime", demo, BackendOptions(threads=1)) as backend:
        assert isinstance(backend, Backend) and backend.threads == 1  # type: ignore[attr-defined]


def test_a_backend_registered_in_a_test_is_openable_by_name(demo: Bundle, empty_backend: str) -> None:
    backend = open_backend(empty_backend, demo)
    assert isinstance(backend, EmptyBackend)
    with Detector.open(DEMO, backend=empty_backend) as det:
        result = det.detect(DICOM)
        assert det.backend.name == "empty" and all(not f.detections for f in result.frames)
    assert det.backend.closed  # type: ignore[attr-defined]


def test_a_factory_returning_something_else_is_refused(demo: Bundle) -> None:
    module = types.ModuleType("retinaedge_test_bad_backend")
    module.open = lambda bundle, options: object()  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    register("bad", module.__name__)
    try:
        with pytest.raises(TypeError, match="not a Backend"):
            open_backend("bad", demo)
    finally:
        unregister("bad")
        del sys.modules[module.__name__]


def test_registered_backend_is_a_choice_of_detect(
    empty_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["detect", "--model", str(DEMO), "--backend", empty_backend, str(DICOM)]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["file"] == str(DICOM) and line["frames"] and not line["frames"][0]["detections"]


VERBS = {
    "detect": ["detect", "--model", str(DEMO), str(DICOM)],
    "eval": ["eval", "--model", str(DEMO), "--annotations", str(GROUND_TRUTH), "--allow-missing", str(DICOM)],
    "benchmark": [
        "benchmark",
        "--model",
        str(DEMO),
        "--dicom",
        str(DICOM),
        "--no-torch",
        "--no-http",
        "--batch-seconds",
        "0",
    ],  # fmt: skip
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_backend_defaults_leave_behaviour_unchanged(verb: str) -> None:
    args = build_parser().parse_args(VERBS[verb])
    assert args.backend == "onnxruntime" and args.engine_cache is None


@pytest.mark.parametrize("verb", list(VERBS))
def test_backend_choices_come_from_the_registry(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*VERBS[verb], "--backend", "coreml"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'coreml'" in capsys.readouterr().err
    assert build_parser().parse_args([*VERBS[verb], "--backend", "openvino"]).backend == "openvino"


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
@pytest.mark.parametrize("verb", list(VERBS))
def test_backend_tensorrt_without_tensorrt_is_one_clear_error(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    extra = ["--out", str(tmp_path / "bench")] if verb == "benchmark" else []
    rc = main([*VERBS[verb], *extra, "--backend", "tensorrt"])
    captured = capsys.readouterr()
    assert rc != 0
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, lines
    error = json.loads(lines[0])["error"]
    assert error["type"] == "missing-dependency" and "retinaedge[trt]" in error["message"]
    assert "pip install '.[trt]'" in error["message"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [error["message"]]
    assert not any(r.exc_info for r in caplog.records) and "Traceback" not in captured.err
    assert not (tmp_path / "bench").exists()  # nothing measured


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
def test_check_available_names_the_extra() -> None:
    with pytest.raises(MissingDependencyError, match=r"retinaedge\[trt\]"):
        check_available("tensorrt")
    check_available("onnxruntime")
    check_available("auto")


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
def test_detect_backend_auto_falls_back_to_onnxruntime_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Detector.open(
        DEMO, backend="auto", options=BackendOptions(threads=1, cache_dir=tmp_path / "engines")
    ) as det:
        assert det.backend.name == "onnxruntime"
        assert det.backend_reason.startswith("TensorRT not used: TensorRT is not installed")
    argv = [*VERBS["detect"], "--backend", "auto", "--engine-cache", str(tmp_path / "engines")]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip())["frames"]


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
def test_eval_backend_auto_reports_backend_and_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*VERBS["eval"], "--backend", "auto", "--engine-cache", str(tmp_path / "engines")]
    assert main(argv) in (0, 1)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["backend"]["name"] == "onnxruntime"
    assert report["backend"]["reason"].startswith("TensorRT not used:")


# --- the tensorrt backend's loaders through the registry, on a fixed fingerprint (no GPU needed) ---


def test_engine_settings_are_the_services(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: Bundle
) -> None:
    from retinaedge.runtime.backends.tensorrt.settings import engine_settings

    monkeypatch.setenv("RETINAEDGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RETINAEDGE_ENGINE_PRECISION", "fp16")
    monkeypatch.setenv("RETINAEDGE_MAX_BATCH_SIZE", "2")
    got = engine_settings(demo, BackendOptions())
    assert got.cache_root == tmp_path / "data" / "engines" and got.allow_build
    assert (got.build_options.precision, got.build_options.batch_max) == ("fp16", 2)
    mine = BuildOptions(precision="fp32")
    got = engine_settings(
        demo, BackendOptions(cache_dir=tmp_path / "x", allow_build=False, extra={"build_options": mine})
    )
    assert got.cache_root == tmp_path / "x" and not got.allow_build and got.build_options is mine


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
def test_tensorrt_by_name_verifies_the_cache_before_needing_tensorrt(tmp_path: Path, demo: Bundle) -> None:
    """A sound cache entry passes every pure-Python check; loading it is where TensorRT is missing."""
    options = BuildOptions()
    EngineCache(tmp_path).store(b"engine bytes " * 100, sha256_file(DEMO / "model.onnx"), options, THIS)
    opts = BackendOptions(cache_dir=tmp_path, extra={"probe": this_device, "build_options": options})
    with pytest.raises(
        RetinaEdgeError, match="built for this device.*cannot be loaded: TensorRT is not installed"
    ):
        open_backend("tensorrt", demo, opts)


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
def test_tensorrt_by_name_records_a_failed_build_and_does_not_retry(tmp_path: Path, demo: Bundle) -> None:
    opts = BackendOptions(cache_dir=tmp_path, extra={"probe": this_device, "build_options": BuildOptions()})
    with pytest.raises(
        RetinaEdgeError, match="is empty .*building a new engine failed: TensorRT is not installed"
    ):
        open_backend("tensorrt", demo, opts)
    with pytest.raises(RetinaEdgeError, match="not retried before engine_build_retry_s"):
        open_backend("tensorrt", demo, opts)
    with pytest.raises(ConfigError, match="building at start-up is disabled"):
        open_backend(
            "tensorrt", demo, BackendOptions(cache_dir=tmp_path, allow_build=False, extra=opts.extra)
        )


def test_one_new_file_in_the_package_is_a_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: Bundle, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dropping ``coreml.py`` (with ``open``) into ``retinaedge.runtime.backends`` is all it takes:
    listed without being imported, openable by name, a ``--backend`` choice."""
    import retinaedge.runtime.backends as package

    (tmp_path / "coreml.py").write_text(
        "from retinaedge.runtime.backends.base import Backend\n"
        "import numpy as np\n"
        "class CoreMl(Backend):\n"
        "    name = 'coreml'\n"
        "    def infer(self, images):\n"
        "        n = len(images)\n"
        "        return {'num_detections': np.zeros(n, np.int32), 'boxes': np.zeros((n, 1, 4), np.float32),\n"
        "                'scores': np.zeros((n, 1), np.float32), 'labels': np.zeros((n, 1), np.int32)}\n"
        "def open(bundle, options):\n"
        "    return CoreMl()\n"
    )
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "retinaedge.runtime.backends.coreml", raising=False)
    assert "coreml" in choices() and "retinaedge.runtime.backends.coreml" not in sys.modules
    assert open_backend("coreml", demo).name == "coreml"
    assert main(["detect", "--model", str(DEMO), "--backend", "coreml", str(DICOM)]) == 0
    assert json.loads(capsys.readouterr().out.strip())["frames"]
    sys.modules.pop("retinaedge.runtime.backends.coreml", None)


def test_a_registered_module_that_is_missing_or_has_no_factory(demo: Bundle) -> None:
    register("ghost", "retinaedge_no_such_module_anywhere")
    try:
        with pytest.raises(ConfigError, match="registered as module retinaedge_no_such_module_anywhere"):
            open_backend("ghost", demo)
    finally:
        unregister("ghost")
    register("hollow", "json")
    try:
        with pytest.raises(ConfigError, match=r"has no open\(bundle, options\) factory"):
            open_backend("hollow", demo)
    finally:
        unregister("hollow")


@pytest.mark.parametrize("backend", ["tensorrt", "auto"])
def test_provider_with_another_backend_is_refused_not_ignored(
    capsys: pytest.CaptureFixture[str], backend: str
) -> None:
    assert main([*VERBS["detect"], "--backend", backend, "--provider", "cuda"]) == 2
    error = json.loads(capsys.readouterr().out.strip())["error"]
    assert (
        error["type"] == "invalid-configuration"
        and "--provider cuda applies to ONNX Runtime" in error["message"]
    )
