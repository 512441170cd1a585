"""The report dictionary, from the runners' raw results (layout: :mod:`.report`, ``report.json``)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinaedge.bench.accelerator import LABEL
from retinaedge.bench.precision_report import precision_section
from retinaedge.bench.report import SCHEMA, compute_ratios, stage_summaries
from retinaedge.bench.stats import summarize

if TYPE_CHECKING:
    from retinaedge.bench.inputs import Instance
    from retinaedge.runtime.bundle import Bundle


def versions() -> dict[str, str | None]:
    """Versions of the measured stack (distributions, without importing torch)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (
        "retinaedge",
        "numpy",
        "onnx",
        "onnxruntime",
        "pydicom",
        "opencv-python-headless",
        "torch",
        "torchvision",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def device_summary(device: dict[str, Any]) -> str:
    """One line naming the hardware: the Jetson module, else the CPU model and count."""
    jetson = device.get("jetson") or {}
    module = (jetson.get("module") or {}).get("model") if jetson else None
    if module:
        mode = (jetson.get("power_mode") or {}).get("name")
        return f"{module}" + (f", power mode {mode}" if mode else "")
    cpu = device.get("cpu") or {}
    return f"{cpu.get('model') or platform.processor() or 'unknown CPU'}, {device.get('cpu_affinity')} CPU(s) usable"


def assemble(
    args: argparse.Namespace,
    bundle: Bundle,
    plan: list[Instance],
    files: list[Path],
    threads: int,
    results: dict[str, Any],
) -> dict[str, Any]:
    """The report dictionary (see :mod:`.report` for the layout)."""
    from retinaedge.device.collect import collect

    manifest = bundle.manifest
    fused, python, fpost, torch_r, http = (
        results[k] for k in ("fused", "python", "fused_post", "torch", "http")
    )
    device = dataclasses.asdict(collect())
    vers = versions()
    eager_ran = "inference_ms" in torch_r
    context = {
        "device": device_summary(device),
        "versions": {k: vers.get(k) for k in ("python", "onnxruntime", "numpy", "torch")},
        "backend": fused.get("backend", "onnxruntime"),
        "providers": fused["providers"],
        # Why this backend and precision (openvino: the precision decision and its gate figures).
        "backend_reason": fused.get("backend_reason", ""),
        # What the fused backend ran: export writes float32 graphs; openvino may serve bf16/int8 behind its gate.
        "precision": fused.get("precision", "fp32"),
        "input": [manifest.input.channels, manifest.input.height, manifest.input.width],
        "model_sha256": manifest.model_sha256,
        "threads": threads,
        # The service's batching in the HTTP phase (None without one): bench/batch_settings.py.
        "service_batching": (http or {}).get("batching"),
    }
    heads_plus_py = [h + p for h, p in zip(python["heads_ms"], python["post_ms"], strict=True)]
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "context": context,
        "device": device,
        "versions": vers,
        "model": {
            "dir": str(bundle.root or bundle.model_path),
            "name": manifest.name,
            "architecture": manifest.architecture,
            "classes": list(manifest.class_names),
            "input": {
                "channels": manifest.input.channels,
                "height": manifest.input.height,
                "width": manifest.input.width,
            },
            "sha256": manifest.model_sha256,
            "nms": manifest.nms,
            "config": getattr(args, "config", None),  # --config: a benchmark configuration's exported bundle
            "source": manifest.source,
        },
        "threads": threads,
        "batch_size": args.batch_size,
        "frames": {
            "requested": args.frames,
            "timed": len(fused["inference_ms"]),
            "pipeline_frames": sum(i.frames for i in plan),
            "instances": len(plan),
            "files": len(set(files)),
            "warmup": f"one untimed pass over the {len(set(i.path for i in plan))} distinct file(s) for the "
            f"fused pipeline; {args.warmup} frame(s) for each baseline and HTTP",
        },
        "stages_ms_per_frame": stage_summaries(fused),
        "instance_total_ms": summarize([t["total"] for t in fused["instance_timings_ms"]]),
        "inference_ms_per_frame": {
            "onnxruntime_fused": summarize(fused["inference_ms"]),
            "torchvision_eager": summarize(torch_r["inference_ms"]) if eager_ran else None,
            "onnx_heads_plus_python_post": summarize(heads_plus_py),
            "onnx_heads_only": summarize(python["heads_ms"]),
        },
        "postprocess_ms_per_frame": {
            "in_graph": summarize(fpost["post_ms"]),
            "python": summarize(python["post_ms"]),
        },
        "detections": {
            "fused_pipeline_total": fused["detections"],
            "python_post_per_frame": python["detections_per_frame"],
            "in_graph_post_per_frame": fpost["detections_per_frame"],
            "python_equals_in_graph_counts": python["detections_per_frame"] == fpost["detections_per_frame"],
            # What the Python baseline's work scales with (the in-graph one always handles every anchor).
            "scores_above_threshold_per_frame": summarize(python["scores_above_threshold_per_frame"]),
            "torchvision_eager_per_frame": torch_r.get("detections_per_frame"),
        },
        "throughput": {
            "by_batch_size": [
                {**row, "batch_ms": summarize(row["batch_ms"])} for row in fused["throughput_by_batch"]
            ],
            "by_clients": [
                {
                    **lvl,
                    "latency_ms": summarize(lvl["latency_ms"]),
                    "single_frame_latency_ms": (
                        summarize(lvl["single_frame_latency_ms"])
                        if lvl.get("single_frame_latency_ms")
                        else None
                    ),
                }
                for lvl in (http or {}).get("levels", [])
            ],
        },
        "memory": {
            "peak_rss_bytes": {
                "onnxruntime_fused": fused["peak_rss_bytes"],
                "onnx_heads_python_post": python["peak_rss_bytes"],
                "in_graph_post": fpost["peak_rss_bytes"],
                "torchvision_eager": torch_r.get("peak_rss_bytes"),
                "service": (http or {}).get("peak_rss_bytes"),
            },
            "gpu": fused["gpu_memory"],
        },
        "energy": fused["energy"],
        "baselines": {
            "torchvision_eager": {
                "status": "measured" if eager_ran else torch_r.get("status", "skipped"),
                "reason": torch_r.get("reason"),
                "checkpoint": torch_r.get("checkpoint"),
                "versions": torch_r.get("versions"),
                "threads": torch_r.get("threads"),
            },
            "python_postprocess": {
                "status": "measured",
                "reason": None,
                "what": "heads.onnx cut from model.onnx, then sigmoid, per-level top-k, BoxCoder decode with "
                "clamp, clip and class-wise greedy NMS in numpy (torchvision semantics)",
            },
        },
        "http": None,
        # The simulated-accelerator phase (None when skipped): bench/accel_phase.py, bench/accel_report.py.
        "accelerator": results.get("accelerator"),
        "phases_s": results["phases_s"],
        "outputs": {"json": "report.json", "markdown": "report.md", "plot": "latency.png"},
    }
    if http is not None:
        report["http"] = {
            "round_trip_ms": summarize(http["round_trip_ms"]),
            "server_total_ms": summarize(http["server_total_ms"]),
            "round_trip_minus_server_total_ms": summarize(
                [r - s for r, s in zip(http["round_trip_ms"], http["server_total_ms"], strict=True)]
            ),
            # The handler's own time beyond detection (keeping the result for /v1/results, JSON).
            "server_request_minus_total_ms": summarize(
                [q - s for q, s in zip(http["server_request_ms"], http["server_total_ms"], strict=True)]
            ),
            "startup_s": http["startup_s"],
            "exit_code": http["exit_code"],
            "backend": http["backend"],
            "requests": len(http["round_trip_ms"]),
            "batching": http.get("batching"),
        }
    eager_p50 = report["inference_ms_per_frame"]["torchvision_eager"]
    report["fused_backend"] = fused.get("backend_facts") or {}
    report["precisions"] = precision_section(
        results.get("precisions"), None if eager_p50 is None else float(eager_p50["p50"])
    )
    skipped = "--no-accelerator" if getattr(args, "no_accelerator", False) else None
    report["ratios"] = compute_ratios(report, accelerator_reason=skipped)
    if report["accelerator"] is not None:
        from retinaedge.bench.accel_report import accelerator_line

        report["title"] = f"retinaedge benchmark: {manifest.name}, served against a {LABEL}"
        report["model"]["accelerator"] = accelerator_line(report["accelerator"])
    else:
        report["title"] = f"retinaedge benchmark: {manifest.name}"
    return report


def plot_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The rows of the latency plot: stages, runtimes, post-processing, HTTP."""
    rows = [(f"stage: {k}", v) for k, v in report["stages_ms_per_frame"].items() if k != "total"]
    rows += [(f"inference: {k}", v) for k, v in report["inference_ms_per_frame"].items() if v]
    rows += [(f"post: {k}", v) for k, v in report["postprocess_ms_per_frame"].items()]
    if report["http"]:
        rows.append(("HTTP round trip (instance)", report["http"]["round_trip_ms"]))
    return rows
