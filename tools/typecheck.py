"""Run mypy over the five packages as they are imported (``retinaedge.runtime``, ...), not as directories.

The source directories (``runtime/``, ``service/``, ...) install as subpackages of the ``retinaedge``
namespace through ``[tool.setuptools.package-dir]``; an editable install finds them with an import hook
that mypy does not follow. This script lays out a tree of symbolic links, ``retinaedge/<package>`` ->
``<repo>/<package>``, in a temporary directory, puts it on ``MYPYPATH`` and checks the packages by their
import names, with the settings of ``[tool.mypy]`` in pyproject.toml. ``make lint`` and ``make test``
run it; extra arguments go to mypy.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Source directory -> package under the ``retinaedge`` namespace (pyproject.toml's package-dir).
PACKAGES = ("export", "runtime", "device", "service", "bench")

log = logging.getLogger("typecheck")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="retinaedge-typecheck-") as tmp:
        namespace = Path(tmp) / "retinaedge"
        namespace.mkdir()
        for name in PACKAGES:
            (namespace / name).symlink_to(REPO_ROOT / name, target_is_directory=True)
        env = {**os.environ, "MYPYPATH": tmp}
        command = [sys.executable, "-m", "mypy", "--config-file", str(REPO_ROOT / "pyproject.toml")]
        for name in PACKAGES:
            command += ["-p", f"retinaedge.{name}"]
        log.info("mypy over %s", ", ".join(f"retinaedge.{n}" for n in PACKAGES))
        return subprocess.run([*command, *argv], env=env, cwd=REPO_ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
