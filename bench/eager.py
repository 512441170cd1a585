"""The torchvision eager baseline, timed: ``python -m retinaedge.bench.eager SPEC.json OUT.json``.

What people start from: the checkpoint loaded into torchvision's ``RetinaNet`` and called on each frame
(``model([image])``: torchvision's transform, backbone, heads, anchors and ``postprocess_detections``),
under ``torch.inference_mode`` with ``torch.set_num_threads(threads)``. The frames are the benchmark's
exact preprocessed inputs (``tensors.npy`` ``(F, C, H, W)`` float32 in 0..1; one channel is repeated to
three as the exported graph does). The transform is set so its resize keeps the export size (scale 1).

The spec (JSON) carries ``checkpoint``, ``architecture``, ``num_classes``, ``anchor_sizes``,
``aspect_ratios``, ``threads``, ``warmup`` and ``work_dir``; the result has per-frame times in ms,
detections per frame, the torch/torchvision versions and the peak RSS in bytes. Started by
``retinaedge benchmark`` as its own process; needs the ``export`` extra (torch and the checkpoint loader of
:mod:`retinaedge.export.torchload` are imported when it runs, not when this module is imported).
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.runtime.progress import Progress

log = logging.getLogger(__name__)


def run_eager(spec: dict[str, Any]) -> dict[str, Any]:
    """Time ``model([frame])`` for every frame in ``tensors.npy``; see the module docstring."""
    # The torchvision model comes from the export package, imported here only: in this process, never
    # when the benchmark (service -> runtime, device) imports its modules.
    from retinaedge.export.reference import reference_model
    from retinaedge.export.torchload import load_state_dict_checkpoint, require_torch

    torch, torchvision = require_torch()
    threads = int(spec["threads"])
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)  # as ONNX Runtime's inter_op_num_threads
    tensors = np.load(Path(spec["work_dir"]) / "tensors.npy")  # (F, C, H, W)
    _, _, height, width = tensors.shape
    model = load_state_dict_checkpoint(
        spec["checkpoint"],
        spec["architecture"],
        int(spec["num_classes"]),
        anchor_sizes=spec.get("anchor_sizes"),
        aspect_ratios=spec.get("aspect_ratios"),
    )
    ref = reference_model(model, height, width)
    frames = [torch.from_numpy(np.ascontiguousarray(t)).expand(3, height, width) for t in tensors]

    def detect(frame: Any) -> Any:
        with torch.inference_mode():
            return ref([frame])[0]

    for frame in frames[: int(spec["warmup"])]:
        detect(frame)
    times, counts = [], []
    with Progress("torchvision eager", len(frames)) as bar:
        for frame in frames:
            t = time.perf_counter()
            out = detect(frame)
            times.append((time.perf_counter() - t) * 1e3)
            counts.append(int(out["scores"].shape[0]))
            bar.update()
    return {
        "inference_ms": times,
        "detections_per_frame": counts,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }


def main(argv: list[str] | None = None) -> int:
    """``SPEC.json OUT.json``: run the baseline and write its result (with the peak RSS in bytes)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.stderr.write("usage: python -m retinaedge.bench.eager SPEC.json OUT.json\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    spec = json.loads(Path(args[0]).read_text())
    result = run_eager(spec)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(args[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
