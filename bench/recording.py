"""The simulated accelerator's first pass: ``model.onnx`` on every frame the accelerator phase will send.

``python -m retinaedge.bench.recording SPEC OUT`` (started by :func:`~.processes.run_process`, so ONNX
Runtime runs in a process of its own) opens the ONNX Runtime backend, wraps it in :class:`Recorder` and
runs a :class:`~retinaedge.runtime.detector.Detector` over each distinct file of the spec, with the batch
size ``retinaedge detect`` uses by default: the same code path as ``detect``. Every frame's outputs go to
``table.npz`` (:func:`~.accelerator.save_table`), keyed by :func:`~.accelerator.frame_key`; every file's
result (what ``/v1/detect`` returns) to the JSON result, the reference the service's answers must equal.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.bench.accelerator import OUTPUTS, Table, frame_key, save_table
from retinaedge.runtime.backends import Backend, BackendOptions, open_backend

log = logging.getLogger(__name__)

#: ``retinaedge detect``'s default ``--batch-size``.
DETECT_BATCH_SIZE = 4


class Recorder(Backend):
    """Runs the inner backend and keeps each frame's outputs under its key."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.providers = tuple(inner.providers)
        self.table: Table = {}
        self.collisions = 0

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self.inner.infer(images)
        for i, img in enumerate(images):
            key = frame_key(img)
            row = {name: np.array(out[name][i], copy=True) for name in OUTPUTS}
            old = self.table.get(key)
            if old is not None and any(not np.array_equal(old[n], row[n]) for n in OUTPUTS):
                self.collisions += 1  # two frames, one key, different outputs: the table cannot tell them
            self.table[key] = row
        return dict(out)

    def close(self) -> None:
        self.inner.close()


def record(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run the first pass; returns the table path, each file's result and the counts."""
    from retinaedge.runtime.bundle import load_bundle
    from retinaedge.runtime.detector import Detector

    bundle = load_bundle(Path(spec["model"]))
    backend = open_backend("onnxruntime", bundle, BackendOptions(threads=int(spec["threads"])))
    recorder = Recorder(backend)
    results: dict[str, Any] = {}
    with Detector(bundle, recorder, batch_size=DETECT_BATCH_SIZE) as detector:
        for path in dict.fromkeys(str(p) for p, _ in spec["instances"]):
            results[path] = detector.detect(Path(path)).to_json()
    table_path = work / "accelerator-table.npz"
    save_table(recorder.table, table_path)
    return {
        "table": str(table_path),
        "frames": len(recorder.table),
        "collisions": recorder.collisions,
        "results": results,
        "batch_size": DETECT_BATCH_SIZE,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    spec = json.loads(Path(args[0]).read_text())
    out = record(spec, Path(spec["work_dir"]))
    Path(args[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
