"""Fixtures of the service tests: a second model bundle (tests/support/several.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.several import export_any_mr


@pytest.fixture(scope="session")
def any_mr_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint exported again as a second model (any MR orientation), once per session."""
    return export_any_mr(tmp_path_factory.mktemp("anymr"))
