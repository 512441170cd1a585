"""Which DICOM instances a run uses: files in a fixed order, repeated until N frames.

Directories are searched recursively for ``*.dcm`` (sorted); each file's frame count comes from its
validated header (:func:`retinaedge.runtime.dicomio.validate`), so a multi-frame instance counts for all
of its frames. No pixel data is decoded here.
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


def find_files(sources: Sequence[Path]) -> list[Path]:
    """The DICOM files named or found (recursively, ``*.dcm``, sorted) under ``sources``, in order."""
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files += sorted(p for p in src.rglob("*.dcm") if p.is_file())
        elif src.is_file():
            files.append(src)
        else:
            raise ConfigError(f"{src} is neither a DICOM file nor a directory")
    if not files:
        raise ConfigError(f"no DICOM files (*.dcm) in {[str(s) for s in sources]}")
    return files


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
