"""Paths the tests read, from the repository root (never from a test file's own location)."""

from __future__ import annotations

from pathlib import Path

import pydicom

#: The repository root (this file is tests/support/paths.py).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The committed demo bundle (MobileNetV3 FPN, 1 channel 256x256, glioma/meningioma/pituitary, golden).
DEMO = REPO_ROOT / "models" / "demo"
#: The sample studies.
EXAMPLES = REPO_ROOT / "examples"
#: One JPEG 2000 instance of the sample studies.
DICOM = EXAMPLES / "compressed" / "study_01_IM0016_J2K.dcm"
#: Recorded outputs (tests/fixtures), and those of the Jetson device tools.
FIXTURES = REPO_ROOT / "tests" / "fixtures"
DEVICE_FIXTURES = FIXTURES / "device"
#: pydicom's own test files: real-world DICOM of many transfer syntaxes, and some broken ones.
CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"
#: The same, as the sorted paths of its ``*.dcm`` files.
CORPUS_FILES = sorted(str(path) for path in CORPUS.glob("*.dcm"))
