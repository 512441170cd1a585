"""bench/ statistics and the progress line, on known data."""

from __future__ import annotations

import io

import numpy as np
import pytest
from retinaedge.bench.stats import per_frame_samples, percentile, ratio, safe_div, summarize
from retinaedge.runtime.progress import Progress


def test_percentiles_of_1_to_100_interpolate_linearly() -> None:
    samples = list(range(1, 101))  # 1..100: the q-th percentile is 1 + 0.99 q
    assert percentile(samples, 50) == pytest.approx(50.5)
    assert percentile(samples, 90) == pytest.approx(90.1)
    assert percentile(samples, 99) == pytest.approx(99.01)
    assert percentile(samples, 0) == 1 and percentile(samples, 100) == 100


def test_summary_of_known_samples() -> None:
    s = summarize([4.0, 1.0, 3.0, 2.0])  # order does not matter
    assert s == {
        "p50": 2.5,
        "p90": 3.7,
        "p95": 3.85,
        "p99": 3.97,
        "mean": 2.5,
        "min": 1.0,
        "max": 4.0,
        "n": 4,
    }
    single = summarize([7.25])
    assert single["p50"] == single["p99"] == single["min"] == 7.25 and single["n"] == 1


def test_summary_agrees_with_numpy_on_random_data() -> None:
    rng = np.random.default_rng(3)
    data = rng.lognormal(3, 0.5, 1000)
    s = summarize(data.tolist(), digits=9)
    for q in (50, 90, 95, 99):
        assert s[f"p{q}"] == pytest.approx(float(np.percentile(data, q)), abs=1e-8)
    assert s["p50"] < s["p90"] < s["p95"] < s["p99"] <= s["max"]


def test_empty_and_out_of_range_are_errors() -> None:
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_per_frame_samples_weight_multi_frame_instances_by_frames() -> None:
    assert per_frame_samples([10.0, 270.0], [1, 27]) == [10.0] + [10.0] * 27
    assert summarize(per_frame_samples([5.0, 60.0], [1, 3]))["p50"] == 20.0
    with pytest.raises(ValueError):
        per_frame_samples([1.0], [1, 2])
    with pytest.raises(ValueError):
        per_frame_samples([1.0], [0])


def test_ratio_goals_and_missing_values() -> None:
    up = ratio(2.5, goal=2.0, higher_is_better=True, definition="x")
    assert up["met"] is True and up["goal"] == ">= 2" and up["value"] == 2.5
    assert ratio(1.99, goal=2.0, higher_is_better=True, definition="x")["met"] is False
    down = ratio(0.12, goal=0.1, higher_is_better=False, definition="x")
    assert down["met"] is False and down["goal"] == "<= 0.1"
    assert ratio(0.1, goal=0.1, higher_is_better=False, definition="x")["met"] is True
    missing = ratio(None, goal=2.0, higher_is_better=True, definition="x", reason="torch not installed")
    assert missing["value"] is None and missing["met"] is None and missing["reason"] == "torch not installed"
    assert ratio(float("inf"), goal=1, higher_is_better=True, definition="x")["met"] is None
    assert safe_div(3.0, 2.0) == 1.5 and safe_div(1.0, 0.0) is None and safe_div(None, 1.0) is None


def test_progress_line_counts_to_the_total() -> None:
    out = io.StringIO()  # not a terminal: plain lines, the final one at close
    with Progress("frames", 4, stream=out, every_s=3600) as bar:
        for _ in range(4):
            bar.update()
    lines = out.getvalue().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("frames [" + "#" * 30 + "] 4/4")
