"""A model's intended use (runtime/intended_use.py): the rules on headers built to pass or fail each one,
the demo bundle on its examples and on out-of-scope instances (generated, and pydicom's real ones), the
header-only check, and the verbs ``route``, ``intended-use`` and ``detect``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from retinaedge.runtime.bundle import load_bundle
from retinaedge.runtime.cli import main
from retinaedge.runtime.detector import Detector
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.intended_use import IntendedUse, NotApplicableError
from support.dicomgen import OUT_OF_SCOPE_RULES, out_of_scope
from support.paths import DEMO, EXAMPLES


@pytest.fixture(scope="module")
def strangers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return out_of_scope(tmp_path_factory.mktemp("out-of-scope"))


def header(**attrs: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


AXIAL_MR = dict(
    Modality="MR",
    SOPClassUID="1.2.840.10008.5.1.4.1.1.4",
    ImageType=["ORIGINAL", "PRIMARY"],
    PhotometricInterpretation="MONOCHROME2",
    Rows=256,
    Columns=256,
    PixelSpacing=[0.9, 0.9],
    ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
    SeriesDescription="AX T1 POST",
)


def rules_failed(use: IntendedUse, **changes: Any) -> dict[str, str]:
    ds = header(**{**AXIAL_MR, **changes})
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
    return {f.rule: f.seen for f in use.check(ds)}


def test_each_rule_passes_and_fails_on_headers_built_for_it() -> None:
    use = IntendedUse.from_dict(
        {
            "modalities": {"allow": ["mr"]},
            "sop_classes": {"allow": ["1.2.840.10008.5.1.4.1.1.4"]},
            "body_parts": {"allow": ["BRAIN"], "region_codes": [{"value": "12738006", "scheme": "SCT"}]},
            "photometric": {"allow": ["MONOCHROME2"]},
            "rows": {"min": 128, "max": 512},
            "columns": {"min": 128},
            "frames": {"max": 100},
            "pixel_spacing_mm": {"min": 0.5, "max": 2.0},
            "orientation": {"allow": ["axial"], "tolerance_deg": 10},
            "series_description": {"include": ["^ax"], "exclude": ["scout"]},
        }
    )
    assert rules_failed(use) == {}
    assert rules_failed(use, Modality="CT") == {"modalities": "CT"}
    assert rules_failed(use, Modality=None) == {"modalities": "missing"}  # missing: reject by default
    assert rules_failed(use, SOPClassUID="1.2.840.10008.5.1.4.1.1.2") == {"sop_classes": "CT Image Storage"}
    assert rules_failed(use, ImageType=["DERIVED", "SECONDARY", "LOCALIZER"]) == {"image_types": "LOCALIZER"}
    assert rules_failed(use, BodyPartExamined=None) == {}  # missing: accept (scanners leave it empty)
    assert rules_failed(use, BodyPartExamined="CHEST") == {"body_parts": "CHEST"}
    coded = Dataset()
    coded.CodeValue, coded.CodingSchemeDesignator = "12738006", "SCT"
    assert rules_failed(use, BodyPartExamined="HEADNECK", AnatomicRegionSequence=[coded]) == {}
    assert rules_failed(use, PhotometricInterpretation="RGB") == {"photometric": "RGB"}
    assert rules_failed(use, Rows=1024) == {"rows": "1024"}
    assert rules_failed(use, Columns=64) == {"columns": "64"}
    assert rules_failed(use, NumberOfFrames=101) == {"frames": "101"}
    assert rules_failed(use, PixelSpacing=[0.9, 3.0]) == {"pixel_spacing_mm": "0.9 mm, 3 mm"}
    assert rules_failed(use, PixelSpacing=None) == {}
    # 8 degrees off axial passes the 10-degree tolerance; sagittal and a 30-degree oblique do not.
    import math

    c, s = math.cos(math.radians(8)), math.sin(math.radians(8))
    assert rules_failed(use, ImageOrientationPatient=[1, 0, 0, 0, c, s]) == {}
    assert rules_failed(use, ImageOrientationPatient=[0, 1, 0, 0, 0, -1]) == {"orientation": "sagittal"}
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    assert rules_failed(use, ImageOrientationPatient=[1, 0, 0, 0, c, s]) == {
        "orientation": "oblique (30 degrees from axial)"
    }
    # The description is named, never quoted (it can name a patient's condition).
    failed = rules_failed(use, SeriesDescription="AX SCOUT for J. Smith")
    assert failed == {"series_description": "the Series Description matches exclude pattern 'scout'"}
    assert rules_failed(use, SeriesDescription="SAG T2") == {
        "series_description": "the Series Description matches no include pattern"
    }


def test_a_section_excludes_localizers_unless_it_says_otherwise_and_round_trips() -> None:
    use = IntendedUse.from_dict({"modalities": {"allow": ["MR"]}})
    assert rules_failed(use, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]) == {"image_types": "LOCALIZER"}
    assert IntendedUse.from_dict(use.to_dict()) == use
    strict = IntendedUse.from_dict({"body_parts": {"allow": ["BRAIN"], "missing": "reject"}})
    assert rules_failed(strict, BodyPartExamined=None) == {"body_parts": "missing"}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"modality": {"allow": ["MR"]}}, "unknown rule(s) ['modality']"),
        ({"modalities": {"allow": []}}, "non-empty list of strings"),
        ({"modalities": {"allow": ["MR"], "missing": "maybe"}}, "accept or reject"),
        ({"rows": {"min": 512, "max": 128}}, "above max"),
        ({"rows": {}}, "needs min, max or both"),
        ({"orientation": {"allow": ["oblique"]}}, "unknown plane(s) ['oblique']"),
        ({"series_description": {"exclude": ["("]}}, "not a regex"),
        ({"body_parts": {"region_codes": [{"value": "1"}]}}, "region_codes"),
        (["MR"], "intended_use is an object"),
    ],
)
def test_malformed_sections_are_refused_naming_the_rule(section: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        IntendedUse.from_dict(section)
    assert message in str(info.value)


def test_the_demo_takes_every_example_and_refuses_each_stranger_on_the_header_alone(
    strangers: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    use = load_bundle(DEMO).manifest.intended_use
    assert use is not None
    for path in sorted(EXAMPLES.rglob("*.dcm")):
        assert use.check(pydicom.dcmread(path, stop_before_pixels=True)) == [], path
    # No pixel is decoded for a stranger: the check comes before validation and decoding.
    import retinaedge.runtime.reader as reader

    def no_decoding(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("pixels decoded")

    with Detector.open(DEMO, threads=1) as det:
        monkeypatch.setattr(reader, "validate", no_decoding)
        monkeypatch.setattr(reader, "iter_frames", no_decoding)
        for name, path in strangers.items():
            with pytest.raises(NotApplicableError) as info:
                det.detect(path)
            assert {f.rule for f in info.value.failures} >= OUT_OF_SCOPE_RULES[name], name
            assert info.value.to_dict()["type"] == "not-applicable"


def test_route_prints_each_files_models_and_require_all(
    strangers: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "ct-model"
    shutil.copytree(DEMO, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["name"] = "ct-model"
    manifest["intended_use"] = {"modalities": {"allow": ["CT"]}}
    (other / "manifest.json").write_text(json.dumps(manifest))
    argv = ["--log-level", "WARNING", "route", "--model", str(DEMO), "--model", str(other)]
    assert main([*argv, str(EXAMPLES / "study_01" / "IM0014.dcm"), *map(str, strangers.values())]) == 0
    lines = {Path(d["file"]).name: d for d in map(json.loads, capsys.readouterr().out.splitlines())}
    assert lines["IM0014.dcm"]["models"] == ["retinaedge-demo-brainmr"]
    assert set(lines["IM0014.dcm"]["not_applicable"]) == {"ct-model"}
    assert lines["ct.dcm"]["models"] == ["ct-model"]
    refused = {r["rule"] for r in lines["ct.dcm"]["not_applicable"]["retinaedge-demo-brainmr"]}
    assert refused >= OUT_OF_SCOPE_RULES["ct"]
    assert lines["localizer.dcm"]["models"] == []  # MR, not CT; and a localizer
    assert main([*argv, "--require-all", str(strangers["ct"])]) == 0
    capsys.readouterr()
    assert main([*argv, "--require-all", str(strangers["localizer"])]) == 1


def test_intended_use_verb_sets_shows_and_clears_keeping_the_model_sha256(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "demo"
    shutil.copytree(DEMO, bundle)
    before = load_bundle(bundle).manifest
    section = tmp_path / "use.json"
    section.write_text(json.dumps({"modalities": {"allow": ["MR"]}, "orientation": {"allow": ["sagittal"]}}))
    assert (
        main(["--log-level", "WARNING", "intended-use", "--model", str(bundle), "--set", str(section)]) == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["intended_use"]["orientation"]["allow"] == ["sagittal"]
    after = load_bundle(bundle).manifest  # loads: model.onnx and its sha256 are unchanged
    assert after.model_sha256 == before.model_sha256 and after.intended_use is not None
    assert main(["--log-level", "WARNING", "intended-use", "--model", str(bundle), "--clear"]) == 0
    assert json.loads(capsys.readouterr().out)["intended_use"] is None
    assert load_bundle(bundle).manifest.intended_use is None
    section.write_text(json.dumps({"modalities": {"allow": "MR"}}))
    assert (
        main(["--log-level", "WARNING", "intended-use", "--model", str(bundle), "--set", str(section)]) == 2
    )
    assert f"--set {section}: " in json.loads(capsys.readouterr().out.splitlines()[-1])["error"]["message"]


def test_detect_says_not_applicable_without_failing_the_run(
    strangers: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    files = [str(EXAMPLES / "study_01" / "IM0014.dcm"), str(strangers["sagittal-mr"])]
    assert main(["--log-level", "WARNING", "detect", "--model", str(DEMO), *files]) == 0
    done, refused = map(json.loads, capsys.readouterr().out.splitlines())
    assert "frames" in done
    assert refused["error"]["type"] == "not-applicable"
    assert refused["error"]["rules"] == [
        {"rule": "orientation", "expected": "axial within 15 degrees", "seen": "sagittal"}
    ]
