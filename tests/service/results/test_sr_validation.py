"""The SRs the service builds, checked by an independent validator: dicom3tools' ``dciodvfy``.

Installed by ``.ci/run`` as root (Debian's dicom3tools); skipped with the reason elsewhere. The demo
bundle maps every class to a standard code, so its SRs have neither errors nor warnings (IHE AI Results).
A class without a code is named by the private scheme ``99RETINAEDGE`` (declared in the Coding Scheme
Identification Sequence), and the warning every private scheme gets is then the only finding.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pytest
from retinaedge.runtime.detector import Detector
from retinaedge.service.results.evidence import header_from_json, split_header
from retinaedge.service.results.selection import frame_findings
from retinaedge.service.results.sr import build_sr
from support.paths import DEMO, REPO_ROOT

DCIODVFY = shutil.which("dciodvfy")
pytestmark = pytest.mark.skipif(DCIODVFY is None, reason="needs dicom3tools' dciodvfy (installed by .ci/run)")


@pytest.mark.parametrize("name", ["study_01/IM0015.dcm", "study_01_multiframe/MF0001.dcm"])
def test_a_class_without_a_code_gets_only_the_private_scheme_warning(tmp_path: Path, name: str) -> None:
    source = REPO_ROOT / "examples" / name
    with Detector.open(DEMO, threads=1) as det:
        result = det.detect(source).to_json()
        manifest = det.bundle.manifest
    labels = {d["label"] for f in result["frames"] for d in frame_findings(f)}
    assert "glioma" in labels  # the uncoded class below is among the findings
    codes = {k: v for k, v in manifest.class_codes.items() if k != "glioma"}
    with open(source, "rb") as fh:
        evidence, identity = split_header(fh)
    sr = build_sr(
        header_from_json(evidence, identity),
        result,
        manifest.name,
        str(manifest.model_sha256),
        codes=codes,
    )
    assert [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence] == ["99RETINAEDGE"]
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    out = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "Comprehensive3DSR" in text, text[:500]  # it recognised the IOD it checked
    findings = [ln for ln in text.splitlines() if ln.startswith(("Error", "Warning"))]
    unexpected = [f for f in findings if "<99RETINAEDGE>" not in f]
    assert findings and not unexpected, unexpected


def _dciodvfy(path: Path) -> list[str]:
    out = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "Comprehensive3DSR" in text, text[:500]
    return [ln for ln in text.splitlines() if ln.startswith(("Error", "Warning"))]


@pytest.mark.parametrize("name", ["study_01/IM0016.dcm", "study_01_multiframe/MF0001.dcm"])
def test_instance_sr_of_the_demo_bundle_is_clean_and_names_its_algorithm(tmp_path: Path, name: str) -> None:
    """The demo maps every class to a standard code: 0 errors, 0 warnings; findings only; the algorithm
    in the Contributing Equipment Sequence (Processing Equipment) with the model's sha256."""
    source = REPO_ROOT / "examples" / name
    with Detector.open(DEMO, threads=1) as det:
        result = det.detect(source).to_json()
        manifest = det.bundle.manifest
    findings = [d for f in result["frames"] for d in frame_findings(f)]
    assert findings and len(findings) < sum(len(f["detections"]) for f in result["frames"])
    codes = manifest.class_codes
    assert set(codes) == set(manifest.class_names)
    with open(source, "rb") as fh:
        evidence, identity = split_header(fh)
    sr = build_sr(
        header_from_json(evidence, identity), result, manifest.name, str(manifest.model_sha256), codes=codes
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert _dciodvfy(path) == []
    assert "CodingSchemeIdentificationSequence" not in sr
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert len(groups) == len(findings)
    assert {(g.finding_type.value, g.finding_type.scheme_designator) for g in groups} <= {
        (c.value, c.scheme) for c in codes.values()
    }
    processing = [
        e
        for e in sr.ContributingEquipmentSequence
        if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    ]
    ours = [e for e in processing if e.Manufacturer == "retinaedge"]
    assert len(ours) == 1 and ours[0].ManufacturerModelName == manifest.name
    assert str(manifest.model_sha256) in list(ours[0].SoftwareVersions)
    assert ours[0].DeviceSerialNumber == sr.DeviceSerialNumber  # the same device in both places
