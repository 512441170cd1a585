"""The operating point: counting at a threshold, choosing one, the manifest section, the finding flag of
each detection, and `retinaedge eval --choose-operating-point --write-operating-point` on a real bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from retinaedge.runtime.bundle import load_bundle
from retinaedge.runtime.cli import main
from retinaedge.runtime.errors import BundleError, ConfigError
from retinaedge.runtime.manifest import Manifest
from retinaedge.runtime.operating_point import (
    OperatingPoint,
    ScoredBox,
    TruthBox,
    choose,
    counts_at,
    findings_flags,
    outcomes,
)
from support.paths import DEMO, EXAMPLES

F1 = ("a", 0)  # one frame of instance "a"
F2 = ("a", 1)


def box(x: float, y: float, size: float = 10.0) -> tuple[float, float, float, float]:
    return (x, y, x + size, y + size)


def test_greedy_matching_in_score_order_with_difficult_boxes_ignored() -> None:
    truths = [
        TruthBox(F1, "t", box(0, 0)),
        TruthBox(F1, "t", box(50, 50)),
        TruthBox(F1, "t", box(100, 100), difficult=True),
        TruthBox(F2, "t", box(0, 0)),
    ]
    dets = [
        ScoredBox(F1, "t", 0.9, box(1, 0)),  # takes the first box (IoU 0.82)
        ScoredBox(F1, "t", 0.8, box(0, 1)),  # the same box again: taken already -> false positive
        ScoredBox(F1, "t", 0.7, box(100, 101)),  # on the difficult box: ignored
        ScoredBox(F1, "t", 0.6, box(200, 200)),  # nothing there: false positive
        ScoredBox(F2, "t", 0.3, box(0, 0)),  # the box of frame 2
        ScoredBox(F2, "other", 0.99, box(0, 0)),  # another class: not counted for "t"
    ]
    result = outcomes(dets, truths, ["t"])
    assert result.positives == {"t": 3}
    assert result.tp_scores["t"].tolist() == [0.9, 0.3]
    assert result.fp_scores["t"].tolist() == [0.8, 0.6]
    at = counts_at(result, "t", 0.5)
    assert (at["true_positives"], at["false_positives"], at["false_negatives"]) == (1, 2, 2)
    assert at["sensitivity"] == pytest.approx(1 / 3, abs=1e-4) and at["precision"] == pytest.approx(
        1 / 3, abs=1e-4
    )
    everything = counts_at(result, "t", 0.0)
    assert (everything["true_positives"], everything["false_positives"]) == (2, 2)
    none = counts_at(result, "t", 0.95)
    assert none["precision"] is None and none["sensitivity"] == 0.0


def test_choice_by_max_f1_and_by_sensitivity() -> None:
    truths = [TruthBox(("f", k), "t", box(0, 0)) for k in range(4)]
    # Scores: hits at 0.9, 0.8, 0.4, 0.2; false positives at 0.85, 0.5, 0.45, 0.3.
    dets = [ScoredBox(("f", k), "t", s, box(0, 0)) for k, s in enumerate((0.9, 0.8, 0.4, 0.2))]
    dets += [ScoredBox(("f", k), "t", s, box(300, 300)) for k, s in enumerate((0.85, 0.5, 0.45, 0.3))]
    result = outcomes(dets, truths, ["t", "unseen"])
    # F1 at 0.8: 2 TP, 1 FP -> 4/7 = 0.571; at 0.4: 3 TP, 3 FP -> 6/10; at 0.2: 4 TP, 4 FP -> 8/12 = 0.667.
    assert choose(result, ["t", "unseen"], "max-f1", floor=0.05) == {"t": 0.2, "unseen": 0.05}
    assert choose(result, ["t"], "sensitivity>=0.5", floor=0.05) == {"t": 0.8}
    assert choose(result, ["t"], "sensitivity>=0.75", floor=0.05) == {"t": 0.4}
    with pytest.raises(ConfigError, match="max-f1 or sensitivity>=X"):
        choose(result, ["t"], "youden", floor=0.05)


def test_max_f1_ties_take_the_higher_threshold() -> None:
    truths = [TruthBox(("f", k), "t", box(0, 0)) for k in range(2)]
    dets = [ScoredBox(("f", 0), "t", 0.9, box(0, 0)), ScoredBox(("f", 1), "t", 0.5, box(0, 0))]
    dets += [ScoredBox(("f", 1), "t", 0.6, box(300, 300))]
    # at 0.9: 1 TP, 0 FP, F1 2/3; at 0.5: 2 TP, 1 FP, F1 4/5 -> 0.5. Add a tie: FP at 0.7 as well.
    result = outcomes(dets, truths, ["t"])
    assert choose(result, ["t"], "max-f1", floor=0.05) == {"t": 0.5}
    tie = outcomes([*dets, ScoredBox(("f", 0), "t", 0.55, box(300, 300))], truths, ["t"])
    # 0.9: F1 2/3 (1 TP of 2, 0 FP); 0.5: 2 TP, 2 FP -> 2/3: the higher threshold wins.
    assert choose(tie, ["t"], "max-f1", floor=0.05) == {"t": 0.9}


def test_manifest_section_round_trips_and_is_checked() -> None:
    manifest = load_bundle(DEMO).manifest
    point = OperatingPoint({c: 0.4 for c in manifest.class_names}, "by hand", {})
    again = Manifest.from_json(manifest.with_operating_point(point).to_json())
    assert again.operating_point == point
    without = manifest.with_operating_point(None).to_dict()
    assert "operating_point" not in without and Manifest.from_dict(without).operating_point is None
    partial = dict(without, operating_point={"score_thresholds": {"glioma": 0.5}})
    with pytest.raises(BundleError, match="missing: \\['meningioma', 'pituitary'\\]"):
        Manifest.from_dict(partial)
    out_of_range = dict(without, operating_point={"score_thresholds": {c: 1.5 for c in manifest.class_names}})
    with pytest.raises(BundleError, match="within 0..1"):
        Manifest.from_dict(out_of_range)


def test_findings_flags() -> None:
    point = OperatingPoint({"a": 0.5, "b": 0.2})
    assert findings_flags(["a", "a", "b", "zzz"], [0.5, 0.49, 0.3, 0.99], point) == [True, False, True, False]
    assert findings_flags(["a", "b"], [0.01, 0.02], None) == [True, True]


@pytest.fixture
def demo_copy(tmp_path: Path) -> Path:
    """The demo bundle without its operating point (a bundle as exported before there was one)."""
    bundle = tmp_path / "demo"
    shutil.copytree(DEMO, bundle)
    manifest = Manifest.from_json((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(manifest.with_operating_point(None).to_json())
    return bundle


def test_eval_chooses_and_writes_the_operating_point_and_detect_marks_findings(
    demo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = EXAMPLES / "study_01"
    truth = EXAMPLES / "ground_truth.json"
    argv = ["eval", "--model", str(demo_copy), "--annotations", str(truth), "--allow-missing", str(study)]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["operating_point"] is None  # none in the bundle, none chosen

    assert main([*argv, "--choose-operating-point", "max-f1", "--write-operating-point"]) == 0
    report = json.loads(capsys.readouterr().out)["operating_point"]
    assert report["source"] == "chosen" and report["written"] == str(demo_copy / "manifest.json")
    point = load_bundle(demo_copy).manifest.operating_point  # the sha256 check still passes
    assert point is not None and set(point.score_thresholds) == {"glioma", "meningioma", "pituitary"}
    for name, figures in report["classes"].items():
        assert figures["threshold"] == pytest.approx(point.score_thresholds[name], abs=1e-6)
        assert point.measured[name] == figures

    # Evaluated again, the bundle's own point gives the same counts.
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)["operating_point"]
    assert again["source"] == "bundle" and again["classes"] == report["classes"]

    assert main(["detect", "--model", str(demo_copy), str(study / "IM0016.dcm")]) == 0
    detections = [d for f in json.loads(capsys.readouterr().out)["frames"] for d in f["detections"]]
    assert detections and any(d["finding"] for d in detections) and not all(d["finding"] for d in detections)
    for d in detections:
        assert d["finding"] == (d["score"] >= point.score_thresholds[d["label"]])


def test_eval_refuses_bad_operating_point_options(
    demo_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["eval", "--model", str(demo_copy), "--annotations", str(EXAMPLES / "ground_truth.json")]
    assert main([*base, "--write-operating-point", str(EXAMPLES / "study_01")]) == 2
    assert "needs --choose-operating-point" in capsys.readouterr().out
    assert main([*base, "--choose-operating-point", "best", str(EXAMPLES / "study_01")]) == 2
    assert "max-f1 or sensitivity>=X" in capsys.readouterr().out


def test_export_reads_an_operating_point_file(tmp_path: Path) -> None:
    from retinaedge.export.export_cli import _operating_point

    good = tmp_path / "op.json"
    good.write_text(json.dumps({"score_thresholds": {"a": 0.3}, "method": "reader study"}))
    assert _operating_point(good) == OperatingPoint({"a": 0.3}, "reader study", {})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"thresholds": {"a": 0.3}}))
    with pytest.raises(ConfigError, match=f"--operating-point {bad}"):
        _operating_point(bad)
    assert _operating_point(None) is None
