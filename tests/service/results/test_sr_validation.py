"""The SRs the service builds, checked by an independent validator: dicom3tools' ``dciodvfy``.

Installed by ``.ci/run`` as root (Debian's dicom3tools); skipped with the reason elsewhere. The only
finding allowed is the warning every private coding scheme gets (``99RETINAEDGE``, the model's own class
and score codes, declared in the Coding Scheme Identification Sequence); no error.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from retinaedge.runtime.detector import Detector
from retinaedge.service.results.evidence import header_from_json, split_header
from retinaedge.service.results.sr import build_sr
from support.paths import DEMO, REPO_ROOT

DCIODVFY = shutil.which("dciodvfy")
pytestmark = pytest.mark.skipif(DCIODVFY is None, reason="needs dicom3tools' dciodvfy (installed by .ci/run)")


@pytest.mark.parametrize("name", ["study_01/IM0015.dcm", "study_01_multiframe/MF0001.dcm"])
def test_instance_sr_has_no_finding_but_the_private_scheme(tmp_path: Path, name: str) -> None:
    source = REPO_ROOT / "examples" / name
    with Detector.open(DEMO, threads=1) as det:
        result = det.detect(source).to_json()
        manifest = det.bundle.manifest
    assert sum(len(f["detections"]) for f in result["frames"]) > 0  # the SR has measurements to check
    with open(source, "rb") as fh:
        evidence, identity = split_header(fh)
    sr = build_sr(header_from_json(evidence, identity), result, manifest.name, str(manifest.model_sha256))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    out = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "Comprehensive3DSR" in text, text[:500]  # it recognised the IOD it checked
    findings = [ln for ln in text.splitlines() if ln.startswith(("Error", "Warning"))]
    unexpected = [f for f in findings if "<99RETINAEDGE>" not in f]
    assert not unexpected, unexpected
