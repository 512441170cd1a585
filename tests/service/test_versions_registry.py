"""A model's versions on disk (service/versions/registry.py) and rows of before several models.

The registry: an unchanged settings bundle never takes over from the version activated since, even after
older versions were forgotten; a settings bundle changed on purpose does; trimming never forgets the
active, previous, trial or settings' version nor the one just added. The adoption of rows written by the
one model of before: each goes to the model its result names, and a crash between adopting them and
moving their secondary captures loses no capture. An upload is moved in, not copied, and refused
before it writes into the disk reserve.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from retinaedge.runtime.bundle import load_bundle
from retinaedge.service.results.captures import CaptureFiles, adopt_rows
from retinaedge.service.results.rows import subject_key
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


class Crash(Exception):
    """The process dying at a chosen point (raised where a SIGKILL would land)."""


def rows_of_before(db: Path, captures: CaptureFiles, model: str, n: int) -> list[str]:
    """``n`` done rows of one model without a name (as before several models), each with its capture."""
    store = Store(db)
    uids = [f"1.2.3.{k}" for k in range(1, n + 1)]
    for uid in uids:
        store.add_pending(uid, "1.2", "1.3", "1.4", f"{uid}.dcm", 10)
        store.done(uid, {"model": {"name": model, "sha256": "x" * 64}, "frames": []})
        captures.path(uid).mkdir()
        (captures.path(uid) / "1.dcm").write_text(uid)
    store.close()
    return uids


def start(db: Path, captures: CaptureFiles, served: list[str], die: int | None = None) -> None:
    """What a start does with rows of before (``captures.adopt_rows``, then the sweep of captures no row
    has), or dying with :class:`Crash` before the adoption commits once ``die`` captures were moved
    (nothing after it runs)."""
    store = Store(db)
    try:
        if die is None:
            adopt_rows(store, captures, served)
            captures.keep_only(store.keys())
            return

        def move_then_die(adopted: list[tuple[str, str]]) -> None:
            captures.adopt(adopted[:die], served)
            raise Crash

        with pytest.raises(Crash):
            store.adopt_unnamed(served, before_commit=move_then_die)
        assert store.models() == {""}  # not committed: every row waits for the next start
    finally:
        store.close()


def test_a_crash_while_adopting_rows_of_before_loses_no_capture(tmp_path: Path) -> None:
    db, captures = tmp_path / "state.sqlite3", CaptureFiles(tmp_path / "captures")
    uids = rows_of_before(db, captures, "legacy", 4)
    served = ["screening", "legacy"]
    start(db, captures, served, die=2)  # half of the captures moved
    start(db, captures, served, die=4)  # all of them moved, the rows still without a model
    start(db, captures, served)
    for uid in uids:
        assert (captures.path(subject_key("legacy", uid)) / "1.dcm").read_text() == uid
    assert sorted(p.name for p in captures.root.iterdir()) == sorted(
        captures.path(subject_key("legacy", uid)).name for uid in uids
    )


def test_captures_moved_by_an_interrupted_start_follow_a_changed_setting(tmp_path: Path) -> None:
    """Rows whose result names a model no longer served go to the first model served; when the settings
    list another model first at the next start, captures moved before the crash follow their rows."""
    db, captures = tmp_path / "state.sqlite3", CaptureFiles(tmp_path / "captures")
    uids = rows_of_before(db, captures, "renamed-since", 2)
    start(db, captures, ["a", "b"], die=2)
    start(db, captures, ["b", "a"])
    for uid in uids:
        assert (captures.path(subject_key("b", uid)) / "1.dcm").read_text() == uid
        assert not captures.path(subject_key("a", uid)).exists()


def test_an_upload_is_moved_in_not_copied(tmp_path: Path, demo_version_b: Path) -> None:
    """Staging an unpacked upload (``move``) renames its files into the version: the same files (inodes),
    no second copy on the data volume."""
    source = Path(shutil.copytree(demo_version_b, tmp_path / "upload"))
    inodes = {f.name: f.stat().st_ino for f in source.iterdir()}
    versions = ModelVersions(tmp_path / NAME, NAME)
    version, _ = versions.stage(source, None, move=True)
    staged = versions.path(version)
    assert {f.name: f.stat().st_ino for f in staged.iterdir()} == inodes
    assert not any(source.iterdir())


def test_an_upload_is_refused_before_it_writes_into_the_reserve(tmp_path: Path, demo_version_b: Path) -> None:
    """The room is checked before a byte is written: a body of undeclared length as it arrives, an
    archive's unpacked files before a file is unpacked (a reserve larger than any disk refuses both)."""
    import asyncio
    import io
    import tarfile
    from collections.abc import AsyncIterator

    from retinaedge.runtime.errors import InsufficientStorageError
    from retinaedge.service.versions.upload import Room, receive, unpack_archive

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for item in sorted(demo_version_b.iterdir()):
            tar.add(item, arcname=item.name)
    body = buf.getvalue()
    full, roomy = Room(tmp_path, reserve=10**18), Room(tmp_path, reserve=0)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    archive = tmp_path / "bundle.tar"
    with pytest.raises(InsufficientStorageError, match="the archive as it arrives.*min_free_bytes"):
        asyncio.run(receive(chunks(), archive, len(body), full))
    assert archive.stat().st_size == 0
    assert asyncio.run(receive(chunks(), archive, len(body), roomy)) == len(body)
    dest = tmp_path / "bundle"
    dest.mkdir()
    with pytest.raises(InsufficientStorageError, match="its unpacked files"):
        unpack_archive(archive, dest, len(body), full)
    assert not any(dest.iterdir()) and archive.exists()
    unpack_archive(archive, dest, len(body), roomy)
    assert not archive.exists()  # the archive goes once unpacked
    assert sorted(f.name for f in dest.iterdir()) == sorted(f.name for f in demo_version_b.iterdir())
