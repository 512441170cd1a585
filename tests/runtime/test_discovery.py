"""The one rule that turns a command line's files and directories into DICOM inputs, for every verb."""

from __future__ import annotations

from pathlib import Path

import pytest
from retinaedge.runtime.discovery import dicom_files, has_dicom_header
from retinaedge.runtime.errors import ConfigError
from support.paths import EXAMPLES

HEADER = bytes(128) + b"DICM"


def _tree(root: Path) -> Path:
    """A data directory as people have them: images with and without extension, truth, notes, media files."""
    data = root / "data"
    for name in ("b.dcm", "IM000001", "sub/c.dcm", "sub/deeper/d", ".hidden.dcm", ".git/x.dcm", "DICOMDIR"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(HEADER + b"rest of the file")
    for name in ("gt.json", "notes.md", "x.PNG", "LICENSE", ".DS_Store", "short.dcm"):
        (data / name).write_bytes(b"{}" if name != "short.dcm" else b"DICM")
    (data / "empty").write_bytes(b"")
    return data


def test_directories_give_their_dicom_files_sorted_and_recursively(tmp_path: Path) -> None:
    data = _tree(tmp_path)
    assert dicom_files([data]) == [
        data / "IM000001",
        data / "b.dcm",
        data / "sub/c.dcm",
        data / "sub/deeper/d",
    ]
    # order of the arguments kept; each directory sorted on its own
    assert dicom_files([data / "sub", data / "b.dcm"]) == [
        data / "sub/c.dcm",
        data / "sub/deeper/d",
        data / "b.dcm",
    ]


def test_files_named_are_taken_as_given_but_for_exclusions(tmp_path: Path) -> None:
    data = _tree(tmp_path)
    gt = data / "gt.json"
    named = [gt, data / "notes.md", data / "DICOMDIR", data / ".hidden.dcm"]
    assert dicom_files(named, exclude=[gt]) == named[1:]  # e.g. a shell glob over the data directory
    assert gt not in dicom_files([data, gt], exclude=[gt])


def test_missing_paths_and_empty_results_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        dicom_files([tmp_path / "missing"])
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(ConfigError, match="no DICOM files"):
        dicom_files([tmp_path])
    assert dicom_files([]) == []  # nothing asked, nothing found (an optional list such as --parity-dicom)


def test_header_check_and_the_examples(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(HEADER)
    assert has_dicom_header(tmp_path / "f")
    (tmp_path / "g").write_bytes(bytes(127) + b"DICM")
    assert not has_dicom_header(tmp_path / "g")
    # examples/: every image, none of the README, NOTICE or ground truth beside them
    found = dicom_files([EXAMPLES])
    assert len(found) == 29 and all(f.suffix == ".dcm" for f in found)
