"""Helpers shared by tests (importable as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

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


def start_server(bundle: Any, config: Any, port: int, timeout: float = 120.0) -> Any:
    """``retinaedge serve`` as a real subprocess on 127.0.0.1:``port``; returns the Popen once /readyz is 200."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    # The server's log goes to a file: a pipe nobody reads fills up and blocks the server's logging.
    log_path = Path(config).parent / f"server-{port}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "retinaedge.runtime.cli",
                "serve",
                "--model",
                str(bundle),
                "--port",
                str(port),
                "--config",
                str(config),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not become ready")


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")
