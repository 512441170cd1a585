"""Ports and servers: ``retinaedge serve`` as a real subprocess, the app under uvicorn in a thread, and
waiting for either to be ready."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from support.polling import poll


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
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
    import httpx

    def tail() -> str:
        return Path(log_path).read_text()[-3000:] if log_path is not None else ""

    # One client for all polls: a new httpx client costs ~30 ms of CPU (its SSL context), which a test
    # process starting many servers (the crash drill) would spend while the server boots beside it.
    with httpx.Client(headers=headers, timeout=2) as client:

        def ready() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}: {tail()}")
            try:
                r = client.get(f"{base}/readyz")
            except httpx.TransportError:
                return None
            return dict(r.json()) if r.status_code == 200 else None

        body = poll(ready, lambda body: body is not None, timeout=timeout, interval=0.02)
    if body is None:
        proc.kill()
        raise AssertionError(f"server did not become ready within {timeout} s: {tail()}")
    return body


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


@contextmanager
def serve_app(app: Any, port: int, ready_timeout: float = 120.0) -> Iterator[str]:
    """Run a FastAPI ``app`` under uvicorn in a thread; yield its base URL once the worker settled."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    poll(lambda: server.started, timeout=60, interval=0.01)
    for lane in app.state.services.lanes.values():  # every model's worker (several models per appliance)
        lane.worker.wait_ready(ready_timeout)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def serve(**overrides: Any) -> Iterator[str]:
    """The app built from ``load_settings(**overrides)`` under uvicorn in a thread; yields its base URL once
    it is ready (or failed)."""
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings

    overrides.setdefault("data_dir", Path(tempfile.mkdtemp(prefix="retinaedge-test-")))
    settings = load_settings(port=free_port(), **overrides)
    with serve_app(create_app(settings), settings.port) as url:
        yield url


def demo_app(prefix: str, **overrides: Any) -> Any:
    """An app on the committed demo bundle with a fresh data directory (``prefix`` names it), not started."""
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings

    from support.paths import DEMO

    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    overrides.setdefault("model", DEMO)
    return create_app(load_settings(data_dir=data_dir, **overrides))


@contextmanager
def ready_client(app: Any, timeout: float = 120.0) -> Iterator[Any]:
    """FastAPI's TestClient on ``app`` (its lifespan runs), once the model is loaded and self-tested."""
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        for lane in app.state.services.lanes.values():
            assert lane.worker.wait_ready(timeout), lane.worker.reason
        yield client
