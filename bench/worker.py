"""Runners that each execute in a fresh process: ``python -m retinaedge.bench.worker JOB SPEC OUT``.

``SPEC`` is a JSON file (written by :mod:`.benchmark_cli`), ``OUT`` the JSON file the runner writes.
Times are milliseconds (``time.perf_counter``), memory bytes. Jobs:

- ``fused``: ``Detector`` on the DICOM instances (untimed warm-up pass over the distinct files, which also
  captures the exact preprocessed frames into ``tensors.npy`` ``(F, C, H, W)`` float32); ``model.onnx`` on
  each frame alone (batch 1); throughput per batch size; then the timed ``Detector`` pass (per-instance
  ``timings_ms``), with energy from ``tegrastats`` when present;
- ``python``: ``heads.onnx`` on each frame, then :mod:`.pypost` in numpy; saves the head outputs
  (``heads.npz``) for the next job;
- ``fused_post``: ``post.onnx`` (the in-graph post-processing alone) on those head outputs.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.runtime.backends import Backend, BackendOptions, open_backend
from retinaedge.runtime.progress import Progress

log = logging.getLogger(__name__)


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (``ru_maxrss`` is KiB on Linux)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib) * (1 if sys.platform == "darwin" else 1024)


def ort_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn`` once: (elapsed ms, its result)."""
    t = time.perf_counter()
    result = fn()
    return (time.perf_counter() - t) * 1e3, result


class TappedBackend(Backend):
    """Wraps a backend and keeps a copy of every batch it is given (``(B, C, H, W)`` float32)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.providers = tuple(inner.providers)
        self.batches: list[np.ndarray] = []

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.batches.append(np.array(images, dtype=np.float32, copy=True))
        return dict(self.inner.infer(images))

    def close(self) -> None:
        self.inner.close()


class EnergyMeter:
    """``tegrastats`` around a workload when the command exists; otherwise a recorded reason.

    The sampler starts ``pad`` intervals before the workload and stops ``pad`` after it; energy per frame
    is the whole-module input rail's mean power over the lines received during the workload (W) times the
    workload's duration (s) divided by the frames, so idle time at the edges is not charged to frames.
    """

    def __init__(self, interval_ms: int = 100, command: tuple[str, ...] = ("tegrastats",), pad: float = 2.5):
        self.interval_ms = interval_ms
        self.command = command
        self.pad_s = pad * interval_ms / 1000
        self.sampler: Any = None
        self.reason: str | None = None
        self.window: tuple[float, float] = (0.0, 0.0)

    def __enter__(self) -> EnergyMeter:
        if shutil.which(self.command[0]) is None:
            self.reason = f"{self.command[0]} not found (not a Jetson, or not on PATH)"
            return self
        from retinaedge.device.sampler import TegrastatsSampler

        try:
            self.sampler = TegrastatsSampler(self.interval_ms, command=self.command).start()
        except OSError as exc:
            self.reason = f"{self.command[0]} could not start: {exc}"
            self.sampler = None
            return self
        time.sleep(self.pad_s)  # a line before the workload starts
        self.window = (time.monotonic(), 0.0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sampler is not None:
            self.window = (self.window[0], time.monotonic())
            time.sleep(self.pad_s)  # and one after it ends

    def result(self, frames: int) -> dict[str, Any]:
        """Energy per frame in J (input rail), per-rail mean/peak W, peak temperatures in °C, peak RAM in MB;
        or ``{"available": False, "reason": ...}``."""
        if self.sampler is None:
            return {"available": False, "reason": self.reason}
        import dataclasses

        from retinaedge.device.sampler import summarize as summarize_power
        from retinaedge.device.tegrastats import INPUT_RAILS

        whole = self.sampler.stop()
        t0, t1 = self.window
        inside = [(t, s) for t, s in self.sampler.samples if t0 <= t <= t1]
        during = summarize_power(inside) if len(inside) >= 2 else whole
        input_rail = next((r for r in INPUT_RAILS if r in during.rails), None)
        per_frame = None
        if input_rail is not None and frames > 0:
            per_frame = during.rails[input_rail].mean_w * (t1 - t0) / frames
        ram = [s.ram_used_mb for _, s in self.sampler.samples if s.ram_used_mb is not None]
        return {
            "available": True,
            "samples": whole.samples,
            "samples_during_workload": len(inside),
            "workload_s": round(t1 - t0, 3),
            "rails": {k: dataclasses.asdict(v) for k, v in during.rails.items()},
            "input_rail": input_rail,
            "energy_per_frame_j": per_frame,
            "reason": None if input_rail else "no whole-module input rail on this module; see rails",
            "peak_temperatures_c": whole.peak_temperatures_c,
            "peak_gpu_load_pct": whole.peak_gpu_load_pct,
            "peak_ram_used_mb": max(ram) if ram else None,
            "throttling_seen": whole.throttling_seen,
            "throttling_note": "no known tegrastats format reports throttling; see peak temperatures and clocks",
        }


def gpu_memory_used_mb() -> dict[str, Any]:
    """Device memory in use per NVIDIA GPU (``nvidia-smi``), or the reason it is not known."""
    if shutil.which("nvidia-smi") is None:
        return {
            "available": False,
            "reason": "nvidia-smi not found (CPU only, or a Jetson: see tegrastats RAM)",
        }
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return {"available": True, "used_mb": [float(x) for x in out.split()]}
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {"available": False, "reason": f"nvidia-smi failed: {type(exc).__name__}"}


def run_fused(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """The appliance's own pipeline: stage timings per instance, per-frame inference, batch throughput."""
    from retinaedge.runtime.bundle import load_bundle
    from retinaedge.runtime.detector import Detector

    bundle = load_bundle(spec["model"])
    backend_name = spec.get("backend", "onnxruntime")
    options = BackendOptions(
        threads=spec["threads"],
        batch_size=max([spec["batch_size"], *spec["batch_sizes"]]),
        cache_dir=Path(spec["engine_cache"]) if spec.get("engine_cache") else None,
        extra=(
            {"precision": spec.get("precision", "fp32"), **spec.get("openvino_extra", {})}
            if backend_name == "openvino"
            else {}
        ),
    )
    tap = TappedBackend(open_backend(backend_name, bundle, options))
    detector = Detector(bundle, tap, batch_size=spec["batch_size"])
    instances = [(Path(p), int(f)) for p, f in spec["instances"]]
    data = {p: p.read_bytes() for p, _ in instances}
    distinct = list(dict.fromkeys(p for p, _ in instances))
    frames_of: dict[Path, list[np.ndarray]] = {}
    with Progress("warm-up (fused)", len(distinct)) as bar:
        for path in distinct:
            tap.batches.clear()
            detector.detect(data[path])
            frames_of[path] = [img for batch in tap.batches for img in batch]
            bar.update()
    tensors = np.stack([img for p, _ in instances for img in frames_of[p]])[: spec["frames"]]
    np.save(work / "tensors.npy", tensors)
    detector.backend = tap.inner  # timed passes without the tap's copies
    backend = tap.inner
    infer_ms = []
    with Progress("fused inference, batch 1", len(tensors)) as bar:
        for img in tensors:
            infer_ms.append(timed(partial(backend.infer, img[None]))[0])
            bar.update()
    throughput = batch_throughput(
        backend.infer, tensors, spec["batch_sizes"], spec["batch_repeats"], spec.get("batch_seconds", 0.0)
    )
    # The pipeline pass last: the HTTP phase follows it, so http_overhead_p50 compares close measurements.
    timings: list[dict[str, float]] = []
    detections = 0
    with EnergyMeter() as meter, Progress("fused pipeline", len(instances)) as bar:
        for path, _ in instances:
            result = detector.detect(data[path])
            timings.append(dict(result.timings_ms))
            detections += sum(len(f.detections) for f in result.frames)
            bar.update()
    frames_timed = sum(f for _, f in instances)
    energy = meter.result(frames_timed)
    out = {
        "instances": [[str(p), f] for p, f in instances],
        "instance_timings_ms": timings,
        "detections": detections,
        "inference_ms": infer_ms,
        "throughput_by_batch": throughput,
        "energy": energy,
        "gpu_memory": gpu_memory_used_mb(),
        "backend": backend.name,
        "backend_reason": backend.reason,
        "threads": getattr(backend, "threads", None),
        "providers": list(backend.providers),
        "precision": backend.precision,
        "backend_facts": backend.describe(),
        "tensor_shape": list(tensors.shape),
    }
    detector.close()
    return out


def batch_throughput(
    infer: Callable[[np.ndarray], Any],
    tensors: np.ndarray,
    batch_sizes: list[int],
    repeats: int,
    min_seconds: float = 0.0,
) -> list[dict[str, Any]]:
    """Frames per second of ``infer`` at each batch size: one untimed batch, then timed batches of the
    frames in turn (batches wrap around the frames) until at least ``repeats`` of them have run and they
    add up to at least ``min_seconds``. Six batches of one demo frame are 40 ms, too short a sample for
    the best frames/s a serving ratio divides by; a second of them is not."""
    out = []
    n = len(tensors)
    with Progress("throughput by batch size", len(batch_sizes)) as bar:
        for b in batch_sizes:

            def batch(i: int, b: int = b) -> np.ndarray:
                return tensors[np.arange(i * b, (i + 1) * b) % n]

            infer(batch(0))
            samples: list[float] = []
            while len(samples) < repeats or sum(samples) < min_seconds * 1e3:
                x = batch(len(samples) + 1)
                samples.append(timed(partial(infer, x))[0])
            seconds = sum(samples) / 1e3
            out.append(
                {
                    "batch_size": b,
                    "batches": len(samples),
                    "batch_ms": samples,
                    "frames_per_s": round(b * len(samples) / seconds, 3),
                }
            )
            bar.update()
    return out


def run_python(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """``heads.onnx`` per frame, then decode + NMS in numpy; saves the head outputs for ``fused_post``."""
    from retinaedge.bench.pypost import PostPlan, postprocess
    from retinaedge.runtime.bundle import load_bundle

    plan = PostPlan.from_manifest(load_bundle(spec["model"]).manifest)
    session = ort_session(Path(spec["heads"]), spec["threads"])
    tensors = np.load(work / "tensors.npy")
    names = ["cls_logits", "bbox_regression"]
    for img in tensors[: spec["warmup"]]:
        logits, deltas = session.run(names, {"images": img[None]})
        postprocess(logits, deltas, plan)
    heads_ms, post_ms, counts, logits_all, deltas_all = [], [], [], [], []
    # sigmoid(x) > t  <=>  x > logit(t): the (anchor, class) scores the Python baseline has to handle.
    t = plan.spec.score_thresh
    threshold_logit = float(np.log(t / (1 - t)))
    candidates: list[int] = []
    with Progress("heads + Python decode/NMS", len(tensors)) as bar:
        for img in tensors:
            t_heads, (logits, deltas) = timed(partial(session.run, names, {"images": img[None]}))
            t_post, dets = timed(partial(postprocess, logits, deltas, plan))
            heads_ms.append(t_heads)
            post_ms.append(t_post)
            counts.append(len(dets[0]))
            candidates.append(int(np.count_nonzero(logits[0] > threshold_logit)))
            logits_all.append(logits[0])
            deltas_all.append(deltas[0])
            bar.update()
    np.savez(work / "heads.npz", cls_logits=np.stack(logits_all), bbox_regression=np.stack(deltas_all))
    return {
        "heads_ms": heads_ms,
        "post_ms": post_ms,
        "detections_per_frame": counts,
        "scores_above_threshold_per_frame": candidates,
    }


def run_fused_post(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """``post.onnx`` (the in-graph post-processing alone) on the saved head outputs, frame by frame."""
    session = ort_session(Path(spec["post"]), spec["threads"])
    heads = np.load(work / "heads.npz")
    logits, deltas = heads["cls_logits"], heads["bbox_regression"]

    def run(i: int) -> Any:
        return session.run(None, {"cls_logits": logits[i : i + 1], "bbox_regression": deltas[i : i + 1]})

    for i in range(min(spec["warmup"], len(logits))):
        run(i)
    post_ms, counts = [], []
    with Progress("in-graph post-processing", len(logits)) as bar:
        for i in range(len(logits)):
            t, outs = timed(partial(run, i))
            post_ms.append(t)
            counts.append(int(outs[0][0]))
            bar.update()
    return {"post_ms": post_ms, "detections_per_frame": counts}


JOBS: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    "fused": run_fused,
    "python": run_python,
    "fused_post": run_fused_post,
}


def main(argv: list[str] | None = None) -> int:
    """``JOB SPEC.json OUT.json``: run one job, write its result with the process's peak RSS."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] not in JOBS:
        sys.stderr.write(f"usage: python -m retinaedge.bench.worker {{{','.join(JOBS)}}} SPEC OUT\n")
        return 2
    job, spec_path, out_path = args
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    spec = json.loads(Path(spec_path).read_text())
    result = JOBS[job](spec, Path(spec["work_dir"]))
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["pid"] = os.getpid()
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
