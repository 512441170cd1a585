"""The intended-use check once per distinct set of the elements its rules read (runtime/intended_use_memo.py):
the same outcome as the rules on every file, and no element read by a rule left out of the key."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from retinaedge.runtime.dicomio import open_dicom
from retinaedge.runtime.discovery import dicom_files
from retinaedge.runtime.intended_use import _KEYS, IntendedUse
from retinaedge.runtime.intended_use_memo import RULE_TAGS, CheckMemo, memo_key
from support.paths import REPO_ROOT
from support.recording import RecordingDataset, variant

SOURCE = REPO_ROOT / "examples" / "study_01" / "IM0001.dcm"

#: Every rule, each with a spec that reads what it can (the manifest's own rules are a subset).
EVERY_RULE = IntendedUse.from_dict(
    {
        "modalities": {"allow": ["MR"]},
        "sop_classes": {"allow": ["1.2.840.10008.5.1.4.1.1.4"]},
        "image_types": {"exclude": ["LOCALIZER"]},
        "body_parts": {"allow": ["BRAIN"], "region_codes": [{"value": "12738006", "scheme": "SCT"}]},
        "photometric": {"allow": ["MONOCHROME2"]},
        "rows": {"min": 64, "max": 2048},
        "columns": {"min": 64, "max": 2048},
        "frames": {"min": 1, "max": 10},
        "pixel_spacing_mm": {"min": 0.1, "max": 5},
        "orientation": {"allow": ["axial"]},
        "series_description": {"include": ["T1"], "exclude": ["SCOUT"]},
    }
)


def test_every_element_a_rule_reads_is_in_the_key() -> None:
    assert set(_KEYS) == {r.name for r in EVERY_RULE.rules}  # every rule there is, here
    for source in (SOURCE, variant(SOURCE, BodyPartExamined=None, SeriesDescription="AX T1")):
        with open_dicom(source) as src:
            recording = RecordingDataset(src.ds)
            EVERY_RULE.check(recording)
        assert recording.asked - set(RULE_TAGS) == set(), sorted(f"{t:08X}" for t in recording.asked)


def _corpus() -> list[Path | bytes]:
    return [
        *dicom_files([REPO_ROOT / "examples"]),
        variant(SOURCE, Modality="CT"),
        variant(SOURCE, Rows=32),
        variant(SOURCE, ImageType=["DERIVED", "SECONDARY", "LOCALIZER"]),
        variant(SOURCE, ImageOrientationPatient=[0, 1, 0, 0, 0, -1]),
        variant(SOURCE, BodyPartExamined=None),
        variant(SOURCE, BodyPartExamined="KNEE"),
        variant(SOURCE, SeriesDescription="SCOUT T1"),
        variant(SOURCE, PixelSpacing=[9, 9]),
        variant(SOURCE, SpecificCharacterSet="ISO_IR 192", SeriesDescription="AX T1 Ä"),
    ]


@pytest.mark.parametrize("use", [EVERY_RULE, IntendedUse.from_dict({"modalities": {"allow": ["MR"]}})])
def test_the_memo_gives_what_the_rules_give_twice_over(use: IntendedUse) -> None:
    memo = CheckMemo(use)
    for _round in range(2):
        for source in _corpus():
            with open_dicom(source) as src, open_dicom(source) as again:
                assert memo.check(src.ds) == use.check(again.ds)
    assert memo.hits >= len(_corpus())  # the second round came from the memo


def test_what_the_key_cannot_stand_for_runs_the_rules() -> None:
    with open_dicom(SOURCE) as src:
        assert memo_key(src.ds) is not None
        src.ds.Rows  # noqa: B018 (converted now: its raw bytes are gone)
        assert memo_key(src.ds) is None
    ds = pydicom.dcmread(SOURCE)
    ds.SharedFunctionalGroupsSequence = [pydicom.Dataset()]
    assert memo_key(ds) is None
    memo = CheckMemo(EVERY_RULE, size=2)
    for source in _corpus()[:6]:  # more keys than it keeps: emptied, never wrong
        with open_dicom(source) as src, open_dicom(source) as again:
            assert memo.check(src.ds) == EVERY_RULE.check(again.ds)
    assert len(memo._seen) <= 2
