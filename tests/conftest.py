"""Shared fixtures: the exported session bundle (a real torchvision model, a real export) and the GPU marks.

Shared helpers (servers, ports, clients, polling, certificates, stand-ins, DICOM peers) are in the
``support`` package (tests/support/); test modules do not import each other."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.forkserver import Launcher

HAS_TORCH = (
    importlib.util.find_spec("torch") is not None and importlib.util.find_spec("torchvision") is not None
)


def _gpu_available() -> bool:
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("pycuda") is None:
        return False
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    require_gpu = os.environ.get("REQUIRE_GPU") == "1"
    gpu = _gpu_available()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            if require_gpu:
                # Fails at setup (an xfail with run=False would count as a pass and hide the missing GPU).
                item.add_marker(pytest.mark.usefixtures("_gpu_required"))
            else:
                item.add_marker(pytest.mark.skip(reason="needs TensorRT, pycuda and a CUDA device"))
        if "export" in item.keywords and not HAS_TORCH:
            item.add_marker(pytest.mark.skip(reason="needs the export extra (torch, torchvision)"))


@pytest.fixture
def _gpu_required() -> None:
    """Attached to ``gpu`` tests when REQUIRE_GPU=1 and there is no usable GPU: they fail, visibly."""
    pytest.fail("REQUIRE_GPU=1 but TensorRT, pycuda or a CUDA device is missing")


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-18 FPN bundle (3 classes, 3 channels, 256x320, biased heads: hundreds of candidates on any
    image), exported once per session through the Python API. Only for tests that need what an export
    gives (the current exporter's manifest, many detections, export options); service and DICOM tests use
    the committed demo bundle, ``support.paths.DEMO`` (no torch needed)."""
    if not HAS_TORCH:
        pytest.skip("needs the export extra (torch, torchvision)")
    from retinaedge.export import export_retinanet
    from support.models import biased_retinanet

    out = tmp_path_factory.mktemp("bundles") / "r18"
    export_retinanet(
        biased_retinanet("resnet18_fpn", 3),
        out,
        input_size=(256, 320),
        class_names=["glioma", "meningioma", "pituitary"],
        architecture="resnet18_fpn",
        synthetic_count=2,
    )
    return out


@pytest.fixture(scope="session")
def orthanc_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Orthanc and its DICOMweb plugin unpacked from Debian's packages, once per session
    (``support/peers_orthanc.py``); skipped with the reason when that cannot be done, failed instead when
    ``REQUIRE_DICOM_PEERS=1``."""
    from support.peers_orthanc import install

    tree = install(tmp_path_factory.mktemp("orthanc"))
    if isinstance(tree, str):
        if os.environ.get("REQUIRE_DICOM_PEERS") == "1":
            pytest.fail(f"REQUIRE_DICOM_PEERS=1 but Orthanc cannot be installed: {tree}")
        pytest.skip(tree)
    return tree


@pytest.fixture(scope="session")
def launcher() -> Iterator[Launcher]:
    """Starts real ``retinaedge serve`` processes without a new interpreter's imports each time
    (tests/support/forkserver.py): for tests that start servers as subprocesses, configured by
    ``--config``."""
    with Launcher() as launcher:
        yield launcher
