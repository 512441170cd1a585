"""Which DICOM instances a run uses: files in a fixed order, repeated until N frames.

The files come from :func:`retinaedge.runtime.discovery.dicom_files` (the rule every verb uses); each
file's frame count comes from its validated header (:func:`retinaedge.runtime.dicomio.validate`), so a
multi-frame instance counts for all of its frames. No pixel data is decoded here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from retinaedge.runtime.dicomio import open_dicom, validate
from retinaedge.runtime.errors import ConfigError


@dataclass(frozen=True)
class Instance:
    """One DICOM file and how many frames it holds."""

    path: Path
    frames: int


def frame_count(path: Path) -> int:
    """Frames in one instance, from its validated header."""
    with open_dicom(path) as src:
        return validate(src).frames


def plan_instances(files: Sequence[Path], frames_wanted: int) -> list[Instance]:
    """``files`` in order, starting again from the first, until at least ``frames_wanted`` frames."""
    if frames_wanted < 1:
        raise ConfigError(f"the number of frames must be >= 1, got {frames_wanted}")
    counts = {f: frame_count(f) for f in dict.fromkeys(files)}
    plan: list[Instance] = []
    total = 0
    while total < frames_wanted:
        for f in files:
            plan.append(Instance(f, counts[f]))
            total += counts[f]
            if total >= frames_wanted:
                break
    return plan
