"""The ``retinaedge`` command: one entry point, one module per verb.

Each verb module (``<verb>_cli.py`` in the package that owns the verb) provides
``add_arguments(parser)`` and ``run(args) -> int``. The table below names them by dotted path; only the
module of the verb being run is imported (``retinaedge --help`` imports none, ``retinaedge detect``
never imports torch or the service).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Iterable, Sequence

from retinaedge.runtime import __version__, logsafety
from retinaedge.runtime.errors import ConfigError, RetinaEdgeError
from retinaedge.runtime.jsonout import emit

log = logging.getLogger("retinaedge")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "export": (
        "retinaedge.export.export_cli",
        "torchvision RetinaNet checkpoint -> model bundle (ONNX, NMS fused)",
    ),
    "export-triton": (
        "retinaedge.export.triton.export_triton_cli",
        "model bundle -> Triton Inference Server model repository (config.pbtxt, model or engines)",
    ),
    "build": (
        "retinaedge.runtime.backends.tensorrt.build_cli",
        "model bundle -> TensorRT engine for this device, validated and cached",
    ),
    "quantize": (
        "retinaedge.export.quantize_cli",
        "model bundle -> Q/DQ INT8 model calibrated on DICOM files (ONNX Runtime and TensorRT)",
    ),
    "detect": ("retinaedge.runtime.detect_cli", "DICOM files -> detections, one JSON line per file"),
    "route": (
        "retinaedge.runtime.route_cli",
        "which models' intended use takes each DICOM file (header only, no server)",
    ),
    "keygen": ("retinaedge.runtime.keygen_cli", "a new Ed25519 key pair for signing model bundles"),
    "sign": ("retinaedge.runtime.sign_cli", "sign a model bundle (signature.json) with an Ed25519 key"),
    "intended-use": (
        "retinaedge.runtime.intended_use_cli",
        "show or set the images a bundle's model is made for (its intended_use section)",
    ),
    "eval": ("retinaedge.runtime.eval_cli", "COCO average precision of a bundle on annotated DICOM files"),
    "serve": ("retinaedge.service.serve_cli", "local HTTP service: POST DICOM, get detections"),
    "models": (
        "retinaedge.service.models_cli",
        "a running appliance's models: versions, staging, activation, rollback, silent trial",
    ),
    "boot": (
        "retinaedge.service.boot_cli",
        "container entrypoint: validate the configuration, find or build the engine, serve",
    ),
    "device": (
        "retinaedge.device.device_cli",
        "what hardware, power mode and versions this runs on (JSON or --table)",
    ),
    "benchmark": (
        "retinaedge.bench.benchmark_cli",
        "per-stage latency, baselines, HTTP overhead, throughput, memory, energy -> report.json/.md/.png",
    ),
}


def build_parser(verbs: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; the arguments of ``verbs`` only (None: every verb's), the others listed
    with their one-line help. Imports the module of each verb whose arguments it adds."""
    parser = argparse.ArgumentParser(
        prog="retinaedge",
        description="Edge inference appliance for RetinaNet detectors on medical images.",
    )
    parser.add_argument("--version", action="version", version=f"retinaedge {__version__}")
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="default INFO; serve and boot take RETINAEDGE_LOG_LEVEL (the log_level setting) when not given",
    )
    wanted = set(VERBS) if verbs is None else set(verbs)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (module, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if verb in wanted:
            importlib.import_module(module).add_arguments(p)
    return parser


def chosen_verb(argv: Sequence[str]) -> str | None:
    """The verb in ``argv`` (the first word that is not an option or ``--log-level``'s value), if known."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--log-level":
            skip = True
        elif not arg.startswith("-"):
            return arg if arg in VERBS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = chosen_verb(argv)
    parser = build_parser([verb] if verb is not None else [])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level or "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logsafety.install()
    for noisy in ("onnxscript", "onnx_ir", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args))
    except RetinaEdgeError as exc:
        log.error("%s", exc)
        emit({"error": exc.to_dict()})
        return 2 if isinstance(exc, ConfigError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
