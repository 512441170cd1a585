"""Fixtures of the service tests: a second model bundle and other versions of the demo model
(tests/support/several.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.several import export_any_mr, export_demo

#: The demo model's version B: the same checkpoint and name, exported with a higher score threshold.
VERSION_B_SCORE_THRESH = 0.3


@pytest.fixture(scope="session")
def any_mr_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint exported again as a second model (any MR orientation), once per session."""
    return export_any_mr(tmp_path_factory.mktemp("anymr"))


@pytest.fixture(scope="session")
def demo_version_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another version of the demo model (same name): exported with score threshold 0.3 (the demo's is
    0.05), so it keeps exactly the demo's detections scoring 0.3 or more."""
    root = tmp_path_factory.mktemp("demo-b")
    return export_demo(root, "retinaedge-demo-brainmr", "--score-thresh", str(VERSION_B_SCORE_THRESH))


#: The demo model's version C: exported with score threshold 0.5 (a third version, for a trial that sees an
#: activation).
VERSION_C_SCORE_THRESH = 0.5


@pytest.fixture(scope="session")
def demo_version_c(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A third version of the demo model: score threshold 0.5, so it keeps exactly the demo's detections
    scoring 0.5 or more."""
    root = tmp_path_factory.mktemp("demo-c")
    return export_demo(root, "retinaedge-demo-brainmr", "--score-thresh", str(VERSION_C_SCORE_THRESH))
