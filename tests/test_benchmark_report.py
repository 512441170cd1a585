"""The headline ratios computed from known summaries, and the failure type of a benchmark phase."""

from __future__ import annotations

from typing import Any

import pytest
from retinaedge.runtime.errors import BenchmarkError, RetinaEdgeError
from retinaedge.service.bench.processes import WorkerError
from retinaedge.service.bench.report import compute_ratios
from retinaedge.service.bench.stats import summarize


def report_with(eager: list[float] | None, http: bool = True) -> dict[str, Any]:
    report: dict[str, Any] = {
        "context": {"device": "test", "model_sha256": "ab" * 32},
        "inference_ms_per_frame": {
            "onnxruntime_fused": summarize([40.0, 50.0, 60.0]),  # p50 50
            "torchvision_eager": summarize(eager) if eager else None,
        },
        "postprocess_ms_per_frame": {"in_graph": summarize([2.0, 2.0]), "python": summarize([5.0, 7.0])},
        "instance_total_ms": summarize([100.0, 100.0, 300.0]),  # p50 100
        "baselines": {"torchvision_eager": {"reason": None if eager else "torch not installed"}},
        "http": None,
    }
    if http:
        report["http"] = {
            "round_trip_ms": summarize([108.0, 108.0]),
            "server_total_ms": summarize([90.0, 110.0]),  # p50 100
            "round_trip_minus_server_total_ms": summarize([4.0, 6.0]),  # p50 5
        }
    return report


def test_ratios_from_known_p50s() -> None:
    ratios = compute_ratios(report_with([150.0, 160.0, 170.0]))
    assert ratios["speedup_vs_torch_eager"]["value"] == pytest.approx(160 / 50)
    assert ratios["speedup_vs_torch_eager"]["met"] is True
    assert ratios["postprocess_speedup_vs_python"]["value"] == pytest.approx(6 / 2)
    assert ratios["postprocess_speedup_vs_python"]["met"] is True  # exactly at the goal
    assert ratios["http_overhead_p50"]["value"] == pytest.approx(0.08)
    assert ratios["http_overhead_p50"]["met"] is True
    assert ratios["http_overhead_paired_p50"]["value"] == pytest.approx(0.05)
    assert all(r["context"]["model_sha256"] == "ab" * 32 for r in ratios.values())


def test_missing_baselines_give_null_ratios_with_reasons() -> None:
    ratios = compute_ratios(report_with(None, http=False))
    assert ratios["speedup_vs_torch_eager"] == {
        **ratios["speedup_vs_torch_eager"],
        "value": None,
        "met": None,
        "reason": "torch not installed",
    }
    assert (
        ratios["http_overhead_p50"]["value"] is None
        and ratios["http_overhead_p50"]["reason"] == "no HTTP phase"
    )
    assert ratios["postprocess_speedup_vs_python"]["value"] == pytest.approx(3.0)


def test_a_failed_runner_is_a_typed_error_for_the_cli() -> None:
    err = WorkerError("runner fused exited with status 1")
    assert isinstance(err, BenchmarkError) and isinstance(err, RetinaEdgeError)
    assert err.to_dict() == {"type": "benchmark-failed", "message": "runner fused exited with status 1"}
