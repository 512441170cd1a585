"""The import rules of pyproject.toml ([tool.importlinter], docs/architecture.md) hold, and break when a
module imports upwards: the check `make lint` runs (lint-imports) is a real one."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.paths import REPO_ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def probe_module() -> Iterator[Path]:
    """A module dropped into the runtime package for one test (removed afterwards, whatever happens)."""
    path = REPO_ROOT / "runtime" / "_import_rule_probe.py"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def test_the_tree_keeps_every_contract() -> None:
    done = lint_imports()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("source", "contract"),
    [
        ("from retinaedge.service.settings import load_settings", "Packages: the benchmark on top"),
        ("import retinaedge.device.l4t", "The runtime reaches the device only through the TensorRT backend"),
    ],
)
def test_an_upward_import_breaks_a_contract(probe_module: Path, source: str, contract: str) -> None:
    probe_module.write_text(f'"""An upward import, for the import check to find."""\n\n{source}\n')
    done = lint_imports()
    assert done.returncode != 0
    assert "retinaedge.runtime._import_rule_probe" in done.stdout
    assert contract in done.stdout.replace("\n", " ") and "BROKEN" in done.stdout
