"""The headline ratios computed from known summaries, and the failure type of a benchmark phase."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from retinaedge.bench.processes import WorkerError
from retinaedge.bench.report import compute_ratios
from retinaedge.bench.stats import summarize
from retinaedge.runtime.errors import BenchmarkError, RetinaEdgeError


def report_with(
    eager: list[float] | None, http: bool = True, clients: tuple[int, ...] = (1, 4)
) -> dict[str, Any]:
    levels = {
        1: {"clients": 1, "requests": 8, "frames_per_s": 50.0, "latency_ms": summarize([20.0] * 8)},
        # 4 clients: 100 frames/s; latencies 40 ms x 98, then 70 and 200 ms -> p50 40, p99 71.3 (numpy linear)
        4: {
            "clients": 4,
            "requests": 100,
            "frames_per_s": 100.0,
            "latency_ms": summarize([40.0] * 98 + [70, 200]),
        },
    }
    report: dict[str, Any] = {
        "throughput": {
            "by_batch_size": [
                {"batch_size": 1, "frames_per_s": 110.0},
                {"batch_size": 4, "frames_per_s": 125.0},  # the best: 100 / 125 = 0.8
                {"batch_size": 8, "frames_per_s": 120.0},
            ],
            "by_clients": [levels[c] for c in clients] if http else [],
        },
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
    assert ratios["postprocess_speedup_vs_python"]["met"] is True
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


def test_serving_ratios_from_the_four_client_level_and_the_best_batch() -> None:
    ratios = compute_ratios(report_with([150.0]))
    served = ratios["service_throughput_vs_backend"]
    assert served["value"] == pytest.approx(100 / 125) and served["met"] is True  # exactly at the goal
    assert served["goal"] == ">= 0.8" and "Jetson" in served["definition"]
    assert served["inputs"] == {
        "service_frames_per_s": 100.0,
        "backend_frames_per_s": 125.0,
        "backend_batch_size": 4,
    }
    tail = ratios["tail_ratio_p99_p50"]
    p99 = float(np.percentile([40.0] * 98 + [70, 200], 99))
    assert (
        tail["value"] == pytest.approx(p99 / 40, abs=1e-4) and tail["met"] is True and tail["goal"] == "<= 2"
    )
    assert tail["inputs"]["requests"] == 100


def test_a_long_tail_misses_its_goal() -> None:
    report = report_with([150.0])
    report["throughput"]["by_clients"][1]["latency_ms"] = summarize([40.0] * 90 + [100.0] * 10)  # p99 100
    tail = compute_ratios(report)["tail_ratio_p99_p50"]
    assert tail["value"] == pytest.approx(2.5) and tail["met"] is False


def test_with_multi_frame_instances_in_the_level_the_tail_is_that_of_the_single_frame_requests() -> None:
    """A 27-frame instance takes ~27 times a slice's latency by itself: the tail ratio reads the
    single-frame requests of the same run, which is where waiting behind other requests shows."""
    report = report_with([150.0])
    level = report["throughput"]["by_clients"][1]
    level["latency_ms"] = summarize([40.0] * 95 + [900.0] * 5)  # the multi-frame ones make p99 900
    level["single_frame_latency_ms"] = summarize([40.0] * 90 + [60.0] * 5)  # p99 60
    tail = compute_ratios(report)["tail_ratio_p99_p50"]
    assert tail["value"] == pytest.approx(1.5) and tail["met"] is True and tail["inputs"]["requests"] == 95


@pytest.mark.parametrize(
    ("http", "clients", "reason"),
    [
        (False, (), "no HTTP phase"),
        (True, (1,), "no HTTP level with 4 concurrent clients (--clients gave [1])"),
    ],
)
def test_serving_ratios_without_four_clients_are_null_with_a_reason(
    http: bool, clients: tuple[int, ...], reason: str
) -> None:
    ratios = compute_ratios(report_with([150.0], http=http, clients=clients))
    for name in ("service_throughput_vs_backend", "tail_ratio_p99_p50"):
        assert ratios[name]["value"] is None and ratios[name]["met"] is None
        assert ratios[name]["reason"] == reason


def test_the_postprocess_goal_is_no_slower_than_numpy() -> None:
    report = report_with([150.0])
    report["postprocess_ms_per_frame"] = {"in_graph": summarize([2.0]), "python": summarize([1.9])}
    post = compute_ratios(report)["postprocess_speedup_vs_python"]
    assert post["goal"] == ">= 1" and post["met"] is False and post["value"] == pytest.approx(0.95)
