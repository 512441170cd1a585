"""Which real DICOM instances a benchmark run uses, in what order."""

from __future__ import annotations

from pathlib import Path

import pytest
from retinaedge.bench.inputs import plan_instances
from retinaedge.runtime.discovery import dicom_files
from retinaedge.runtime.errors import ConfigError
from support.paths import EXAMPLES


def test_files_in_order_then_repeated_until_enough_frames() -> None:
    files = dicom_files([EXAMPLES / "study_01", EXAMPLES / "study_01_multiframe"])
    assert len(files) == 28 and files[0].name == "IM0001.dcm" and files[-1].name == "MF0001.dcm"
    four = plan_instances(files, 4)
    assert [i.path.name for i in four] == ["IM0001.dcm", "IM0002.dcm", "IM0003.dcm", "IM0004.dcm"]
    sixty = plan_instances(files, 60)
    assert [i.frames for i in sixty[26:29]] == [1, 27, 1]  # the multi-frame counts for all its frames
    assert sum(i.frames for i in sixty) == 60 and sixty[28].path.name == "IM0001.dcm"


def test_bad_sources_and_counts_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        dicom_files([tmp_path / "missing"])
    with pytest.raises(ConfigError):
        dicom_files([tmp_path])  # no DICOM file
    with pytest.raises(ConfigError):
        plan_instances(dicom_files([EXAMPLES / "study_01"]), 0)
