"""``retinaedge export-triton --model DIR --out REPO``: a Triton Inference Server model repository.

Writes ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/1/`` (:mod:`.repo`) and prints one JSON object
(paths, platform, model sha256, batching). The appliance then serves with ``backend=triton``
(``RETINAEDGE_TRITON_URL``, ``RETINAEDGE_TRITON_MODEL``=NAME) and checks at start that Triton serves this
very bundle. See docs/triton.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retinaedge.export.triton.config import PLATFORMS


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"wants comma-separated batch sizes (e.g. 4,8), got {text!r}"
        ) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model bundle directory")
    p.add_argument("--out", type=Path, required=True, help="model repository directory (created)")
    p.add_argument("--name", help="Triton model name (default: the manifest's name)")
    p.add_argument(
        "--max-batch", type=int, default=8, help="max_batch_size: frames per execution (default 8)"
    )
    p.add_argument(
        "--instances", type=int, default=1, help="model instances (instance_group count; default 1)"
    )
    p.add_argument(
        "--platform",
        choices=sorted(PLATFORMS),
        default="onnxruntime",
        help="onnxruntime (default): Triton's ONNX Runtime backend on model.onnx; tensorrt: engines from "
        "--engine-cache, one per GPU compute capability; python: the CPU-only variant, ONNX Runtime inside "
        "Triton's python backend (a Triton with the python backend only, e.g. nvidia-pytriton's)",
    )
    p.add_argument(
        "--kind",
        choices=["gpu", "cpu"],
        help="instance kind (default gpu; python: cpu). onnxruntime on a CPU-only server: --kind cpu",
    )
    p.add_argument(
        "--preferred-batch",
        type=_sizes,
        default=(),
        metavar="B,B",
        help="dynamic batcher's preferred batch sizes (default: half of --max-batch and --max-batch)",
    )
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=2000,
        help="how long the dynamic batcher may hold a request to fill a batch, in microseconds (default 2000)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="python platform: ONNX Runtime threads per instance (0: its default)",
    )
    p.add_argument(
        "--engine-cache", type=Path, help="tensorrt platform: the engine cache retinaedge build wrote into"
    )
    p.add_argument("--replace", action="store_true", help="overwrite REPO/NAME if it exists")


def run(args: argparse.Namespace) -> int:
    from retinaedge.export.triton.repo import ExportRequest, export_repository
    from retinaedge.runtime.jsonout import emit

    report = export_repository(
        ExportRequest(
            model=args.model,
            out=args.out,
            name=args.name,
            max_batch=args.max_batch,
            instances=args.instances,
            platform=args.platform,
            kind=args.kind,
            preferred=args.preferred_batch,
            queue_delay_us=args.max_queue_delay_us,
            threads=args.threads,
            engine_cache=args.engine_cache,
            replace=args.replace,
        )
    )
    emit(report)
    return 0
