"""An engine build in a child process (``retinaedge build``) while the service answers on ONNX Runtime.

Used when ``engine_build_while=onnxruntime``: a TensorRT build takes minutes on a Jetson, and running it in
a child keeps its memory peak, its CUDA context and any crash out of the serving process. The child writes
the engine into the same cache the service reads (atomically, under the cache's lock); when it exits 0
the service loads the engine from the cache on its inference thread, self-tests it and switches. When it
fails, the failure is recorded in the cache (so restarts do not rebuild in a loop) and the reason is
shown by ``/readyz``; ONNX Runtime keeps serving.
"""

from __future__ import annotations

import collections
import logging
import math
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from retinaedge.runtime.backends.tensorrt.settings import EngineConfig
from retinaedge.runtime.threadname import name_this_thread

log = logging.getLogger(__name__)

#: Lines of the child's log kept for the failure reason.
TAIL_LINES = 20


def build_argv(model: Path, settings: EngineConfig) -> list[str]:
    """The ``retinaedge build`` command line that builds the engine these settings ask for, for the
    bundle in directory ``model``.

    Its build options key the same cache entry as :meth:`EngineConfig.build_options` (tested).
    """
    b = settings.max_batch_size
    argv = [
        sys.executable,
        "-m",
        "retinaedge.runtime.cli",
        "build",
        "--model",
        str(model),
        "--precision",
        settings.engine_precision,
        "--batch",
        f"1,{b},{b}",
        "--workspace-mib",
        str(settings.engine_workspace_mib),
        "--nms",
        settings.engine_nms,
        "--cache-dir",
        str(settings.engine_cache_root),
        "--cache-max-mib",
        str(max(1, math.ceil(settings.engine_cache_max_bytes / 1024**2))),
    ]
    if settings.engine_dla_core is not None:
        argv += ["--dla-core", str(settings.engine_dla_core)]
    return argv


class BackgroundBuild:
    """Run ``argv`` once in a child process; ``on_done(ok, log_tail)`` is called from a watcher thread.

    ``status`` is ``idle``, ``running``, ``succeeded``, ``failed`` or ``stopped``. The child's stderr is
    relayed line by line to this module's logger (a build log carries no patient data).
    """

    def __init__(self, argv: list[str], on_done: Callable[[bool, str], None]) -> None:
        self.argv = argv
        self._on_done = on_done
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.status = "idle"
        self.returncode: int | None = None

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("this background build was already started")
        log.info("starting the engine build in a child process: %s", " ".join(self.argv[3:]))
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self.status = "running"
        self._thread = threading.Thread(target=self._watch, name="retinaedge-engine-build", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        name_this_thread()
        assert self._proc is not None and self._proc.stdout is not None
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        for line in self._proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                log.info("build: %s", line)
        self.returncode = self._proc.wait()
        if self._stopping.is_set():
            self.status = "stopped"
            return
        ok = self.returncode == 0
        self.status = "succeeded" if ok else "failed"
        if not ok:
            log.error("the engine build exited with status %d", self.returncode)
        try:
            self._on_done(ok, "\n".join(tail))
        except Exception:  # the callback reports through the worker; never kill the watcher silently
            log.exception("handling the end of the engine build failed")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the child and the callback; True when both are done."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate a running child (service shutdown); kill it if it does not exit in ``timeout``."""
        if self._proc is None or self._proc.poll() is not None:
            self.wait(timeout)
            return
        self._stopping.set()
        log.info("stopping the engine build (the service is shutting down)")
        self._proc.terminate()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self.wait(timeout)


def failure_summary(log_tail: str, returncode: int | None = None) -> str:
    """Why a build failed: its last ERROR log line; a child killed by a signal (the kernel's OOM killer on
    a small Jetson sends SIGKILL) says so; else its last line."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    errors = [line for line in lines if " ERROR " in line]
    if errors:
        return errors[-1].split(": ", 1)[-1][:500]
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"the build process was killed by {name}{hint}"
    return lines[-1][:500] if lines else "no output"
