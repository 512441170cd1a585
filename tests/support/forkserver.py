"""A pre-imported launcher of real ``retinaedge serve`` processes, for tests that start many servers.

A plain start (``support.servers.start_server``) spends most of its time before the server does anything: a new
interpreter imports the CLI, every verb module, numpy, pydicom, onnxruntime and uvicorn (~0.5 s of ~0.8 s
here). :class:`Launcher` starts one Python that does those imports once and then, per start, forks a child
that runs the same ``retinaedge.runtime.cli.main(["serve", ...])`` as ``python -m retinaedge.runtime.cli
serve ...``: the child builds its settings, opens the data directory, recovers the spool, loads the model
and self-tests it exactly as a fresh process does. The child is an ordinary process (SIGKILL and SIGTERM
reach it directly); the launcher, its parent, reaps it, so its pid cannot be reused before the test has
seen it exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from support.polling import poll
from support.servers import wait_ready

#: The launcher's program: imports, then one JSON request per stdin line, one JSON reply per stdout line.
#: {"op": "start", "argv": [...], "log": path} -> {"pid": n}; {"op": "poll", "pid": n} -> {"code": n|None}
#: (the exit status as Popen.returncode gives it, once the child has exited; None while it runs).
PROGRAM = r"""
import json, os, sys
from retinaedge.runtime import cli
cli.build_parser()  # imports every verb module, as every ``retinaedge`` start does
import uvicorn  # what ``serve`` imports when it runs
from retinaedge.service import app
from retinaedge.service.http import protocol, tls
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "start":
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                null = os.open(os.devnull, os.O_RDWR)
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(null, 0)
                os.dup2(null, 1)
                os.dup2(log, 2)
                os.close(null)
                os.close(log)
                code = int(cli.main(request["argv"]))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        reply = {"pid": pid}
    elif request["op"] == "poll":
        done, status = os.waitpid(request["pid"], os.WNOHANG)
        reply = {"code": os.waitstatus_to_exitcode(status) if done else None}
    else:
        reply = {"error": f"unknown op {request['op']!r}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
"""


class Server:
    """A forked ``retinaedge serve`` with the part of :class:`subprocess.Popen`'s interface the tests use."""

    def __init__(self, launcher: Launcher, pid: int) -> None:
        self._launcher = launcher
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._launcher.request(op="poll", pid=self.pid)["code"]
        return self.returncode

    def wait(self, timeout: float) -> int:
        """Wait for the exit (polled every 10 ms), or raise :class:`subprocess.TimeoutExpired`."""
        code = poll(self.poll, lambda code: code is not None, timeout=timeout, interval=0.01)
        if code is None:
            raise subprocess.TimeoutExpired(f"retinaedge serve (pid {self.pid})", timeout)
        return code

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:  # not reaped yet: the pid is still this process (maybe a zombie)
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 120.0) -> None:
        """A graceful stop (SIGTERM); killed, and :class:`subprocess.TimeoutExpired` raised, when it does
        not exit within ``timeout`` seconds."""
        self.terminate()
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise


class Launcher:
    """``with Launcher() as launcher: server = launcher.start_server(bundle, config, port)``; tests get the
    session's one as the ``launcher`` fixture (tests/conftest.py).

    The servers get the launcher's environment (the test process's when the launcher started), not the
    test's at the time of the start: a test that sets ``RETINAEDGE_*`` variables for its server uses
    :func:`support.servers.start_server`. Everything else is passed as with ``start_server``: ``--config``."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", PROGRAM],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._children: list[Server] = []

    def request(self, **request: Any) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise AssertionError(f"the launcher exited with {self._proc.wait(10)}")
        reply = dict(json.loads(line))
        assert "error" not in reply, reply
        return reply

    def start_server(
        self,
        bundle: Any,
        config: Any,
        port: int,
        timeout: float = 120.0,
        headers: dict[str, str] | None = None,
    ) -> Server:
        """As :func:`support.servers.start_server`: ``retinaedge serve`` on 127.0.0.1:``port`` with ``--config``,
        its log appended to ``server-<port>.log`` beside the config; returned once /readyz is 200."""
        log_path = Path(config).parent / f"server-{port}.log"
        model = ["--model", str(bundle)] if bundle is not None else []  # None: the config's models
        argv = ["serve", *model, "--port", str(port), "--config", str(config)]
        server = Server(self, int(self.request(op="start", argv=argv, log=str(log_path))["pid"]))
        self._children.append(server)
        wait_ready(server, f"http://127.0.0.1:{port}", headers=headers, timeout=timeout, log_path=log_path)
        return server

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for server in self._children:  # what a failed test left running
                if server.poll() is None:
                    server.kill()
                    server.wait(30)
        finally:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait(30)
