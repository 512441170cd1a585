"""Backend choice without a GPU: a fixed "this device" and engine-cache entries for the demo bundle as
``retinaedge build`` on a device would leave them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from support.paths import DEMO
from support.servers import free_port


def _device_facts() -> tuple[Any, Any]:
    from retinaedge.runtime.backends.tensorrt.fingerprint import DeviceCapabilities, DeviceFingerprint

    this = DeviceFingerprint.from_values(
        gpu_name="Orin",
        compute_capability="8.7",
        sm_count=16,
        tensorrt="10.13.3",
        cuda="12.6",
        l4t="36.4.4",
        dla_cores=2,
    )
    return this, DeviceCapabilities.for_tensorrt("10.13.3", fast_fp16=True, fast_int8=True)


THIS, CAPS = _device_facts()
FAKE_ENGINE = b"serialized engine bytes; the cache never interprets them " * 2000


def this_device() -> tuple[Any, Any]:
    return THIS, CAPS


def make_app(tmp_path: Path, probe: Any = this_device, **overrides: Any) -> Any:
    """The service app on the demo bundle with ``probe`` standing for the device."""
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings

    settings = load_settings(model=DEMO, data_dir=tmp_path / "data", port=free_port(), **overrides)
    return create_app(settings, probe=probe)


def seed(tmp_path: Path, fingerprint: Any, options: Any = None) -> Any:
    """An engine entry for the demo model as ``retinaedge build`` on ``fingerprint`` would leave it."""
    from retinaedge.runtime.backends.tensorrt.cache import EngineCache
    from retinaedge.runtime.hashing import sha256_file
    from retinaedge.service.settings import load_settings

    options = options or load_settings(model=DEMO, data_dir=tmp_path / "data").build_options()
    cache = EngineCache(tmp_path / "data" / "engines")
    return cache.store(FAKE_ENGINE, sha256_file(DEMO / "model.onnx"), options, fingerprint)


@contextmanager
def worker_of(app: Any) -> Iterator[Any]:
    """The app's real inference worker, started as the lifespan would (no HTTP needed for the choice)."""
    worker = app.state.worker
    worker.start()
    worker.wait_ready(120)
    assert worker.state != "loading", "worker never settled"
    try:
        yield worker
    finally:
        worker.stop()


def flip_a_byte(entry: Any) -> None:
    """Corrupt a cached engine: one byte in its middle flipped."""
    data = bytearray(entry.engine_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.engine_path.write_bytes(bytes(data))
