"""tools/series_eval.py: lesion-level matching of 3D findings and of raw per-slice detections, on
constructed findings, lesions and boxes (the command itself runs in the model card's measurement)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from support.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))

from series_eval import Lesion, markdown, match_detections, match_findings  # noqa: E402

A = ("1.2.3.1", 0)
B = ("1.2.3.2", 0)
LESIONS = [
    Lesion("glioma", (0.0, 0.0, 0.0), 10.0, frozenset({A, B})),
    Lesion("glioma", (60.0, 0.0, 0.0), 8.0, frozenset({A})),
    Lesion("pituitary", (0.0, 30.0, -20.0), 6.0, frozenset({B})),
]


def finding(label: str, centroid: tuple[float, float, float], score: float) -> dict:  # type: ignore[type-arg]
    return {"label": label, "centroid_lps_mm": list(centroid), "max_score": score}


def test_findings_match_by_class_and_distance() -> None:
    m = match_findings(
        [
            finding("glioma", (3.0, 4.0, 0.0), 0.9),  # 5 mm from lesion 0
            finding("glioma", (0.0, 0.0, 14.0), 0.8),  # within 10 + 5 of lesion 0 only: duplicate
            finding("pituitary", (60.0, 0.0, 0.0), 0.7),  # on lesion 1 but the wrong class: false
            finding("glioma", (60.0, 12.0, 0.0), 0.6),  # 12 <= 8 + 5: lesion 1
        ],
        LESIONS,
        margin_mm=5.0,
    )
    assert m.found == {0, 1} and m.duplicates == 1 and m.false == 2


def test_margin_decides_at_the_boundary() -> None:
    far = [finding("pituitary", (0.0, 30.0, -8.5), 0.5)]  # 11.5 mm from lesion 2 (radius 6)
    assert match_findings(far, LESIONS, margin_mm=5.0).found == set()
    assert match_findings(far, LESIONS, margin_mm=5.5).found == {2}


def test_the_higher_score_takes_the_nearer_lesion_first() -> None:
    m = match_findings(
        [finding("glioma", (30.0, 0.0, 0.0), 0.4), finding("glioma", (29.0, 0.0, 0.0), 0.95)],
        [LESIONS[0], Lesion("glioma", (40.0, 0.0, 0.0), 10.0, frozenset())],
        margin_mm=5.0,
    )
    # 0.95 at x=29 reaches only lesion 1 (11 mm); 0.4 at x=30 reaches lesion 1 too (10 mm) but it is taken.
    assert m.found == {1} and m.duplicates == 1 and m.false == 1


def test_raw_detections_hit_by_iou_and_go_to_the_nearer_lesion() -> None:
    truth = {
        A: [("glioma", (10.0, 10.0, 30.0, 30.0)), ("glioma", (100.0, 10.0, 116.0, 26.0))],
        B: [("pituitary", (50.0, 50.0, 60.0, 60.0))],
    }
    dets = {
        A: [
            ("glioma", 0.9, (101.0, 10.0, 116.0, 26.0), np.array([58.0, 0.0, 0.0])),  # hit, near lesion 1
            ("glioma", 0.8, (10.0, 10.0, 20.0, 20.0), np.array([0.0, 0.0, 0.0])),  # IoU 0.25: false
        ],
        B: [("glioma", 0.7, (50.0, 50.0, 60.0, 60.0), np.array([0.0, 30.0, -20.0]))],  # wrong class: false
    }
    found, false = match_detections(dets, truth, LESIONS)
    assert found == {1} and false == 2


def test_markdown_has_one_row_per_threshold() -> None:
    row = {
        "min_score": 0.5,
        "raw": {"recall": 0.9, "false_per_series": 1.0},
        "findings_3d": {"recall": 0.8, "false_per_series": 0.1, "duplicates": 0},
    }
    text = markdown({"series": 2, "lesions": 3, "model": "m", "thresholds": [row, {**row, "min_score": 0.3}]})
    assert text.count("\n| 0.") == 2 and "| 0.5 | 0.9 | 1.0 | 0.8 | 0.1 | 0 |" in text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
