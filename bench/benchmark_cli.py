"""``retinaedge benchmark``: per-stage latency, baselines, HTTP overhead, throughput, memory and energy.

Phases, in order, each runtime in its own process with the same intra-op thread count:

1. fused ONNX Runtime (the appliance; ``--backend tensorrt`` or ``auto``: that backend from the registry): warm-up over the distinct files, then the timed ``Detector`` pass
   over N frames of real DICOM (per-stage timings), ``model.onnx`` per frame at batch 1, throughput per
   batch size (energy with ``tegrastats`` on a Jetson);
2. ``retinaedge serve`` on a free 127.0.0.1 port (its ``max_batch_size`` the best batch size of phase 1
   unless ``--max-batch-size`` says otherwise): sequential ``POST /v1/detect`` of the same instances,
   then 1, 2, 4 concurrent clients, each level until three windows agree within 10 % in frames/s (at least
   ``--level-requests``, ``--tail-requests`` for the 4-client level; at most ``--level-seconds``,
   ``--tail-seconds``) (right after phase 1, so the HTTP overhead compares close measurements);
3. the service against a simulated accelerator (:mod:`.accel_phase`; ``--no-accelerator`` skips it): the
   accelerator figures of the report, each level run until its frames/s hold still;
4. the same ONNX heads, then decode + NMS in numpy (the Python baseline);
5. the in-graph post-processing alone on the same head outputs;
6. the precision table (:mod:`.precisions`): ONNX Runtime FP32 and OpenVINO fp32, bf16 and int8, each
   behind its gate, ms/frame at batch 1 and the largest batch size (``--no-precisions`` skips it);
7. torchvision eager on the same frames, when torch and the checkpoint are there.

``--backend openvino --precision auto`` makes the fused phase (and so ``speedup_vs_torch_eager``) the
fastest precision whose gate passed on this CPU.

Writes ``report.json``, ``report.md`` and ``latency.png`` into ``--out``; prints one JSON line (paths and
ratios) on stdout. Goals that are not met do not change the exit status (0 when the report is written).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinaedge.bench.batch_settings import AUTO, parse_max_batch_size
from retinaedge.bench.configs import MODEL_CONFIGS, default_config_cache, torch_importable
from retinaedge.bench.http_phase import TAIL_CLIENTS
from retinaedge.runtime.discovery import RULE_HELP, dicom_files

if TYPE_CHECKING:
    from retinaedge.bench.inputs import Instance
    from retinaedge.runtime.bundle import Bundle

log = logging.getLogger(__name__)

DEFAULT_DICOM = ("examples/study_01", "examples/study_01_multiframe")
DEFAULT_MODEL = Path("models/demo")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``benchmark`` verb's options to ``p``."""
    p.add_argument("--model", type=Path, help="bundle (default models/demo)")
    p.add_argument(
        "--config",
        choices=sorted(MODEL_CONFIGS),
        help="benchmark a model size users bring instead of --model: r50-fpn-512 is a ResNet-50-FPN RetinaNet "
        "at 512 x 512 (random seeded weights unless --checkpoint), exported into --config-cache the first "
        "time (needs the export extra; minutes)",
    )
    p.add_argument(
        "--config-cache",
        type=Path,
        default=default_config_cache(),
        help="where --config bundles are exported and reused (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmark-output"), help="output directory")
    p.add_argument(
        "--dicom",
        type=Path,
        nargs="+",
        default=[Path(d) for d in DEFAULT_DICOM],
        help=f"DICOM files, used in order; {RULE_HELP} (default: the example study and its multi-frame)",
    )
    p.add_argument("--frames", type=int, default=60, help="timed frames per runtime (default 60)")
    p.add_argument("--warmup", type=int, default=5, help="untimed frames per baseline first (default 5)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per runtime (0: CPU affinity)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="Detector batch size in the fused phase (default 1; the service's: --max-batch-size)",
    )
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4, 8], help="throughput batch sizes")
    p.add_argument(
        "--batch-repeats", type=int, default=6, help="timed batches per batch size, at least (default 6)"
    )
    p.add_argument(
        "--batch-seconds",
        type=float,
        default=1.0,
        help="timed seconds per batch size, at least (default 1): more batches when --batch-repeats take less",
    )
    p.add_argument("--clients", type=_int_list, default=[1, 2, 4], help="HTTP concurrency levels")
    p.add_argument(
        "--requests-per-client",
        type=int,
        default=8,
        help="requests per client per level, at least (default 8); a level runs until its frames/s hold still",
    )
    p.add_argument(
        "--tail-requests",
        type=int,
        default=240,
        help=f"requests at least in the measured windows of the {TAIL_CLIENTS}-client level, whose p99 and "
        "frames/s make the serving ratios (default 240: p99 between the 3rd and 2nd slowest)",
    )
    p.add_argument(
        "--tail-seconds",
        type=float,
        default=90.0,
        help=f"the {TAIL_CLIENTS}-client level stops after this many seconds, stable or not (default 90)",
    )
    p.add_argument(
        "--max-batch-size",
        type=parse_max_batch_size,
        default=AUTO,
        help="the service's max_batch_size (RETINAEDGE_MAX_BATCH_SIZE) in the HTTP phase; auto (default): the "
        "batch size at which model.onnx alone was fastest",
    )
    p.add_argument(
        "--batch-delay-ms",
        type=float,
        help="the service's batch_delay_ms (RETINAEDGE_BATCH_DELAY_MS) in the HTTP phase (default: the "
        "service's own)",
    )
    p.add_argument("--checkpoint", type=Path, help="torchvision checkpoint (default: the manifest's source)")
    p.add_argument("--arch", help="architecture of the checkpoint (default: the manifest's)")
    p.add_argument("--no-torch", action="store_true", help="skip the torchvision eager baseline")
    p.add_argument("--no-http", action="store_true", help="skip the HTTP phase")
    p.add_argument(
        "--gate-model",
        type=Path,
        help="--backend openvino: decide the precision by the gate on this trained bundle (e.g. models/demo) "
        "instead of the benchmarked one (a random-weight --config model, whose near-threshold detections "
        "say nothing about fidelity); the benchmarked bundle's own gate is still reported. In-process "
        "phases only: needs --no-http",
    )
    p.add_argument(
        "--gate-annotations", type=Path, help="ground truth of --gate-eval (the gate's AP50 check)"
    )
    p.add_argument(
        "--gate-eval", type=Path, nargs="+", default=[], metavar="DICOM", help="annotated DICOM for the gate"
    )
    p.add_argument(
        "--no-precisions",
        action="store_true",
        help="skip the precision table (ONNX Runtime FP32 and OpenVINO fp32/bf16/int8 behind their gates)",
    )
    p.add_argument("--runner-timeout", type=float, default=900.0, help="seconds per runner process")
    from retinaedge.bench import accel_phase

    accel_phase.add_arguments(p)
    from retinaedge.runtime.backends.registry import add_backend_arguments

    add_backend_arguments(p, default="onnxruntime")  # the fused phase; the baselines stay ONNX Runtime


def check_gate_options(args: argparse.Namespace) -> None:
    """``--gate-*`` go with ``--backend openvino``; ``--gate-model`` with ``--no-http`` (the service gates
    the bundle it serves, never another one); annotations and files go together."""
    from retinaedge.runtime.errors import ConfigError

    gate_given = args.gate_model or args.gate_annotations or args.gate_eval
    if gate_given and getattr(args, "backend", "onnxruntime") != "openvino":
        raise ConfigError("--gate-model/--gate-annotations/--gate-eval apply to --backend openvino")
    if args.gate_model and not args.no_http:
        raise ConfigError("--gate-model applies to the in-process phases: add --no-http")
    if bool(args.gate_annotations) != bool(args.gate_eval):
        raise ConfigError("--gate-annotations and --gate-eval go together")


def openvino_extra(args: argparse.Namespace) -> dict[str, Any]:
    """What the openvino backend gets in the fused and precision phases (JSON-serialisable)."""
    extra: dict[str, Any] = {}
    if getattr(args, "gate_model", None):
        extra["gate_bundle"] = str(args.gate_model.resolve())
    if getattr(args, "gate_annotations", None):
        extra["gate_annotations"] = str(args.gate_annotations.resolve())
        extra["gate_eval"] = [str(p.resolve()) for p in args.gate_eval]
    return extra


def find_checkpoint(model_dir: Path, source: dict[str, Any]) -> tuple[Path | None, str | None]:
    """The manifest's source checkpoint, looked for beside the bundle and in its parent directory.

    Returns (path, None) when found with the recorded sha256, else (None, reason).
    """
    from retinaedge.runtime.hashing import sha256_file

    name = source.get("file")
    if not name:
        return None, "the manifest records no source checkpoint file; pass --checkpoint"
    for folder in (model_dir, model_dir.parent):
        candidate = folder / str(name)
        if candidate.is_file():
            expected = source.get("sha256")
            if expected and sha256_file(candidate) != expected:
                return None, f"{candidate} does not have the sha256 the manifest records for its source"
            return candidate, None
    return None, f"source checkpoint {name} not found beside {model_dir}; pass --checkpoint"


def run(args: argparse.Namespace) -> int:
    """Run every phase and write the report; returns 0 when the three outputs are written."""
    from retinaedge.bench.inputs import plan_instances
    from retinaedge.runtime.backends.onnxruntime import affinity_threads
    from retinaedge.runtime.bundle import load_bundle
    from retinaedge.runtime.errors import ConfigError

    for value, flag in (
        (args.frames, "--frames"),
        (args.batch_size, "--batch-size"),
        (args.batch_repeats, "--batch-repeats"),
        (args.requests_per_client, "--requests-per-client"),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if not args.batch_seconds >= 0:
        raise ConfigError(f"--batch-seconds must be >= 0, got {args.batch_seconds}")
    if args.tail_requests < TAIL_CLIENTS:
        raise ConfigError(
            f"--tail-requests must be >= {TAIL_CLIENTS} (one per client), got {args.tail_requests}"
        )
    if not args.tail_seconds > 0:
        raise ConfigError(f"--tail-seconds must be > 0, got {args.tail_seconds}")
    if not args.no_http:
        from retinaedge.bench.batch_settings import check_options

        check_options(args)
    check_gate_options(args)
    from retinaedge.bench import accel_phase

    accel_phase.check_options(args)
    from retinaedge.runtime.backends.registry import check_available

    check_available(getattr(args, "backend", "onnxruntime"))  # missing extra: one error line, no phase run
    started = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    if args.config:
        from retinaedge.bench.configs import config_bundle

        args.model = config_bundle(args)
    model_dir = (args.model or DEFAULT_MODEL).resolve()
    bundle = load_bundle(model_dir)
    manifest = bundle.manifest
    files = dicom_files(args.dicom)
    plan = plan_instances(files, args.frames)
    threads = args.threads or affinity_threads()
    log.info(
        "benchmark: %s, %d frame(s) from %d instance(s), %d thread(s)",
        manifest.name,
        sum(i.frames for i in plan),
        len(plan),
        threads,
    )
    with tempfile.TemporaryDirectory(prefix="retinaedge-bench-") as tmp:
        work = Path(tmp)
        results = measure(args, bundle, plan, threads, work)
    from retinaedge.bench.summarize import assemble

    report = assemble(args, bundle, plan, files, threads, results)
    report["loadavg"] = {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}
    report["duration_s"] = round(time.perf_counter() - started, 3)
    return finish(report, args.out)


def measure(
    args: argparse.Namespace, bundle: Bundle, plan: list[Instance], threads: int, work: Path
) -> dict[str, Any]:
    """Run the runner processes and the HTTP phase; their raw results by name."""
    from retinaedge.bench.graphs import write_heads_and_post
    from retinaedge.bench.http_phase import measure_http
    from retinaedge.bench.processes import (
        EAGER_MODULE,
        PRECISIONS_MODULE,
        WORKER_MODULE,
        WorkerError,
        run_process,
    )

    manifest = bundle.manifest
    heads, post = write_heads_and_post(
        bundle.model_path, work, anchors=sum(manifest.anchors.anchors_per_level), classes=manifest.num_classes
    )
    spec = {
        "model": str(bundle.root or bundle.model_path),
        "threads": threads,
        "batch_size": args.batch_size,
        "frames": args.frames,
        "warmup": args.warmup,
        "instances": [[str(i.path.resolve()), i.frames] for i in plan],
        "batch_sizes": args.batch_sizes,
        "batch_repeats": args.batch_repeats,
        "batch_seconds": args.batch_seconds,
        "heads": str(heads),
        "post": str(post),
        "backend": getattr(args, "backend", "onnxruntime"),
        "engine_cache": str(args.engine_cache) if getattr(args, "engine_cache", None) else None,
        "precision": getattr(args, "precision", "fp32"),
        "openvino_extra": openvino_extra(args),
    }
    t = args.runner_timeout
    phases: dict[str, float] = {}

    def phase(name: str, fn: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn()
        finally:
            phases[name] = round(time.perf_counter() - started, 3)

    results: dict[str, Any] = {"phases_s": phases}
    results["fused"] = phase("fused", lambda: run_process(WORKER_MODULE, "fused", spec, work, t, "fused"))
    # Right after the in-process pass, so that http_overhead_p50 compares measurements close in time.
    results["http"] = (
        None
        if args.no_http
        else phase(
            "http",
            lambda: measure_http(args, bundle, plan, threads, work, results["fused"]["throughput_by_batch"]),
        )
    )
    results["accelerator"] = (
        None
        if args.no_accelerator
        else phase("accelerator", lambda: accelerator(args, bundle, plan, threads, work))
    )
    for job in ("python", "fused_post"):
        results[job] = phase(job, lambda job=job: run_process(WORKER_MODULE, job, spec, work, t, job))
    results["precisions"] = None
    if not getattr(args, "no_precisions", False):
        try:
            results["precisions"] = phase(
                "precisions", lambda: run_process(PRECISIONS_MODULE, None, spec, work, t, "precisions")
            )
        except WorkerError as exc:
            results["precisions"] = {"rows": [], "failed": str(exc)}
    results["torch"] = eager_baseline(args, bundle, spec, work)
    if results["torch"].get("status") == "run":
        eager_spec = results["torch"]["spec"]
        try:
            results["torch"].update(
                phase("torch", lambda: run_process(EAGER_MODULE, None, eager_spec, work, t, "torch"))
            )
        except WorkerError as exc:
            results["torch"] = {"status": "failed", "reason": str(exc)}
    return results


def accelerator(
    args: argparse.Namespace, bundle: Bundle, plan: list[Instance], threads: int, work: Path
) -> dict[str, Any]:
    """The simulated-accelerator phase (:mod:`.accel_phase`) in a directory of its own."""
    from retinaedge.bench.accel_phase import accelerator_phase

    sub = work / "accelerator"
    sub.mkdir(exist_ok=True)
    return accelerator_phase(args, bundle, plan, threads, sub)


def eager_baseline(
    args: argparse.Namespace, bundle: Bundle, spec: dict[str, Any], work: Path
) -> dict[str, Any]:
    """Whether the torchvision eager baseline can run, and its spec (or the reason it is skipped)."""
    manifest = bundle.manifest
    if args.no_torch:
        return {"status": "skipped", "reason": "--no-torch"}
    if not torch_importable():
        return {
            "status": "skipped",
            "reason": "torch/torchvision not installed (pip install 'retinaedge[export]')",
        }
    checkpoint, reason = (
        (args.checkpoint, None)
        if args.checkpoint
        else find_checkpoint(bundle.root or bundle.model_path.parent, manifest.source)
    )
    if checkpoint is None:
        return {"status": "skipped", "reason": reason}
    if not Path(checkpoint).is_file():
        return {"status": "skipped", "reason": f"--checkpoint {checkpoint} does not exist"}
    eager_spec = {
        **spec,
        "checkpoint": str(Path(checkpoint).resolve()),
        "architecture": args.arch or manifest.architecture,
        "num_classes": manifest.num_classes,
        "anchor_sizes": [list(s) for s in manifest.anchors.sizes],
        "aspect_ratios": [list(r) for r in manifest.anchors.aspect_ratios],
        "work_dir": str(work),
    }
    return {"status": "run", "spec": eager_spec, "checkpoint": Path(checkpoint).name}


def finish(report: dict[str, Any], out_dir: Path) -> int:
    """Write the three outputs and print the summary line."""
    from retinaedge.bench.plot import draw_latency_plot
    from retinaedge.bench.report import write_outputs
    from retinaedge.bench.summarize import plot_rows
    from retinaedge.runtime.jsonout import emit

    out_dir.mkdir(parents=True, exist_ok=True)
    draw_latency_plot(
        plot_rows(report), f"retinaedge benchmark: {report['model']['name']}", out_dir / "latency.png"
    )
    json_path, md_path = write_outputs(report, out_dir)
    for name, r in report["ratios"].items():
        log.info("%s = %s (goal %s, met: %s)", name, r["value"], r["goal"], r["met"])
    emit(
        {
            "report": str(json_path),
            "markdown": str(md_path),
            "plot": str(out_dir / "latency.png"),
            "ratios": {k: v["value"] for k, v in report["ratios"].items()},
        }
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m retinaedge.bench.benchmark_cli``)."""
    parser = argparse.ArgumentParser(prog="retinaedge benchmark", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
