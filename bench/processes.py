"""Start one runner in a fresh process and read its JSON result.

Every runtime runs in its own process (sharing one process distorts both: allocator state, thread pools,
caches), one after the other, never at the same time. The child's stderr is this process's, so its
progress bar shows; its result comes back as a JSON file.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from retinaedge.runtime.errors import BenchmarkError

log = logging.getLogger(__name__)

WORKER_MODULE = "retinaedge.bench.worker"
EAGER_MODULE = "retinaedge.bench.eager"
PRECISIONS_MODULE = "retinaedge.bench.precisions"


class WorkerError(BenchmarkError):
    """A runner process failed (its exit status and the tail of its output are in the message)."""


def child_env(threads: int) -> dict[str, str]:
    """The environment for a runner: this one, with OpenMP/BLAS pools at ``threads`` threads."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def run_process(
    module: str, job: str | None, spec: dict[str, Any], work: Path, timeout_s: float, name: str
) -> dict[str, Any]:
    """``python -m module [job] spec.json out.json`` in a new process; its result as a dict.

    Raises :class:`WorkerError` when it exits non-zero, times out or writes no result.
    """
    spec_path = work / f"{name}.spec.json"
    out_path = work / f"{name}.result.json"
    spec_path.write_text(json.dumps({**spec, "work_dir": str(work)}))
    argv = [sys.executable, "-m", module, *([job] if job else []), str(spec_path), str(out_path)]
    log.info("runner %s: starting in its own process", name)
    try:
        proc = subprocess.run(argv, env=child_env(int(spec["threads"])), timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise WorkerError(f"runner {name} did not finish within {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        raise WorkerError(f"runner {name} exited with status {proc.returncode} (its log is above)")
    if not out_path.is_file():
        raise WorkerError(f"runner {name} wrote no result")
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result
