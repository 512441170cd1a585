"""The precision table: ms per frame of each backend and precision on the benchmark's own frames, with the
precision gate's figures, in a process of its own: ``python -m retinaedge.bench.precisions SPEC OUT``.

Rows: ONNX Runtime FP32 (the project's settings), then OpenVINO ``fp32``, ``bf16`` and ``int8`` in latency
mode, and ``fp32`` in throughput mode (the measurement behind the default hint; each
asked for explicitly: a precision not offered on this CPU, or whose gate failed, is served as FP32 and the
row says so; its ``served`` column is what ran). Each row times ``tensors.npy`` (the frames the fused
phase preprocessed, ``(F, C, H, W)`` float32) at batch 1 and at the largest batch size asked for:
one untimed batch, then at least ``repeats`` batches, median ms per frame. The rows run one after the
other in this process, not alternated: on a shared machine the figures are noisy, and the report says so.
Without openvino installed only the ONNX Runtime row is measured (and the reason given).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.runtime.backends import BackendOptions, open_backend
from retinaedge.runtime.bundle import load_bundle

log = logging.getLogger(__name__)

OPENVINO_PRECISIONS = ("fp32", "bf16", "int8")


def ms_per_frame(infer: Any, tensors: np.ndarray, batch: int, repeats: int) -> float:
    """Median ms per frame over ``repeats`` timed batches of ``batch`` frames (after one untimed batch)."""
    n = len(tensors)

    def frames(i: int) -> np.ndarray:
        return tensors[np.arange(i * batch, (i + 1) * batch) % n]

    infer(frames(0))
    samples = []
    for i in range(1, repeats + 1):
        x = frames(i)
        started = time.perf_counter()
        infer(x)
        samples.append((time.perf_counter() - started) * 1e3 / batch)
    return round(statistics.median(samples), 3)


def measure_row(
    spec: dict[str, Any], backend: str, precision: str, tensors: np.ndarray, hint: str = "latency"
) -> dict[str, Any]:
    """One row: open ``backend`` at ``precision`` (gated), time it at batch 1 and the largest batch;
    ``hint``: OpenVINO's performance hint (``throughput`` splits a batch over its streams)."""
    extra: dict[str, Any] = {}
    if backend == "openvino":
        extra = {"precision": precision, "performance_hint": hint, **spec.get("openvino_extra", {})}
        if spec.get("openvino_cache"):
            extra["cache_dir"] = spec["openvino_cache"]
    batch = max(spec["batch_sizes"])
    options = BackendOptions(threads=spec["threads"], batch_size=batch, extra=extra)
    started = time.perf_counter()
    bundle = load_bundle(spec["model"])
    repeats = int(spec.get("precision_repeats", 10))
    with open_backend(backend, bundle, options) as opened:
        open_s = round(time.perf_counter() - started, 3)
        facts = opened.describe()
        gate = (facts.get("gates") or {}).get(precision)
        row: dict[str, Any] = {
            "backend": backend,
            "requested": precision,
            "served": opened.precision,
            "reason": opened.reason,
            "open_s": open_s,
            "batch": batch,
            "gate": gate,
            "gate_bundle": facts.get("gate_bundle"),
            "settings": {
                k: facts.get(k) for k in ("inference_precision", "performance_hint", "threads", "streams")
            },
        }
        timed: Any = opened
        row["timed"] = "served"
        if backend == "openvino" and opened.precision != precision and gate is not None:
            # Its gate failed: time it anyway (compiled here, never served) to show what it would cost.
            timed = instrument(bundle, precision, spec["threads"], str(extra.get("int8_model", "auto")))
            row["timed"] = "instrument: compiled for timing only, not served (its gate failed)"
        try:
            row["ms_per_frame_batch1"] = ms_per_frame(timed.infer, tensors, 1, repeats)
            row[f"ms_per_frame_batch{batch}"] = ms_per_frame(
                timed.infer, tensors, batch, max(3, repeats // batch)
            )
        finally:
            if timed is not opened:
                timed.close()
    log.info(
        "precision row %s %s (served %s): %s ms/frame at batch 1",
        backend,
        precision,
        row["served"],
        row["ms_per_frame_batch1"],
    )
    return row


def instrument(bundle: Any, precision: str, threads: int, int8_choice: str) -> Any:
    """``precision``'s compiled model without the gate, for timing only (the benchmark's instrument)."""
    import openvino as ov
    from retinaedge.runtime.backends.openvino.compiled import OpenVinoBackend
    from retinaedge.runtime.backends.openvino.variants import int8_model

    path = bundle.model_path
    if precision == "int8":
        path, why = int8_model(bundle, int8_choice)
        if path is None:
            raise RuntimeError(why)
    return OpenVinoBackend(ov.Core(), path, precision=precision, threads=threads)


def run_precisions(spec: dict[str, Any]) -> dict[str, Any]:
    """The rows (see the module docstring)."""
    tensors = np.load(Path(spec["work_dir"]) / "tensors.npy")
    rows = [measure_row(spec, "onnxruntime", "fp32", tensors)]
    reason = None
    if importlib.util.find_spec("openvino") is None:
        reason = "openvino is not installed (pip install 'retinaedge[openvino]')"
    else:
        rows += [measure_row(spec, "openvino", p, tensors) for p in OPENVINO_PRECISIONS]
        rows.append(measure_row(spec, "openvino", "fp32", tensors, hint="throughput"))
    return {"rows": rows, "openvino_skipped": reason, "frames": int(len(tensors))}


def main(argv: list[str] | None = None) -> int:
    """``SPEC.json OUT.json``: measure the rows and write them."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.stderr.write("usage: python -m retinaedge.bench.precisions SPEC.json OUT.json\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    spec = json.loads(Path(args[0]).read_text())
    Path(args[1]).write_text(json.dumps(run_precisions(spec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
