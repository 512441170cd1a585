"""The report of a silent trial and its record (service/versions/shadow.py, service/versions/record.py).

Three real versions of the demo model (A: the committed bundle, score threshold 0.05; B: 0.3; C: 0.5) run
on the example study. A trial of C that sees B activated midway compares each instance with the version
that produced its active result, one comparison per baseline, never a mix; its record (``shadow.jsonl``)
stays bounded however long the trial runs, and a restart rebuilds the same report from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import VERSION_B_SCORE_THRESH, VERSION_C_SCORE_THRESH
from retinaedge.service.versions.record import TrialRecord
from retinaedge.service.versions.shadow import LATENCY_WINDOW, ShadowReport, Tally, compare
from support.paths import DEMO, EXAMPLES

FILES = sorted((EXAMPLES / "study_01").glob("IM00*.dcm"))[10:18]


@pytest.fixture(scope="module")
def bodies(demo_version_b: Path, demo_version_c: Path) -> dict[str, list[dict[str, Any]]]:
    """Each version's ``/v1/detect`` bodies of :data:`FILES`, by version (``a``, ``b``, ``c``)."""
    from retinaedge.runtime.detector import Detector

    out: dict[str, list[dict[str, Any]]] = {}
    for key, bundle in (("a", DEMO), ("b", demo_version_b), ("c", demo_version_c)):
        with Detector.open(bundle, threads=1) as detector:
            out[key] = [detector.detect(path).to_json() for path in FILES]
    return out


def version(body: dict[str, Any]) -> str:
    return str(body["model"]["sha256"])[:12]


def lost_below(actives: list[dict[str, Any]], threshold: float) -> dict[str, int]:
    """The detections of ``actives`` a version of score threshold ``threshold`` does not keep, per class."""
    lost: dict[str, int] = {}
    for body in actives:
        for frame in body["frames"]:
            for d in frame["detections"]:
                if d["score"] < threshold:
                    lost[d["label"]] = lost.get(d["label"], 0) + 1
    return lost


def test_an_activation_during_a_trial_starts_a_comparison_of_its_own(
    bodies: dict[str, list[dict[str, Any]]],
) -> None:
    a, b, c = bodies["a"], bodies["b"], bodies["c"]
    report = ShadowReport(version(c[0]), version(a[0]))
    for active, shadow in zip(a[:5], c[:5], strict=True):
        report.add(active, shadow)
    report.rebase(version(b[0]))  # B activated during the trial of C
    report.add(a[5], c[5])  # admitted before the switch, finished on A: still compared with A
    for active, shadow in zip(b[6:], c[6:], strict=True):
        report.add(active, shadow)
    out = report.to_json()
    assert out["version"] == version(c[0]) and out["active"] == version(b[0])
    assert out["instances"] == len(FILES) - 6  # against B alone
    assert lost_below(b[6:], VERSION_B_SCORE_THRESH) == {}  # B already dropped what is below 0.3
    assert out["lost_per_class"] == lost_below(b[6:], VERSION_C_SCORE_THRESH)
    assert out["gained_per_class"] == {}
    against_a, against_b = out["baselines"]
    assert against_a["active"] == version(a[0]) and against_a["instances"] == 6
    assert against_a["lost_per_class"] == lost_below(a[:6], VERSION_C_SCORE_THRESH)
    assert against_b == {k: out[k] for k in against_b}
    assert sum(lost_below(a[:6], VERSION_C_SCORE_THRESH).values()) > sum(
        lost_below(b[:6], VERSION_C_SCORE_THRESH).values()
    ), "A must lose more than B on the same instances for this test to mean anything"


def test_the_record_stays_bounded_and_a_restart_rebuilds_the_same_report(
    tmp_path: Path, bodies: dict[str, list[dict[str, Any]]]
) -> None:
    a, c = bodies["a"], bodies["c"]
    path = tmp_path / "shadow.jsonl"
    record = TrialRecord(path, ShadowReport(version(c[0]), version(a[0])), compact_every=3)
    record.start(replay=False)
    rounds = 4  # 32 instances, each line of the file a snapshot or an outcome
    for n in range(rounds):
        for active, shadow in zip(a, c, strict=True):
            record.record(compare(active, None if n == 1 else shadow, version(active)))
            lines = path.read_text().splitlines()
            assert len(lines) <= 1 + 3
            assert all("detections" not in line for line in lines)  # outcomes, not results
    live = record.report.to_json()
    assert live["instances"] == rounds * len(FILES) and live["failed"] == len(FILES)
    assert live["lost_per_class"] == {k: 3 * n for k, n in lost_below(a, VERSION_C_SCORE_THRESH).items()}

    with open(path, "a") as fh:
        fh.write('{"version": "cut sho')  # a line a SIGKILL cut short
    again = TrialRecord(path, ShadowReport(version(c[0]), version(a[0])), compact_every=3)
    again.start(replay=True)
    assert again.report.to_json() == live

    again.remove()
    assert not path.exists()
    again.record(compare(a[0], c[0], version(a[0])))  # an outcome arriving after the trial ended
    assert not path.exists()


def test_a_record_of_before_is_replayed_then_compacted(
    tmp_path: Path, bodies: dict[str, list[dict[str, Any]]]
) -> None:
    """The record an older version wrote (both results on each line) gives the same report, then is
    replaced by a snapshot."""
    a, c = bodies["a"], bodies["c"]
    path = tmp_path / "shadow.jsonl"
    path.write_text("".join(json.dumps({"version": version(c[0]), "active": x, "shadow": y}) + "\n"
                            for x, y in zip(a, c, strict=True)))  # fmt: skip
    expected = ShadowReport(version(c[0]), version(a[0]))
    for x, y in zip(a, c, strict=True):
        expected.add(x, y)
    record = TrialRecord(path, ShadowReport(version(c[0]), version(a[0])))
    record.start(replay=True)
    assert record.report.to_json() == expected.to_json()
    assert len(path.read_text().splitlines()) == 1 and "snapshot" in json.loads(path.read_text())


def test_the_latency_window_is_bounded() -> None:
    tally = Tally("a")
    for n in range(LATENCY_WINDOW + 500):
        tally.count({"baseline": "a", "failed": False, "frames": 1, "agreeing": 1, "gained": {},
                     "lost": {}, "active_ms": float(n), "shadow_ms": 1.0})  # fmt: skip
    out = tally.to_json()
    assert out["instances"] == LATENCY_WINDOW + 500 and out["latency_ms"]["window"] == LATENCY_WINDOW
    assert out["latency_ms"]["active_p50"] == pytest.approx(500 + (LATENCY_WINDOW - 1) / 2)
    assert Tally.restore(json.loads(json.dumps(tally.state()))).to_json() == out
