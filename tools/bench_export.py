"""Measure what export buys on the CPU: ONNX Runtime (NMS in the graph) against torchvision eager.

1. whole model: ``model.onnx`` in ONNX Runtime vs ``model(images)`` in PyTorch, same input tensors;
2. post-processing only: the in-graph post-processing (as its own ONNX model, on the same head outputs)
   vs torchvision's ``postprocess_detections``.

Usage (development tool, needs the export extra):
    .venv/bin/python tools/bench_export.py --arch retinanet_resnet50_fpn --input-size 512 --repeats 10
Prints one JSON object; both sides use the same thread count (torch.set_num_threads / intra_op threads).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_export")


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; milliseconds p50/p90/mean."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p90_ms": round(samples[min(len(samples) - 1, int(0.9 * len(samples)))], 3),
        "mean_ms": round(statistics.fmean(samples), 3),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="retinanet_resnet50_fpn")
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--input-size", default="512", help="N or HxW")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="0: the CPU affinity count")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import onnxruntime as ort
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import biased_retinanet
    from retinaedge.export import export_retinanet
    from retinaedge.export.assemble import postprocess_only
    from retinaedge.export.cli import parse_size
    from retinaedge.export.dense import OPSET, compute_anchors
    from retinaedge.export.reference import reference_model
    from retinaedge.export.synthetic import synthetic_images_u8, to_float
    from retinaedge.runtime.onnxrt import OnnxRuntimeBackend, affinity_threads

    threads = args.threads or affinity_threads()
    torch.set_num_threads(threads)
    height, width = parse_size(args.input_size)
    model = biased_retinanet(args.arch, args.num_classes)
    names = [f"class_{i}" for i in range(args.num_classes)]
    images = to_float(synthetic_images_u8(args.batch, 3, height, width, seed=7))

    with tempfile.TemporaryDirectory() as tmp:
        result = export_retinanet(
            model,
            Path(tmp) / "b",
            input_size=(height, width),
            class_names=names,
            architecture=args.arch,
            synthetic_count=2,
        )
        backend = OnnxRuntimeBackend(result.bundle_dir / "model.onnx", threads=threads)
        ref = reference_model(model, height, width)
        tensors = [torch.from_numpy(img) for img in images]

        def torch_eager() -> Any:
            with torch.no_grad():
                return ref(tensors)

        whole_ort = timed(lambda: backend.infer(images), args.warmup, args.repeats)
        whole_torch = timed(torch_eager, args.warmup, args.repeats)
        backend.close()

        # Post-processing alone, on the same head outputs.
        captured: dict[str, Any] = {}
        hook_h = ref.head.register_forward_hook(lambda m, i, o: captured.__setitem__("head", o))
        hook_a = ref.anchor_generator.register_forward_hook(
            lambda m, i, o: captured.update(anchors=o, sizes=i[0].image_sizes)
        )
        torch_eager()
        hook_h.remove()
        hook_a.remove()
        anchors, spec_anchors = compute_anchors(model, height, width)
        split = list(spec_anchors.anchors_per_level)
        head = captured["head"]
        split_head = {k: list(v.split(split, dim=1)) for k, v in head.items()}
        split_anchors = [list(a.split(split)) for a in captured["anchors"]]
        spec = result.manifest.postprocess

        def torch_post() -> Any:
            with torch.no_grad():
                return ref.postprocess_detections(split_head, split_anchors, captured["sizes"])

        post_model = postprocess_only(
            anchors, spec_anchors.anchors_per_level, args.num_classes, spec, (height, width), OPSET
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(post_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feeds = {"cls_logits": head["cls_logits"].numpy(), "bbox_regression": head["bbox_regression"].numpy()}
        post_ort = timed(lambda: sess.run(None, feeds), args.warmup * 3, args.repeats * 5)
        post_torch = timed(torch_post, args.warmup * 3, args.repeats * 5)
        detections = int(sum(len(d["scores"]) for d in torch_post()))

    report = {
        "arch": args.arch,
        "input": [args.batch, 3, height, width],
        "num_classes": args.num_classes,
        "threads": threads,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "detections_in_batch": detections,
        "whole_model": {
            "onnxruntime_fused_nms": whole_ort,
            "torchvision_eager": whole_torch,
            "speedup_p50": round(whole_torch["p50_ms"] / whole_ort["p50_ms"], 3),
        },
        "postprocess_only": {
            "onnx_in_graph": post_ort,
            "torchvision_postprocess_detections": post_torch,
            "speedup_p50": round(post_torch["p50_ms"] / post_ort["p50_ms"], 3),
        },
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
