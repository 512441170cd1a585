"""Assemble ``report.json`` from the runners' raw samples and write it with ``report.md``.

``report.json`` is meant to be compared across devices and runs: every latency is a summary
(:func:`~.stats.summarize`: p50/p90/p95/p99/mean/min/max/n, milliseconds), and ``context`` (device,
versions, backend, precision, input size, model sha256, threads) is recorded at the top and repeated
beside each headline ratio.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retinaedge.bench.http_phase import TAIL_CLIENTS
from retinaedge.bench.precision_report import int8_ratio
from retinaedge.bench.precision_report import render as render_precisions
from retinaedge.bench.stats import per_frame_samples, ratio, safe_div, summarize

SCHEMA = "retinaedge.benchmark/1"
STAGES: tuple[str, ...] = ("parse", "decode", "preprocess", "inference", "postprocess", "total")

#: Goals of the headline ratios: value, higher is better. The serving ones (issue 17) are a CPU-only
#: machine's, where decoding and windowing share the cores with ONNX Runtime; on a Jetson, whose CPU
#: stages run beside the GPU, service_throughput_vs_backend should reach 0.9.
GOALS: dict[str, tuple[float, bool]] = {
    "speedup_vs_torch_eager": (2.0, True),
    "postprocess_speedup_vs_python": (1.0, True),
    "http_overhead_p50": (0.10, False),
    "service_throughput_vs_backend": (0.8, True),
    "tail_ratio_p99_p50": (2.0, False),
}
JETSON_THROUGHPUT_GOAL = 0.9


def stage_summaries(fused: dict[str, Any]) -> dict[str, Any]:
    """Per-frame percentiles of each detector stage (``timings_ms`` keys) over the timed instances."""
    frames = [int(f) for _, f in fused["instances"]]
    out = {}
    for stage in STAGES:
        per_instance = [float(t.get(stage, 0.0)) for t in fused["instance_timings_ms"]]
        out[stage] = summarize(per_frame_samples(per_instance, frames))
    return out


def _p50(summary: dict[str, Any] | None) -> float | None:
    return None if summary is None else float(summary["p50"])


#: What the CPU-only serving goals are for (``goal_context`` of those ratios).
CPU_ONLY_CONTEXT = (
    "a CPU-only machine's goal: the service's Python shares the cores with ONNX Runtime, so every ms of it "
    "is taken from the model; serving an off-CPU engine is measured by the accelerator_* figures"
)
CPU_ONLY_RATIOS = (
    "http_overhead_p50",
    "http_overhead_paired_p50",
    "service_throughput_vs_backend",
    "tail_ratio_p99_p50",
)


def compute_ratios(report: dict[str, Any], *, accelerator_reason: str | None = None) -> dict[str, Any]:
    """The headline ratios, each with ``value``, ``goal``, ``met``, ``definition`` and the ``context``;
    then the accelerator figures (:mod:`.accel_report`; without that phase, None with
    ``accelerator_reason``)."""
    from retinaedge.bench.accel_report import accelerator_ratios

    inf = report["inference_ms_per_frame"]
    post = report["postprocess_ms_per_frame"]
    http = report.get("http") or {}
    eager = inf.get("torchvision_eager")
    speedup = safe_div(_p50(eager), _p50(inf["onnxruntime_fused"]))
    post_speedup = safe_div(_p50(post["python"]), _p50(post["in_graph"]))
    backend_p50 = _p50(report["instance_total_ms"])
    rt_p50 = _p50(http.get("round_trip_ms"))
    overhead = None if rt_p50 is None or not backend_p50 else (rt_p50 - backend_p50) / backend_p50
    paired = safe_div(_p50(http.get("round_trip_minus_server_total_ms")), _p50(http.get("server_total_ms")))
    eager_reason = None if eager is not None else report["baselines"]["torchvision_eager"].get("reason")
    ctx = report["context"]
    out = {
        "speedup_vs_torch_eager": ratio(
            speedup,
            goal=GOALS["speedup_vs_torch_eager"][0],
            higher_is_better=True,
            definition="torchvision eager p50 / fused backend p50 (context: backend, precision), ms per "
            "frame, batch 1, same frames",
            reason=eager_reason,
        ),
        "postprocess_speedup_vs_python": ratio(
            post_speedup,
            goal=GOALS["postprocess_speedup_vs_python"][0],
            higher_is_better=True,
            definition="numpy decode + NMS p50 / in-graph post-processing p50, same head outputs",
        ),
        "http_overhead_p50": ratio(
            overhead,
            goal=GOALS["http_overhead_p50"][0],
            higher_is_better=False,
            definition="(HTTP round trip p50 - in-process Detector total p50) / Detector total p50, "
            "same instances",
            reason=None if overhead is not None else "no HTTP phase",
        ),
        "http_overhead_paired_p50": ratio(
            paired,
            goal=GOALS["http_overhead_p50"][0],
            higher_is_better=False,
            definition="p50 of (round trip - the server's own timings_ms.total) per request / p50 of the "
            "server's total: the same overhead without the load change between phases",
            reason=None if paired is not None else "no HTTP phase",
        ),
    }
    out.update(serving_ratios(report))
    if report.get("precisions") is not None:
        out["int8_speedup_vs_fp32"] = int8_ratio(report["precisions"])
    for name in CPU_ONLY_RATIOS:
        out[name]["goal_context"] = CPU_ONLY_CONTEXT
    out.update(accelerator_ratios(report.get("accelerator"), accelerator_reason))
    for entry in out.values():
        entry["context"] = ctx
    return out


def serving_ratios(report: dict[str, Any]) -> dict[str, Any]:
    """``service_throughput_vs_backend`` and ``tail_ratio_p99_p50``, from the HTTP level with
    :data:`TAIL_CLIENTS` clients and the best batch size of ``model.onnx`` alone (each with its inputs)."""
    by_batch = report["throughput"]["by_batch_size"]
    levels = report["throughput"]["by_clients"]
    level = next((lvl for lvl in levels if lvl["clients"] == TAIL_CLIENTS), None)
    reason = None
    if report.get("http") is None:
        reason = "no HTTP phase"
    elif level is None:
        measured = [lvl["clients"] for lvl in levels]
        reason = f"no HTTP level with {TAIL_CLIENTS} concurrent clients (--clients gave {measured})"
    best = max(by_batch, key=lambda row: row["frames_per_s"], default=None)
    throughput = None
    if level is not None and best is not None:
        throughput = safe_div(level["frames_per_s"], best["frames_per_s"])
    # Single-frame requests when there are any: a multi-frame instance's latency grows with its frames,
    # so mixed sizes would make p99 / p50 measure the mix, not waiting. The multi-frame instances still
    # run in the same level, so the tail includes single-frame requests queued behind their frames.
    latency = None
    if level is not None:
        latency = level.get("single_frame_latency_ms") or level["latency_ms"]
    tail = safe_div(latency["p99"], latency["p50"]) if latency is not None else None
    service_ratio = ratio(
        throughput,
        goal=GOALS["service_throughput_vs_backend"][0],
        higher_is_better=True,
        definition=f"frames/s through the service with {TAIL_CLIENTS} concurrent clients / the best frames/s "
        f"of model.onnx alone over the batch sizes measured (goal on a Jetson: >= {JETSON_THROUGHPUT_GOAL:g})",
        reason=reason or (None if best is not None else "no model.onnx throughput measured"),
    )
    service_ratio["inputs"] = {
        "service_frames_per_s": level["frames_per_s"] if level else None,
        "backend_frames_per_s": best["frames_per_s"] if best else None,
        "backend_batch_size": best["batch_size"] if best else None,
    }
    tail_ratio = ratio(
        tail,
        goal=GOALS["tail_ratio_p99_p50"][0],
        higher_is_better=False,
        definition=f"p99 / p50 of request latency with {TAIL_CLIENTS} concurrent clients (of the single-frame "
        "requests when the level also posts multi-frame instances)",
        reason=reason,
    )
    tail_ratio["inputs"] = {
        "p50_ms": latency["p50"] if latency else None,
        "p99_ms": latency["p99"] if latency else None,
        "requests": latency["n"] if latency else None,
    }
    return {"service_throughput_vs_backend": service_ratio, "tail_ratio_p99_p50": tail_ratio}


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _latency_rows(title: str, items: dict[str, Any]) -> list[str]:
    lines = [f"### {title}", "", "| | p50 | p90 | p95 | p99 | mean | n |", "|---|---|---|---|---|---|---|"]
    for name, s in items.items():
        if s is None:
            lines.append(f"| {name} | – | – | – | – | – | – |")
            continue
        cells = " | ".join(_fmt(float(s[k]), 3) for k in ("p50", "p90", "p95", "p99", "mean"))
        lines.append(f"| {name} | {cells} | {s['n']} |")
    return [*lines, ""]


def _mib(b: int | None) -> str:
    return "–" if b is None else f"{b / 2**20:.0f} MiB"


def busy_warning(report: dict[str, Any]) -> list[str]:
    """A warning line when the 1-minute load average exceeded the usable CPUs (other work competed)."""
    cpus = report["device"].get("cpu_affinity") or 1
    peak = max(report["loadavg"]["start"][0], report["loadavg"]["end"][0])
    if peak <= cpus:
        return []
    return [
        f"- **warning**: the 1-minute load average reached {peak:.1f} on {cpus} usable CPU(s): other work "
        "competed for the CPU during this run, so absolute times are inflated and noisy; ratios measured "
        "phase by phase are affected unevenly"
    ]


def batching_line(batching: dict[str, Any]) -> str:
    """One sentence on the service's batching settings (``http.batching``)."""
    parts = []
    if batching.get("max_batch_size") is not None:
        parts.append(f"max_batch_size {batching['max_batch_size']} ({batching['max_batch_size_from']})")
    if batching.get("batch_delay_ms") is not None:
        parts.append(f"batch_delay_ms {batching['batch_delay_ms']:g}")
    parts += [f"{k} not set: {why}" for k, why in (batching.get("not_applied") or {}).items()]
    return "; ".join(parts) if parts else "the service's defaults"


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the same figures as ``report.json`` as readable tables."""
    from retinaedge.bench.accel_report import accelerator_markdown

    ctx = report["context"]
    accel = report["model"].get("accelerator")
    lines = [
        f"# {report.get('title') or 'retinaedge benchmark'}",
        "",
        f"- device: {ctx['device']}",
        f"- model: {report['model']['name']} ({report['model']['architecture']}), input "
        f"{ctx['input']}, sha256 `{ctx['model_sha256'][:16]}…`"
        + (f"; the accelerator_* figures: served against a {accel}" if accel else ""),
        f"- backend: {ctx['backend']} {ctx['providers']}, precision {ctx['precision']}, {ctx['threads']} "
        f"thread(s), batch size {report['batch_size']}"
        + (f" ({ctx['backend_reason']})" if ctx.get("backend_reason") else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v is not None),
        f"- frames: {report['frames']['timed']} timed from {report['frames']['instances']} instance(s) of "
        f"{report['frames']['files']} real DICOM file(s) given; warm-up: {report['frames']['warmup']}",
        f"- load average at start/end: {report['loadavg']['start']} / {report['loadavg']['end']}; "
        f"run took {report['duration_s']:.0f} s",
        *busy_warning(report),
        "",
        "## Headline ratios",
        "",
        "| figure | value | goal | met | spread over windows | definition |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["ratios"].items():
        value = _fmt(r["value"], 3) if r["value"] is not None else f"– ({r.get('reason') or 'n/a'})"
        spread = _fmt(r.get("spread"), 3)
        lines.append(
            f"| `{name}` | {value} | {r['goal']} | {_fmt(r['met'])} | {spread} | {r['definition']} |"
        )
    lines += ["", *accelerator_markdown(report), "## Latency (ms)", ""]
    lines += _latency_rows(
        "Pipeline stages, per frame (fused ONNX Runtime, Detector timings)", report["stages_ms_per_frame"]
    )
    lines += _latency_rows(
        "Inference per frame, batch 1 (same frames in every runtime, each in its own process)",
        report["inference_ms_per_frame"],
    )
    lines += _latency_rows(
        "Post-processing per frame (same head outputs)", report["postprocess_ms_per_frame"]
    )
    above = report["detections"]["scores_above_threshold_per_frame"]
    lines += [
        f"Scores above the threshold per frame (what the Python baseline's work grows with; the in-graph "
        f"post-processing always ranks every anchor): p50 {above['p50']:.0f}, max {above['max']:.0f}.",
        "",
    ]
    http = report.get("http")
    if http:
        lines += _latency_rows(
            "HTTP (`POST /v1/detect`, per instance, sequential on one keep-alive connection)",
            {
                "in-process Detector total": report["instance_total_ms"],
                "HTTP round trip": http["round_trip_ms"],
                "server timings_ms.total": http["server_total_ms"],
                "round trip - server total": http["round_trip_minus_server_total_ms"],
                "server handler - server total": http["server_request_minus_total_ms"],
            },
        )
    lines += [
        "## Throughput",
        "",
        "`model.onnx` alone on preprocessed frames:",
        "",
        "| batch size | batches | frames/s | batch p50 ms |",
        "|---|---|---|---|",
    ]
    for row in report["throughput"]["by_batch_size"]:
        lines.append(
            f"| {row['batch_size']} | {row['batches']} | {row['frames_per_s']:.2f} | {row['batch_ms']['p50']:.2f} |"
        )
    if report["throughput"]["by_clients"]:
        lines += [
            "",
            "| HTTP clients | requests | requests/s | frames/s | latency p50 ms | p99 ms |",
            "|---|---|---|---|---|---|",
        ]
        for row in report["throughput"]["by_clients"]:
            stop = f" (stopped by {row['stopped_by']})" if row.get("stopped_by") else ""
            lines.append(
                f"| {row['clients']} | {row['requests']}{stop} | {row['requests_per_s']:.2f} | "
                f"{row['frames_per_s']:.2f} | {row['latency_ms']['p50']:.2f} | {row['latency_ms']['p99']:.2f} |"
            )
        batching = (report.get("http") or {}).get("batching")
        if batching:
            lines += ["", f"Service batching in the HTTP phase: {batching_line(batching)}."]
    mem = report["memory"]
    lines += ["", "## Memory", "", "| process | peak RSS |", "|---|---|"]
    lines += [f"| {k} | {_mib(v)} |" for k, v in mem["peak_rss_bytes"].items()]
    gpu = mem["gpu"]
    lines += ["", f"GPU memory: {gpu.get('used_mb') if gpu.get('available') else gpu.get('reason')}"]
    energy = report["energy"]
    lines += ["", "## Energy, temperatures, throttling", ""]
    if energy.get("available"):
        lines.append(
            f"- energy per frame ({energy.get('input_rail')}): {_fmt(energy.get('energy_per_frame_j'), 4)} J"
        )
        lines.append(f"- peak temperatures (°C): {energy.get('peak_temperatures_c')}")
        lines.append(
            f"- throttling seen: {_fmt(energy.get('throttling_seen'))} (no tegrastats format reports it)"
        )
    else:
        lines.append(f"- not measured: {energy.get('reason')}")
    lines += render_precisions(report.get("precisions"))
    lines += ["", "## Baselines", ""]
    for name, b in report["baselines"].items():
        lines.append(f"- {name}: {b['status']}" + (f" ({b['reason']})" if b.get("reason") else ""))
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in report["phases_s"].items())
    lines += ["", f"Phases: {phases}.", "", f"Latency plot: `{report['outputs']['plot']}`", ""]
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path
