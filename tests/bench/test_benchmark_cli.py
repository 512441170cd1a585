"""``retinaedge benchmark`` end to end on the demo bundle with tiny counts (a real subprocess, real runners
in their own processes, a real ``retinaedge serve``), and the report writer's outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import pytest
from retinaedge.bench.batch_settings import service_fields
from retinaedge.bench.plot import draw_latency_plot
from support.paths import DEMO, EXAMPLES, REPO_ROOT

RATIOS = (
    "speedup_vs_torch_eager",
    "postprocess_speedup_vs_python",
    "http_overhead_p50",
    "http_overhead_paired_p50",
    "service_throughput_vs_backend",
    "tail_ratio_p99_p50",
    "int8_speedup_vs_fp32",  # the precision table (bench/precisions.py); the demo bundle has no INT8 model
    "accelerator_fed_fraction",
    "max_fed_frames_per_s",
    "pipeline_cpu_ms_per_frame",
    "accelerator_tail_ratio_p99_p50",
    "accelerator_http_overhead_p50",
)
TOP_KEYS = {
    "schema",
    "context",
    "device",
    "versions",
    "model",
    "threads",
    "frames",
    "stages_ms_per_frame",
    "instance_total_ms",
    "inference_ms_per_frame",
    "postprocess_ms_per_frame",
    "http",
    "throughput",
    "memory",
    "energy",
    "baselines",
    "ratios",
    "precisions",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("bench") / "out"
    argv = [
        sys.executable, "-m", "retinaedge.runtime.cli", "benchmark",
        "--model", str(DEMO),
        "--dicom", str(EXAMPLES / "study_01"), str(EXAMPLES / "study_01_multiframe"),
        "--frames", "4", "--warmup", "1", "--threads", "1",
        "--batch-sizes", "1,2", "--batch-repeats", "1", "--batch-seconds", "0",
        "--clients", "1,4", "--requests-per-client", "1", "--tail-requests", "8", "--tail-seconds", "5",
        "--level-requests", "6", "--level-seconds", "5", "--accelerator-batch", "2",
        "--accelerator-sweep", "20,0.5", "--accelerator-sweep-a", "1",
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    return proc, out


def test_writes_the_three_outputs(run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(line["ratios"]) == set(RATIOS)
    for name in ("report.json", "report.md", "latency.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    png = cv2.imread(str(out / "latency.png"))
    assert png is not None and png.shape[0] > 200 and png.shape[1] > 500


def test_report_json_has_the_documented_keys(run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    assert TOP_KEYS <= set(report)
    ctx = report["context"]
    assert ctx["input"] == [1, 256, 256] and ctx["threads"] == 1 and ctx["precision"] == "fp32"
    assert ctx["model_sha256"] == json.loads((DEMO / "manifest.json").read_text())["model_sha256"]
    assert ctx["versions"]["onnxruntime"] and ctx["device"]
    for name in RATIOS:
        r = report["ratios"][name]
        assert {"value", "goal", "met", "definition", "context"} <= set(r)
        assert r["value"] is None or r["met"] in (True, False)
    assert report["ratios"]["postprocess_speedup_vs_python"]["value"] > 0
    assert report["ratios"]["http_overhead_p50"]["value"] is not None
    for stage in ("decode", "preprocess", "inference", "postprocess"):
        s = report["stages_ms_per_frame"][stage]
        assert s["n"] == 4 and 0 <= s["p50"] <= s["p90"] <= s["p95"] <= s["p99"]
    assert report["frames"]["timed"] == 4
    assert report["inference_ms_per_frame"]["onnxruntime_fused"]["n"] == 4
    assert report["detections"]["python_equals_in_graph_counts"] is True
    assert [row["batch_size"] for row in report["throughput"]["by_batch_size"]] == [1, 2]
    one, four = report["throughput"]["by_clients"]
    # Each level runs until its last three windows agree (or for --level-seconds / --tail-seconds), with
    # at least --level-requests (6) / --tail-requests (8) in those windows.
    assert one["clients"] == 1 and one["target_requests"] == 6
    assert four["clients"] == 4 and four["target_requests"] == 8
    for level in (one, four):
        # Stable: at least its target; stopped by its time bound (a loaded machine): at least one request.
        assert level["requests"] >= (level["target_requests"] if level["stopped_by"] == "stable" else 1)
        assert level["stopped_by"] in ("stable", "time") and 1 <= len(level["window_frames_per_s"]) <= 3
        assert level["latency_ms"]["n"] == level["requests"] and level["spread"] >= 0
    served, tail = report["ratios"]["service_throughput_vs_backend"], report["ratios"]["tail_ratio_p99_p50"]
    assert served["value"] > 0 and served["met"] in (True, False)
    assert served["inputs"]["backend_frames_per_s"] == max(
        r["frames_per_s"] for r in report["throughput"]["by_batch_size"]
    )
    assert served["inputs"]["service_frames_per_s"] == four["frames_per_s"]
    assert tail["value"] >= 1 and tail["inputs"]["requests"] == four["single_frame_latency_ms"]["n"]
    batching = report["http"]["batching"]
    assert report["context"]["service_batching"] == batching
    if "max_batch_size" in service_fields():
        assert batching["max_batch_size"] == batching["best_model_batch_size"] in (1, 2)
    else:
        assert batching["max_batch_size"] is None and "max_batch_size" in batching["not_applied"]
    rss = report["memory"]["peak_rss_bytes"]
    assert rss["onnxruntime_fused"] > 50 * 2**20 and rss["service"] > 50 * 2**20
    energy = report["energy"]
    assert energy["available"] is False and "tegrastats" in energy["reason"]
    rows = report["precisions"]["rows"]
    assert (rows[0]["backend"], rows[0]["served"]) == ("onnxruntime", "fp32") and rows[0][
        "ms_per_frame_batch1"
    ] > 0
    assert set(report["precisions"]["cpu"]["features"]) >= {"avx2", "avx512_bf16", "amx_int8"}
    assert report["ratios"]["int8_speedup_vs_fp32"]["value"] is None  # no INT8 model in the demo bundle
    eager = report["baselines"]["torchvision_eager"]
    if eager["status"] == "measured":
        assert report["inference_ms_per_frame"]["torchvision_eager"]["n"] == 4
        assert report["ratios"]["speedup_vs_torch_eager"]["value"] > 0
    else:
        assert eager["reason"] and report["ratios"]["speedup_vs_torch_eager"]["value"] is None


def test_report_md_states_the_ratios(run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "report.md").read_text()
    for name in RATIOS:
        assert f"`{name}`" in md
    assert "| inference |" in md and "HTTP round trip" in md


def test_plot_of_known_rows(tmp_path: Path) -> None:
    rows = [
        ("a", {"p50": 0.5, "p90": 0.7, "p95": 0.8, "p99": 1.0}),
        ("b", {"p50": 120.0, "p90": 150.0, "p95": 160.0, "p99": 300.0}),
    ]
    path = draw_latency_plot(rows, "t", tmp_path / "p.png")
    img = cv2.imread(str(path))
    assert img is not None and img.shape == (70 + 34 * 2 + 60, 1100, 3)
    with pytest.raises(ValueError):
        draw_latency_plot([], "t", tmp_path / "q.png")


def test_without_torch_the_eager_baseline_is_skipped_with_a_reason(tmp_path: Path) -> None:
    """torch and torchvision blocked in the benchmark process: the report says why the ratio is missing."""
    from support.blocked import run_blocked

    out = tmp_path / "out"
    args = [
        "benchmark", "--model", str(DEMO), "--dicom", str(EXAMPLES / "study_01"),
        "--frames", "2", "--warmup", "0", "--threads", "1", "--batch-sizes", "1", "--batch-repeats", "1",
        "--batch-seconds", "0", "--no-http", "--no-accelerator", "--out", str(out),
    ]  # fmt: skip
    proc = run_blocked(
        f"""
        import sys
        from retinaedge.runtime.cli import main
        code = main({args!r})
        assert "torch" not in sys.modules
        sys.exit(code)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    eager = report["baselines"]["torchvision_eager"]
    assert eager["status"] == "skipped" and "torch" in eager["reason"]
    speedup = report["ratios"]["speedup_vs_torch_eager"]
    assert speedup["value"] is None and speedup["met"] is None and "torch" in speedup["reason"]
    assert report["http"] is None and report["ratios"]["http_overhead_p50"]["reason"] == "no HTTP phase"
    assert report["ratios"]["service_throughput_vs_backend"]["reason"] == "no HTTP phase"
    assert report["ratios"]["tail_ratio_p99_p50"]["value"] is None
    assert report["ratios"]["postprocess_speedup_vs_python"]["value"] is not None
    assert report["accelerator"] is None and "simulated accelerator" not in report["title"]
    assert report["ratios"]["accelerator_fed_fraction"]["reason"] == "--no-accelerator"
    assert (out / "latency.png").is_file() and (out / "report.md").is_file()


def test_the_benchmark_package_imports_neither_export_nor_torch() -> None:
    """Import direction: service -> runtime, device; torch only in the eager runner's own process."""
    code = (
        "import importlib, pkgutil, sys, retinaedge.bench as b\n"
        "for m in pkgutil.iter_modules(b.__path__):\n"
        "    importlib.import_module(f'retinaedge.bench.{m.name}')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'tensorrt', 'pycuda')"
        " or m.startswith('retinaedge.export')]\n"
        "print(len(list(pkgutil.iter_modules(b.__path__))), bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, bad = proc.stdout.split(" ", 1)
    assert int(count) >= 10 and bad.strip() == "[]"


def test_the_accelerator_phase_is_named_and_answers_like_detect(
    run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """Every report made with the simulated accelerator says so (title, model line, each figure), its
    answers equal the first pass's (``retinaedge detect``'s code path) for every file and every response,
    no measured frame ran for real, and each level says how steady it was."""
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert (
        "simulated accelerator" in report["title"]
        and "simulated accelerator" in report["model"]["accelerator"]
    )
    assert md.splitlines()[0].endswith("simulated accelerator")
    model_line = next(line for line in md.splitlines() if line.startswith("- model:"))
    assert "simulated accelerator" in model_line
    accel = report["accelerator"]
    assert accel["profile"]["name"] == "orin-agx-r50-512-fp16" and accel["batch_size"] == 2
    assert accel["identity"]["files"] == 4 and accel["identity"]["equal"] == 4  # --frames 4: four files
    assert accel["key_collisions"] == 0
    levels = [accel["one_client"], accel["saturated"], accel["paced"], *accel["sweep"]["points"]]
    assert len(accel["sweep"]["points"]) >= 1
    for level in levels:
        assert level["misses"] == 0 and level["responses_differing"] == 0
        assert level["spread"] >= 0 and level["stopped_by"] in ("stable", "time")
        # Stable: at least --level-requests (6); stopped by its time bound (--level-seconds 5, a slow sweep
        # point on a loaded machine): whatever completed by then, at least one request.
        assert level["requests"] >= (6 if level["stopped_by"] == "stable" else 1)
        assert 1 <= len(level["window_frames_per_s"]) <= 3
        cpu = level["cpu_ms_per_frame"]  # clock ticks of 10 ms: a tiny level may count none
        assert cpu["process"] >= 0 and cpu["pipeline"] <= cpu["process"]
        assert sum(cpu["by_thread"].values()) == pytest.approx(cpu["process"], abs=0.01)
        assert level["foreign_cores"] is None or level["foreign_cores"] >= 0
    assert any(level["cpu_ms_per_frame"]["by_thread"] for level in levels)
    assert accel["one_client"]["accelerator_frames_per_batch"] == 1.0
    for name in RATIOS[-5:]:
        figure = report["ratios"][name]
        assert "simulated accelerator" in figure["definition"]
        assert "spread" in figure and "inputs" in figure
    assert report["ratios"]["accelerator_fed_fraction"]["value"] > 0
    assert report["ratios"]["pipeline_cpu_ms_per_frame"]["value"] >= 0
    assert report["ratios"]["service_throughput_vs_backend"]["goal_context"].startswith("a CPU-only")
