"""A model's versions on disk (service/versions/registry.py) and rows of before several models.

The registry: an unchanged settings bundle never takes over from the version activated since, even after
older versions were forgotten; a settings bundle changed on purpose does; trimming never forgets the
active, previous, trial or settings' version nor the one just added. The adoption of rows written by the
one model of before: each goes to the model its result names.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from retinaedge.runtime.bundle import load_bundle
from retinaedge.service.results.store import Store
from retinaedge.service.versions.registry import ModelVersions, version_of
from support.paths import DEMO

NAME = "retinaedge-demo-brainmr"


def fake(versions: ModelVersions, version: str, added_at: float) -> None:
    """An old staged version's entry (its folder long gone), as a registry of many updates holds them."""
    versions._state["versions"][version] = {
        "version": version, "sha256": version * 5, "path": str(versions.root / "versions" / version),
        "source": "staged", "added_at": added_at,
    }  # fmt: skip


def test_an_unchanged_setting_never_takes_over_and_trimming_keeps_what_matters(
    tmp_path: Path, demo_version_b: Path
) -> None:
    a, b = load_bundle(DEMO), load_bundle(demo_version_b)
    versions = ModelVersions(tmp_path / NAME, NAME, keep=3)
    assert versions.seed(DEMO, a) == version_of(a)
    staged, _ = versions.stage(demo_version_b, None)
    assert staged == version_of(b)
    versions.activate(staged)
    for n in range(4):  # older versions than every real one: the first to go
        fake(versions, f"{n:012x}", time.time() - 1000 + n)
    versions._write()
    again = ModelVersions(tmp_path / NAME, NAME, keep=3)
    assert again.seed(DEMO, a) == staged  # the setting did not change: B, activated since, stays
    kept = {v.version for v in again.versions()}
    # keep=3: the settings' and the active version stay, with the newest other; the older fakes went.
    assert kept == {version_of(a), staged, "000000000003"}
    assert again.rollback() == version_of(a)
    state = json.loads((tmp_path / NAME / "state.json").read_text())
    assert state["active"] == version_of(a) and state["settings_version"] == version_of(a)


def test_a_setting_changed_on_purpose_is_activated(tmp_path: Path, demo_version_b: Path) -> None:
    a, b = load_bundle(DEMO), load_bundle(demo_version_b)
    versions = ModelVersions(tmp_path / NAME, NAME)
    versions.seed(DEMO, a)
    assert ModelVersions(tmp_path / NAME, NAME).seed(demo_version_b, b) == version_of(b)
    assert ModelVersions(tmp_path / NAME, NAME).seed(demo_version_b, b) == version_of(b)


def test_rows_of_before_go_to_the_model_their_result_names(tmp_path: Path) -> None:
    """A data directory of one model ("legacy"), upgraded with a new model listed first: done rows go to
    the model their result names, the others (pending, failed) to that same old model, not the first."""
    store = Store(tmp_path / "state.sqlite3")
    store.add_pending("1.2.3.1", "1.2", "1.3", "1.4", "a.dcm", 10)
    store.done("1.2.3.1", {"model": {"name": "legacy", "sha256": "x" * 64}, "frames": []})
    store.add_pending("1.2.3.2", "1.2", "1.3", "1.4", "b.dcm", 10)  # pending when the upgrade came
    store.add_pending("1.2.3.3", "1.2", "1.3", "1.4", "c.dcm", 10)
    store.failed("1.2.3.3", "malformed-dicom", "cut short")
    adopted = store.adopt_unnamed(["screening", "legacy"])
    assert sorted(adopted) == [("1.2.3.1", "legacy"), ("1.2.3.2", "legacy"), ("1.2.3.3", "legacy")]
    assert store.bound("screening").counts() == {}
    assert store.bound("legacy").counts() == {"done": 1, "pending": 1, "failed": 1}
    store.close()
