"""The benchmark's own service process: ``retinaedge serve`` with the simulated accelerator as its backend.

``python -m retinaedge.bench.accel_serve TABLE.npz PROFILE.json [retinaedge arguments...]`` registers
:mod:`.accelerator` under :data:`~.accelerator.NAME` in this process's backend registry, configures it
with the recorded table and the profile file (the benchmark rewrites it to change the profile), and runs the ``retinaedge`` command line with the remaining
arguments (``serve --model ...``, ``RETINAEDGE_BACKEND`` naming the simulated accelerator). This is the
only seam: the service builds its app, pipeline and threads exactly as ``retinaedge serve`` does, and the
registry of every other process never knows the name.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    """Register and configure the simulated accelerator, then run ``retinaedge`` with the rest of argv."""
    from retinaedge.bench.accelerator import NAME, configure
    from retinaedge.runtime.backends.registry import register
    from retinaedge.runtime.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        raise SystemExit("usage: python -m retinaedge.bench.accel_serve TABLE PROFILE serve ...")
    register(NAME, "retinaedge.bench.accelerator")
    configure(Path(args[0]), Path(args[1]))
    rest = args[2:]
    return cli_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
