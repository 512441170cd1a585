"""The benchmark's precision section: per-row speed-up over torch eager, the INT8/FP32 ratio (met only when
INT8's gate passed), the gate's figures and the CPU features in report.md. Pure functions, synthetic rows."""

from __future__ import annotations

from typing import Any

from retinaedge.bench.precision_report import int8_ratio, precision_section, render


def _row(
    precision: str, served: str, b1: float, b4: float, gate: dict[str, Any] | None = None, **kw: Any
) -> dict[str, Any]:
    return {
        "backend": "openvino",
        "requested": precision,
        "served": served,
        "reason": f"precision {precision}",
        "batch": 4,
        "ms_per_frame_batch1": b1,
        "ms_per_frame_batch4": b4,
        "gate": gate,
        "timed": kw.get("timed", "served"),
    }


GATE_OK = {"passed": True, "kept": 8, "reference_findings": 8, "new": [], "new_count": 0, "map50": None}
GATE_BAD = {
    "passed": False,
    "kept": 5,
    "reference_findings": 8,
    "new": [{}],
    "new_count": 1,
    "map50": {"drop": 0.02},
}


def test_rows_get_their_speedup_and_int8_counts_only_behind_a_passed_gate() -> None:
    rows = [_row("fp32", "fp32", 300.0, 330.0), _row("int8", "int8", 30.0, 33.0, GATE_OK)]
    section = precision_section({"rows": rows}, 600.0)
    assert section is not None
    assert [r["speedup_vs_torch_eager"] for r in section["rows"]] == [2.0, 20.0]
    assert set(section["cpu"]["features"]) >= {"avx2", "avx512_vnni", "amx_int8"}
    ratio = int8_ratio(section)
    assert ratio["value"] == 10.0 and ratio["met"] is True and ratio["gate_passed"] is True
    failed = [rows[0], _row("int8", "fp32", 30.0, 33.0, GATE_BAD, timed="instrument: not served")]
    ratio = int8_ratio(precision_section({"rows": failed}, 600.0))
    assert ratio["value"] == 10.0 and ratio["met"] is False and "NOT served" in ratio["reason"]
    text = "\n".join(render(precision_section({"rows": failed}, 600.0)))
    assert "FAILED: 5/8 kept, 1 new, AP50 drop 0.02 (timed, not served)" in text and "## Precisions" in text


def test_without_openvino_rows_the_ratio_says_why() -> None:
    ratio = int8_ratio(precision_section({"rows": [], "openvino_skipped": "not installed"}, None))
    assert ratio["value"] is None and "no OpenVINO rows" in ratio["reason"]
    assert precision_section(None, 1.0) is None and render(None) == []


def test_a_rechecked_row_is_the_ratio_and_its_reduced_precision_alone_is_shown_beside_it() -> None:
    """A precision served with its FP32 re-check counts with the re-check's cost; the row of its reduced
    precision alone (bench/precisions.py ``reduced_alone``) is shown, never used for the ratio."""
    served = _row("int8", "int8", 90.0, 100.0, GATE_OK)
    served["recheck"] = {"band": 0.1, "reference": "fp32", "frames": 40, "rechecked": 4}
    alone = {**_row("int8", "int8", 30.0, 33.0, GATE_OK), "variant": "reduced-alone", "timed": "alone"}
    section = precision_section({"rows": [_row("fp32", "fp32", 300.0, 300.0), served, alone]}, 600.0)
    assert int8_ratio(section)["value"] == 3.0
    text = "\n".join(render(section))
    assert "| int8 alone (no re-check) | - |" in text
    assert "served with an fp32 re-check (band 0.1), which re-ran 4 of the 40 timed frames" in text
