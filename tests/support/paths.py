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


_ANY_IMAGE: list[Path] = []


def demo_any_image() -> Path:
    """The demo bundle without its intended use (a model that takes every image it can read), made once
    per process in a temporary directory: for the tests of decoding and robustness that send pydicom's
    corpus (CT, ultrasound, secondary captures, broken files) through the runtime and the service. The
    files are hard links where the file system allows (copies elsewhere); the manifest is rewritten."""
    if _ANY_IMAGE:
        return _ANY_IMAGE[0]
    import json
    import os
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="retinaedge-demo-any-image-")) / "demo"
    root.mkdir()
    for source in DEMO.iterdir():
        if source.name == "manifest.json" or not source.is_file():
            continue
        try:
            os.link(source, root / source.name)
        except OSError:
            shutil.copyfile(source, root / source.name)
    manifest = json.loads((DEMO / "manifest.json").read_text())
    manifest.pop("intended_use", None)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _ANY_IMAGE.append(root)
    return root
