"""Helpers shared by tests (importable as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def biased_retinanet(arch: str, num_classes: int, seed: int = 0, *, frozen_bn: bool = False) -> Any:
    """A randomly initialised RetinaNet whose classification head is biased so every image yields
    hundreds of candidates above the 0.05 threshold (NMS and the K cap then have real work)."""
    import torch
    from retinaedge.export.torchload import build_retinanet

    torch.manual_seed(seed)
    model = build_retinanet(arch, num_classes, frozen_bn=frozen_bn)
    with torch.no_grad():
        cls = model.head.classification_head.cls_logits
        cls.weight.normal_(0.0, 0.05)
        cls.bias.fill_(-2.0)
    return model.eval()


#: ``retinaedge serve`` whose inference (each serving batch: ``InferenceWorker.run_batch``) waits while the
#: file ``argv[1]`` exists (a gate the test opens by deleting it), after creating ``argv[1] + ".entered"``:
#: holds the inference thread busy for as long as a test needs, whatever the CPU's speed.
GATED_SERVE = """
import os, sys, time
from retinaedge.service.pipeline.stages import InferenceWorker
from retinaedge.runtime.cli import main
gate = sys.argv.pop(1)
real = InferenceWorker.run_batch
def held(self, *args, **kwargs):
    open(gate + ".entered", "w").close()
    deadline = time.monotonic() + 300
    while os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return real(self, *args, **kwargs)
InferenceWorker.run_batch = held
sys.exit(main(sys.argv[1:]))
"""


def start_server(bundle: Any, config: Any, port: int, timeout: float = 120.0, gate: Any = None) -> Any:
    """``retinaedge serve`` as a real subprocess on 127.0.0.1:``port``; returns the Popen once /readyz is 200.
    With ``gate`` (a path), inference waits while that file exists (:data:`GATED_SERVE`)."""

    # The server's log goes to a file: a pipe nobody reads fills up and blocks the server's logging.
    log_path = Path(config).parent / f"server-{port}.log"
    python = [sys.executable, "-m", "retinaedge.runtime.cli"]
    if gate is not None:
        python = [sys.executable, "-c", GATED_SERVE, str(gate)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*python, "serve", "--model", str(bundle), "--port", str(port), "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    wait_ready(proc, f"http://127.0.0.1:{port}", timeout=timeout, log_path=log_path)
    return proc


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# -- ports, servers and clients ---------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    proc: Any,
    base: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
    log_path: Any = None,
) -> dict[str, Any]:
    """Poll ``base``/readyz until it answers 200 (returns its body); fails if ``proc`` exits first or the
    deadline passes (with the tail of ``log_path`` when given)."""
    import time
    from pathlib import Path

    import httpx

    def tail() -> str:
        return Path(log_path).read_text()[-3000:] if log_path is not None else ""

    deadline = time.monotonic() + timeout
    # One client for all polls: a new httpx client costs ~30 ms of CPU (its SSL context), which a test
    # process starting many servers (the crash drill) would spend while the server boots beside it.
    with httpx.Client(headers=headers, timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}: {tail()}")
            try:
                r = client.get(f"{base}/readyz")
                if r.status_code == 200:
                    return dict(r.json())
            except httpx.TransportError:
                pass
            time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"server did not become ready within {timeout} s: {tail()}")


@contextmanager
def serve_app(app: Any, port: int, ready_timeout: float = 120.0) -> Iterator[str]:
    """Run a FastAPI ``app`` under uvicorn in a thread; yield its base URL once the worker settled."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    app.state.worker.wait_ready(ready_timeout)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def serve(**overrides: Any) -> Iterator[str]:
    """The app built from ``load_settings(**overrides)`` under uvicorn in a thread; yields its base URL once
    it is ready (or failed)."""
    import tempfile
    from pathlib import Path

    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings

    overrides.setdefault("data_dir", Path(tempfile.mkdtemp(prefix="retinaedge-test-")))
    settings = load_settings(port=free_port(), **overrides)
    with serve_app(create_app(settings), settings.port) as url:
        yield url


def dicom_post(client: Any, url: str, data: bytes, **headers: str) -> Any:
    """POST one DICOM instance to ``url``/v1/detect."""
    return client.post(
        f"{url}/v1/detect", content=data, headers={"Content-Type": "application/dicom", **headers}
    )


def wait_done(client: Any, base: str, uid: str, timeout: float = 180) -> dict[str, Any]:
    """GET /v1/results/{uid} until it is 200 (202 meanwhile); returns the result."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"{base}/v1/results/{uid}")
        if r.status_code == 200:
            return dict(r.json())
        assert r.status_code == 202, r.text
        time.sleep(0.05)
    raise AssertionError(f"no result for {uid} after {timeout} s")


def multipart(parts: list[bytes], boundary: str = "b0undary-xyz") -> tuple[bytes, str]:
    """A multipart/related body of application/dicom parts and its Content-Type."""
    body = (
        b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
            for p in parts
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


# -- a Python with torch, torchvision, TensorRT and pycuda blocked ------------------------------------------
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "tensorrt", "pycuda"):
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Block())
    """
)


def run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python where importing torch, torchvision, tensorrt or pycuda fails."""
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


# -- a tegrastats stand-in replaying recorded lines ---------------------------------------------------------
TEGRASTATS = Path(__file__).parent / "fixtures" / "device" / "tegrastats"

STAND_IN = """#!{python}
# Stand-in for tegrastats: replays recorded lines every --interval ms until terminated.
import os, sys, time
open({pidfile!r}, "w").write(str(os.getpid()))
interval = float(sys.argv[sys.argv.index("--interval") + 1]) / 1000
lines = [l for l in open({fixture!r}) if l.strip() and not l.startswith("#")]
i = 0
while True:
    sys.stdout.write(lines[i % len(lines)])
    sys.stdout.flush()
    i += 1
    time.sleep(interval)
"""


def recorded(name: str) -> list[str]:
    """The recorded tegrastats lines of fixture ``name`` (comments left out)."""
    return [line for line in (TEGRASTATS / f"{name}.txt").read_text().splitlines() if line and line[0] != "#"]


def make_stand_in(tmp_path: Path, fixture: str) -> tuple[Path, Path]:
    """An executable tegrastats stand-in replaying ``fixture``; returns it and the file it writes its pid to."""
    script = tmp_path / "tegrastats"
    pidfile = tmp_path / "pid"
    script.write_text(
        STAND_IN.format(
            python=sys.executable, pidfile=str(pidfile), fixture=str(TEGRASTATS / f"{fixture}.txt")
        )
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, pidfile


#: pydicom's own test files: real-world DICOM of many transfer syntaxes, and some broken ones.
def _pydicom_corpus() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


CORPUS = _pydicom_corpus()


# -- backend choice: the demo bundle on a fixed "this device" (no GPU here) --------------------------------
ROOT = Path(__file__).resolve().parents[1]
#: The committed demo bundle (MobileNetV3 FPN, 1 channel 256x256, glioma/meningioma/pituitary, golden).
DEMO = ROOT / "models" / "demo"
DICOM = ROOT / "examples" / "compressed" / "study_01_IM0016_J2K.dcm"


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
