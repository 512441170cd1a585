"""The precision table: ms per frame of each backend and precision on the benchmark's own frames, with the
precision gate's figures, in a process of its own: ``python -m retinaedge.bench.precisions SPEC OUT``.

Rows: ONNX Runtime FP32 (the project's settings), then OpenVINO ``fp32``, ``bf16`` and ``int8`` in latency
mode, and ``fp32`` in throughput mode (the measurement behind the default hint). Each OpenVINO precision is
asked for explicitly and opened behind its gate; ``served`` is what the backend would serve. A precision
offered on this CPU whose gate failed is still timed, compiled for timing only and never served (``timed``
says so), so the table shows what the gate costs; one not offered (no native bf16, no INT8 model) is not.

Timing: every row is opened first, then the rows are **alternated in rounds** (each round times one
batch of 1 frame and one of the largest batch size per row, the frames of ``tensors.npy`` in turn: the
fused phase's preprocessed frames, ``(F, C, H, W)`` float32), so a shared machine's load falls on all rows
alike; each row's figure is the median ms per frame of its rounds. Without openvino installed only the ONNX
Runtime row is measured (and the reason given).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.runtime.backends import BackendOptions, open_backend
from retinaedge.runtime.bundle import load_bundle

log = logging.getLogger(__name__)

#: (backend, precision, OpenVINO performance hint) of each row, in order.
ROWS = (
    ("onnxruntime", "fp32", "latency"),
    ("openvino", "fp32", "latency"),
    ("openvino", "bf16", "latency"),
    ("openvino", "int8", "latency"),
    ("openvino", "fp32", "throughput"),
)


def timed_ms_per_frame(infer: Any, x: np.ndarray) -> float:
    started = time.perf_counter()
    infer(x)
    return (time.perf_counter() - started) * 1e3 / len(x)


def open_row(
    spec: dict[str, Any], backend: str, precision: str, hint: str, stack: ExitStack
) -> tuple[dict[str, Any], Any]:
    """Open one row's backend (gated) and, when its precision's gate failed, the instrument to time;
    both are closed with ``stack``. Returns the row's facts and what to time."""
    extra: dict[str, Any] = {}
    if backend == "openvino":
        extra = {"precision": precision, "performance_hint": hint, **spec.get("openvino_extra", {})}
    batch = max(spec["batch_sizes"])
    bundle = load_bundle(spec["model"])
    started = time.perf_counter()
    opened = stack.enter_context(
        open_backend(backend, bundle, BackendOptions(threads=spec["threads"], batch_size=batch, extra=extra))
    )
    facts = opened.describe()
    row: dict[str, Any] = {
        "backend": backend,
        "requested": precision,
        "served": opened.precision,
        "reason": opened.reason,
        "open_s": round(time.perf_counter() - started, 3),
        "batch": batch,
        "gate": (facts.get("gates") or {}).get(precision),
        "gate_bundle": facts.get("gate_bundle"),
        "settings": {
            k: facts.get(k) for k in ("inference_precision", "performance_hint", "threads", "streams")
        },
        "timed": "served",
    }
    timed: Any = opened
    if (
        backend == "openvino"
        and opened.precision != precision
        and facts.get("offered", {}).get(precision) == "yes"
    ):
        timed = stack.enter_context(instrument(bundle, precision, spec["threads"], hint))
        row["timed"] = "instrument: compiled for timing only, not served (its gate failed)"
        row["settings"]["inference_precision"] = timed.describe().get("inference_precision")
    return row, timed


def instrument(bundle: Any, precision: str, threads: int, hint: str) -> Any:
    """``precision``'s compiled model without the gate, for timing only (the benchmark's instrument)."""
    import openvino as ov
    from retinaedge.runtime.backends.openvino.compiled import OpenVinoBackend
    from retinaedge.runtime.backends.openvino.variants import int8_model

    path = bundle.model_path
    if precision == "int8":
        path, why = int8_model(bundle, "auto")
        if path is None:
            raise RuntimeError(why)
    return OpenVinoBackend(ov.Core(), path, precision=precision, threads=threads, hint=hint)


def reduced_alone(opened: list[tuple[dict[str, Any], Any]]) -> list[tuple[dict[str, Any], Any]]:
    """For each row served with an FP32 re-check (runtime/backends/openvino/recheck.py), a row timing its
    reduced precision alone (not served): what the re-check costs on these frames is the difference."""
    extra = []
    for row, timed in opened:
        fast = getattr(timed, "fast", None)
        if fast is not None and hasattr(timed, "reset_counts"):
            alone = {
                **row,
                "variant": "reduced-alone",
                "timed": "the reduced precision alone, without its fp32 ",
            }
            alone["timed"] += "re-check: timed, not served"
            extra.append((alone, fast))
    return extra


def run_precisions(spec: dict[str, Any]) -> dict[str, Any]:
    """The rows (see the module docstring)."""
    tensors = np.load(Path(spec["work_dir"]) / "tensors.npy")
    reason = None
    rows_wanted = list(ROWS)
    if importlib.util.find_spec("openvino") is None:
        reason = "openvino is not installed (pip install 'retinaedge[openvino]')"
        rows_wanted = [r for r in ROWS if r[0] != "openvino"]
    batch = max(spec["batch_sizes"])
    rounds = int(spec.get("precision_rounds", 8))
    n = len(tensors)
    with ExitStack() as stack:
        opened = [open_row(spec, *wanted, stack) for wanted in rows_wanted]
        opened += reduced_alone(opened)
        samples: list[dict[int, list[float]]] = [{1: [], batch: []} for _ in opened]
        for _row, timed in opened:  # warm-up
            timed.infer(tensors[:1])
            timed.infer(tensors[np.arange(batch) % n])
            if hasattr(timed, "reset_counts"):
                timed.reset_counts()  # the re-check's counts are the timed rounds
        for k in range(rounds):
            for (_row, timed), got in zip(opened, samples, strict=True):
                got[1].append(timed_ms_per_frame(timed.infer, tensors[[k % n]]))
                got[batch].append(
                    timed_ms_per_frame(timed.infer, tensors[np.arange(k * batch, (k + 1) * batch) % n])
                )
    rows = []
    for (row, _timed), got in zip(opened, samples, strict=True):
        row["ms_per_frame_batch1"] = round(statistics.median(got[1]), 3)
        row[f"ms_per_frame_batch{batch}"] = round(statistics.median(got[batch]), 3)
        row["rounds"] = rounds
        if hasattr(_timed, "reset_counts"):
            row["recheck"] = _timed.describe().get("recheck")
        rows.append(row)
        log.info(
            "precision row %s %s %s: %s ms/frame at batch 1",
            row["backend"],
            row["requested"],
            row["timed"],
            row["ms_per_frame_batch1"],
        )
    return {"rows": rows, "openvino_skipped": reason, "frames": int(n), "rounds": rounds}


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
