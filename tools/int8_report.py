"""INT8 on the CPU: the bundle's Q/DQ model in ONNX Runtime against the FP32 model.

Measures (1) accuracy: ``retinaedge eval`` (COCO AP50 per class, pycocotools) of ``model.onnx`` and of
``model.int8.qdq.onnx`` (a bare ONNX file carries its manifest) on annotated DICOM files, normally the
held-out phantoms of models/demo/MODEL_CARD.md; (2) speed: median ONNX Runtime latency per frame of each
model on the bundle's golden input in batches of ``--batch``, in ``--rounds`` alternating rounds (a shared
machine's load falls on both alike). Prints one JSON object; exit status 1 when the
mean AP50 drops by more than ``--max-ap50-drop`` (the gate), 2 on bad arguments.

    tools/int8_report.py --model models/demo --annotations /tmp/heldout/ground_truth.json /tmp/heldout
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.runtime.backends.onnxruntime import OnnxRuntimeBackend
from retinaedge.runtime.bundle import QDQ_MODEL_FILE, load_bundle, load_golden

log = logging.getLogger("int8_report")


def evaluate(model: Path, annotations: Path, files: list[Path], threads: int | None) -> dict[str, Any]:
    """``retinaedge eval`` on ``model`` (a bundle directory or a bare .onnx) -> its JSON report."""
    argv = [sys.executable, "-m", "retinaedge.runtime.cli", "--log-level", "WARNING", "eval",
            "--model", str(model), "--annotations", str(annotations), *map(str, files)]  # fmt: skip
    if threads:
        argv += ["--threads", str(threads)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"retinaedge eval failed on {model}: {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def latency_ms(model: Path, images: np.ndarray, repeats: int, threads: int | None) -> float:
    """Median milliseconds per frame of ``images`` ``(B, C, H, W)`` over ``repeats`` runs (one warm-up)."""
    return statistics.median(latency_samples(model, images, repeats, threads))


def latency_samples(model: Path, images: np.ndarray, repeats: int, threads: int | None) -> list[float]:
    """Milliseconds per frame of ``images`` ``(B, C, H, W)``, one sample per run (after one warm-up)."""
    with OnnxRuntimeBackend(model, threads=threads) as backend:
        backend.infer(images)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            backend.infer(images)
            times.append((time.perf_counter() - t) * 1e3 / len(images))
    return times


def interleaved_latency(
    models: dict[str, Path], images: np.ndarray, repeats: int, rounds: int, threads: int | None
) -> dict[str, float]:
    """Median ms/frame of each model over ``rounds`` alternating rounds of ``repeats`` runs, so that load
    from other processes on a shared machine falls on both models alike."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, path in models.items():
            samples[name] += latency_samples(path, images, repeats, threads)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="bundle with model.int8.qdq.onnx")
    p.add_argument("--annotations", type=Path, required=True)
    p.add_argument("files", type=Path, nargs="+", help="annotated DICOM files or directories")
    p.add_argument("--max-ap50-drop", type=float, default=0.02, help="gate on the mean AP50 drop (0.02)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20, help="timed runs per model and round (20)")
    p.add_argument("--rounds", type=int, default=3, help="alternating latency rounds, FP32 then INT8 (3)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bundle = load_bundle(args.model)
    qdq = args.model / QDQ_MODEL_FILE
    if not qdq.is_file() or not 0 <= args.max_ap50_drop <= 1:
        log.error("need %s (retinaedge quantize) and 0 <= --max-ap50-drop <= 1", qdq)
        return 2
    golden, _, _ = load_golden(bundle)
    images = np.concatenate([golden] * (args.batch // len(golden) + 1))[: args.batch]
    ms = interleaved_latency(
        {"fp32": bundle.model_path, "int8": qdq}, images, args.repeats, args.rounds, args.threads
    )
    fp32_ms, int8_ms = ms["fp32"], ms["int8"]
    fp32 = evaluate(args.model, args.annotations, args.files, args.threads)
    int8 = evaluate(qdq, args.annotations, args.files, args.threads)
    drop = None if fp32["map50"] is None or int8["map50"] is None else fp32["map50"] - int8["map50"]
    report = {
        "frames": fp32["images"],
        "map50": {"fp32": fp32["map50"], "int8": int8["map50"], "drop": drop},
        "ap50_per_class": {
            name: {"fp32": fp32["classes"][name]["ap50"], "int8": int8["classes"][name]["ap50"]}
            for name in fp32["classes"]
        },
        "latency_ms_per_frame": {
            "fp32": round(fp32_ms, 2),
            "int8": round(int8_ms, 2),
            "batch": args.batch,
            "threads": fp32["backend"].get("threads"),
            "runs": args.repeats * args.rounds,
        },
        "speedup": round(fp32_ms / int8_ms, 3),
        "gate": {
            "max_ap50_drop": args.max_ap50_drop,
            "passed": drop is not None and drop <= args.max_ap50_drop,
        },
        "quantization": json.loads((args.model / "quantization.json").read_text()),
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0 if report["gate"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
