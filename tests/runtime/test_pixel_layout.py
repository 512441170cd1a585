"""The Image Pixel layout checked once per distinct set of its elements (runtime/pixel_layout.py): what
``validate`` finds with the kept layouts is what it finds without them, every bad layout is refused
every time, and the layout reads nothing outside its key."""

from __future__ import annotations

from typing import Any

import pytest
from retinaedge.runtime import pixel_layout
from retinaedge.runtime.dicomio import DEFAULT_LIMITS, Limits, open_dicom, validate
from retinaedge.runtime.discovery import dicom_files
from retinaedge.runtime.errors import RetinaEdgeError
from support.paths import REPO_ROOT
from support.recording import RecordingDataset, variant

SOURCE = REPO_ROOT / "examples" / "study_01" / "IM0001.dcm"


def test_the_layout_reads_only_what_its_key_holds() -> None:
    for source in (SOURCE, variant(SOURCE, NumberOfFrames=1, BitsStored=None)):
        with open_dicom(source) as src:
            recording = RecordingDataset(src.ds)
            pixel_layout._layout(recording, DEFAULT_LIMITS)
        assert recording.asked - set(pixel_layout.LAYOUT_TAGS) == set()


def _outcome(source: Any, limits: Limits) -> Any:
    try:
        with open_dicom(source, limits) as src:
            return validate(src, limits)
    except RetinaEdgeError as exc:
        return type(exc).__name__, str(exc)


BAD = {
    "no rows": {"Rows": 0},
    "bits stored above allocated": {"BitsStored": 17},
    "two samples": {"SamplesPerPixel": 2},
    "unknown photometric": {"PhotometricInterpretation": "XYZ"},
    "RGB with one sample": {"PhotometricInterpretation": "RGB"},
    "no columns": {"Columns": None},
}


@pytest.mark.parametrize("limits", [DEFAULT_LIMITS, Limits(max_frames=2)])
def test_validate_finds_with_kept_layouts_what_it_finds_without(limits: Limits) -> None:
    sources: list[Any] = [
        *dicom_files([REPO_ROOT / "examples"]),
        *(variant(SOURCE, **c) for c in BAD.values()),
    ]
    pixel_layout._LAYOUTS.clear()
    first = [_outcome(s, limits) for s in sources]
    kept = dict(pixel_layout._LAYOUTS)
    assert kept  # the good layouts were kept, by limits too
    again = [_outcome(s, limits) for s in sources]
    assert again == first
    pixel_layout._LAYOUTS.clear()
    assert [_outcome(s, limits) for s in sources] == first  # and cold again
    for name, outcome in zip(BAD, first[-len(BAD) :], strict=True):
        assert isinstance(outcome, tuple), name  # refused, every time
