"""A local, CPU-only ``tritonserver`` from the ``nvidia-pytriton`` wheel, for tests and measurements.

The wheel (``pip install --no-deps nvidia-pytriton==0.7.0``; its own numpy<2 pin is not needed for the
binary) ships ``pytriton/tritonserver/bin/tritonserver`` (Triton 2.51) with the python backend only, its
shared libraries in ``nvidia_pytriton.libs`` and a python backend stub per Python version. To run it:

- ``LD_LIBRARY_PATH``: this interpreter's ``libpython`` directory first (the stub embeds Python and must
  load the same one as this interpreter), then ``nvidia_pytriton.libs``;
- a backend directory whose ``python/`` holds ``libtriton_python.so``, ``triton_python_backend_utils.py``
  and the stub for the running Python (``python_backend_stubs/3.X/triton_python_backend_stub``);
- ``PATH`` starting with a small venv of this interpreter's base Python: the stub ignores ``PYTHONPATH``
  and finds its environment through the ``python3`` on ``PATH``. That venv's ``.pth`` lists
  :data:`PYTHON_ENV_DIR` (``numpy<2``, next to the wheel's venv) before this interpreter's site-packages
  (onnxruntime for ``model.py``): the 2.51 stub exchanges tensors with numpy 1's ABI; under numpy 2 every
  output reaches the server empty. ``make test`` installs it:
  ``pip install --no-deps --target .venv/triton-python-env numpy==1.26.4``.

Use :class:`LocalTriton` (``start()``, ``stop()``, ``restart()``; a context manager), or from the shell::

    python tools/triton_local.py --repository REPO [--http-port 8000 --grpc-port 8001 --metrics-port 8002]
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

log = logging.getLogger("triton_local")


#: Directory name, in the venv that holds the wheel, of the python backend's numpy<2 (see above).
PYTHON_ENV_DIR = "triton-python-env"
NUMPY_PIN = "numpy==1.26.4"


class TritonUnavailable(RuntimeError):
    """The wheel is not installed, or this Python has no stub in it (the message says which)."""


def wheel_paths() -> tuple[Path, Path, Path, Path]:
    """``(tritonserver binary, shared library directory, python backend stub, numpy<2 directory)``."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TritonUnavailable(
            "the nvidia-pytriton wheel is not installed (pip install --no-deps nvidia-pytriton==0.7.0; "
            "make test installs it)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    binary = root / "tritonserver" / "bin" / "tritonserver"
    libs = root.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    for needed in (binary, libs, stub):
        if not needed.exists():
            raise TritonUnavailable(f"the nvidia-pytriton wheel has no {needed} (Python {version})")
    soname = sysconfig.get_config_var("INSTSONAME") or f"libpython{version}.so.1.0"
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "/usr/lib")
    try:  # the stub embeds Python: it links this version's shared libpython
        ctypes.CDLL(str(libdir / soname) if (libdir / soname).exists() else soname)
    except OSError:
        raise TritonUnavailable(
            f"the python backend stub needs {soname}, which is not installed (Debian: apt-get install "
            f"libpython{version}; .ci/run does)"
        ) from None
    env_dir = root.parents[3] / PYTHON_ENV_DIR  # site-packages -> lib/python3.X -> lib -> the venv
    if not (env_dir / "numpy").is_dir():
        raise TritonUnavailable(
            f"no numpy<2 for the python backend stub in {env_dir}: "
            f"pip install --no-deps --target {env_dir} {NUMPY_PIN} (make test does)"
        )
    return binary, libs, stub, env_dir


class LocalTriton:
    """``tritonserver`` on 127.0.0.1 serving ``repository`` (explicit model control: every model loaded).

    ``http_port``/``grpc_port``/``metrics_port``: where it listens; ``log_path``: its output.
    """

    def __init__(
        self,
        repository: Path,
        *,
        http_port: int,
        grpc_port: int,
        metrics_port: int,
        log_path: Path | None = None,
        models: tuple[str, ...] = (),
    ) -> None:
        self.binary, self.libs, self.stub, self.python_env_dir = wheel_paths()
        self.repository = Path(repository)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.models = models
        self._home = Path(tempfile.mkdtemp(prefix="retinaedge-triton-"))
        self.log_path = log_path or self._home / "tritonserver.log"
        self.backends = self._backend_dir()
        self.stub_venv = self._stub_venv()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint (tritonclient takes no scheme)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _backend_dir(self) -> Path:
        src = self.binary.parent.parent / "backends" / "python"
        dst = self._home / "backends" / "python"
        dst.mkdir(parents=True)
        for item in src.iterdir():
            if item.is_file():
                (dst / item.name).symlink_to(item)
        shutil.copy2(self.stub, dst / "triton_python_backend_stub")
        return dst.parent

    def _stub_venv(self) -> Path:
        """A venv of the base Python whose site-packages are numpy<2, then this interpreter's."""
        venv = self._home / "stub-venv"
        base = Path(sys.base_prefix)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        site = venv / "lib" / version / "site-packages"
        site.mkdir(parents=True)
        (venv / "bin").mkdir()
        real = Path(sys._base_executable if hasattr(sys, "_base_executable") else sys.executable)
        for name in ("python3", version):
            (venv / "bin" / name).symlink_to(real)
        (venv / "pyvenv.cfg").write_text(
            f"home = {real.parent}\ninclude-system-site-packages = false\nversion = {sys.version.split()[0]}\n"
            f"executable = {real}\n"
        )
        dirs = [str(self.python_env_dir)] + [
            p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir() and str(base) not in p
        ]
        (site / "00-retinaedge.pth").write_text("\n".join(dirs) + "\n")
        return venv

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, str(self.libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        env.pop("PYTHONPATH", None)
        env["PATH"] = os.pathsep.join([str(self.stub_venv / "bin"), env.get("PATH", "")])
        return env

    def argv(self) -> list[str]:
        loads = [f"--load-model={m}" for m in self.models] or ["--load-model=*"]
        return [
            str(self.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.backends}",
            "--model-control-mode=explicit",
            *loads,
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--log-verbose=0",
            f"--backend-config=python,shm-region-prefix-name=retinaedge{os.getpid()}x{self.http_port}",
        ]

    def start(self, timeout: float = 60.0) -> LocalTriton:
        """Start and wait (at most ``timeout`` s) until ``/v2/health/ready`` answers 200."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv(), stdout=out, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready():
                log.info("tritonserver ready on %s (pid %d)", self.http_url, self.proc.pid)
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Triton unloads its models and exits), SIGKILL after ``timeout`` s; the whole group."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def restart(self, timeout: float = 60.0) -> LocalTriton:
        self.stop()
        return self.start(timeout)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = LocalTriton(
        args.repository, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port
    )
    with server:
        log.info("serving %s; log %s; Ctrl-C stops", args.repository, server.log_path)
        try:
            while server.proc is not None and server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
