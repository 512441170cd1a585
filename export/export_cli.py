"""``retinaedge export``: a checkpoint plus its architecture -> a model bundle."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from retinaedge.export.torchload import ARCHITECTURES
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.intended_use_cli import read_intended_use
from retinaedge.runtime.manifest import ClassCode, WindowPolicy, class_codes_from_dict
from retinaedge.runtime.operating_point import OperatingPoint

log = logging.getLogger(__name__)


def parse_size(text: str) -> tuple[int, int]:
    """``512`` or ``480x640`` (height x width) -> (height, width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"input size must be N or HxW, got {text!r}") from exc
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"input size must be N or HxW, got {text!r}")


def parse_groups(text: str) -> tuple[tuple[float, ...], ...]:
    """``"32,40,50;64,80,101"`` -> ((32, 40, 50), (64, 80, 101)); one group per FPN level."""
    try:
        return tuple(tuple(float(v) for v in g.split(",") if v.strip()) for g in text.split(";") if g.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers like '32,40,50;64,80,101', got {text!r}") from exc


def parse_window(text: str) -> WindowPolicy:
    """``file``, ``minmax`` or ``fixed:CENTER,WIDTH`` -> :class:`WindowPolicy`."""
    if text in ("file", "minmax"):
        return WindowPolicy(policy=text)
    if text.startswith("fixed:"):
        try:
            center, width = (float(v) for v in text[len("fixed:") :].split(","))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"fixed window must be fixed:CENTER,WIDTH, got {text!r}"
            ) from exc
        return WindowPolicy(policy="fixed", center=center, width=width)
    raise argparse.ArgumentTypeError(f"window must be file, minmax or fixed:CENTER,WIDTH, got {text!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint", type=Path, help="state_dict checkpoint (.pth), or a pickled model with --pickled-model"
    )
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), help="architecture the state_dict belongs to")
    p.add_argument(
        "--pickled-model",
        action="store_true",
        help="CHECKPOINT is a whole pickled RetinaNet; unpickling runs code from the file, "
        "so only use files you trust",
    )
    p.add_argument(
        "--input-size", type=parse_size, required=True, help="model input, N or HxW (multiples of 32)"
    )
    p.add_argument("--class-names", help="comma-separated class names, index = torchvision label")
    p.add_argument("--num-classes", type=int, help="number of classes (names default to class_0...)")
    p.add_argument("--anchor-sizes", type=parse_groups, help="customised anchor sizes, 'a,b,c;...' per level")
    p.add_argument(
        "--aspect-ratios", type=parse_groups, help="customised aspect ratios, one group or one per level"
    )
    p.add_argument("--score-thresh", type=float, help="score threshold (default: the model's, 0.05)")
    p.add_argument("--nms-iou", type=float, help="class-wise NMS IoU threshold (default: the model's, 0.5)")
    p.add_argument("--topk-candidates", type=int, help="top-k candidates per FPN level (default 1000)")
    p.add_argument("--detections-per-img", type=int, help="K, detections per image (default 300)")
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=3,
        help="graph input channels; 1 replicates a grey frame inside the graph",
    )
    p.add_argument(
        "--window",
        type=parse_window,
        default=WindowPolicy(),
        help="windowing policy for DICOM frames: file, minmax or fixed:CENTER,WIDTH (default file)",
    )
    p.add_argument("--name", help="model name recorded in the manifest")
    p.add_argument(
        "--operating-point",
        type=Path,
        metavar="FILE",
        help='JSON {"score_thresholds": {class: threshold 0..1, ...}, "method": "how they were chosen"}: '
        "the score per class at which the model is read (documents show detections at or above it; "
        "default none: every detection; retinaedge eval --choose-operating-point can set it later)",
    )
    p.add_argument(
        "--class-codes",
        type=Path,
        metavar="FILE",
        help='JSON {class: {"value": "...", "scheme": "SCT|RADLEX|DCM", "meaning": "..."}}: the standard code '
        "result documents name each class by (a class without one gets the private scheme 99RETINAEDGE)",
    )
    p.add_argument(
        "--intended-use",
        type=Path,
        metavar="FILE",
        help="JSON of the images the model is made for (modalities, SOP classes, image types, body parts, "
        "orientation, ...; docs/models.md); default none: every image",
    )
    p.add_argument(
        "--trt-plugin",
        action="store_true",
        help="also write the EfficientNMS_TRT variant (TensorRT before the built-in NMS layer)",
    )
    p.add_argument("--synthetic", type=int, default=4, help="synthetic parity images (default 4)")
    p.add_argument(
        "--parity-dicom",
        type=Path,
        nargs="+",
        default=[],
        help="DICOM files (or directories: every DICOM Part 10 file below, sorted) whose frames, preprocessed exactly as the runtime does, "
        "are added to the parity check",
    )
    p.add_argument(
        "--parity-max-frames",
        type=int,
        default=16,
        help="at most this many DICOM frames in the parity check (default 16)",
    )
    p.add_argument(
        "--parity-threshold",
        type=float,
        default=0.995,
        help="minimum fraction of PyTorch detections matched (default 0.995)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def _class_names(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    if names is not None and any(not n for n in names):
        raise ConfigError(f"--class-names contains an empty name: {args.class_names!r}")
    if names is None and args.num_classes is None:
        raise ConfigError("give --class-names or --num-classes")
    if names is not None and args.num_classes is not None and len(names) != args.num_classes:
        raise ConfigError(f"--num-classes {args.num_classes} but {len(names)} --class-names")
    return names if names is not None else [f"class_{i}" for i in range(args.num_classes)]


def _dicom_parity_inputs(args: argparse.Namespace) -> list[Any]:
    """Frames of ``--parity-dicom`` files through the runtime's preprocessing, for the export's policy."""
    from retinaedge.export.parity import ParityInput
    from retinaedge.runtime.discovery import dicom_files
    from retinaedge.runtime.frames import model_inputs
    from retinaedge.runtime.manifest import InputSpec, Preprocessing

    inputs: list[ParityInput] = []
    pre = Preprocessing(window=args.window)
    inp = InputSpec(height=args.input_size[0], width=args.input_size[1], channels=args.channels)
    for number, path in enumerate(dicom_files(args.parity_dicom)):
        for index, image, _ in model_inputs(path, pre, inp):
            if len(inputs) >= args.parity_max_frames:
                return inputs
            inputs.append(ParityInput(image, f"dicom:{number}:{path.name}#{index}"))
    if args.parity_dicom and not inputs:
        raise ConfigError("--parity-dicom gave no usable frames")
    return inputs


def _operating_point(path: Path | None) -> OperatingPoint | None:
    """The ``--operating-point`` file, read and checked (ConfigError naming the file)."""
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--operating-point {path}: {exc}") from exc
    try:
        return OperatingPoint.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"--operating-point {path}: {exc}") from exc


def _class_codes(path: Path | None) -> dict[str, ClassCode]:
    """The ``--class-codes`` file, read and checked (ConfigError naming the file)."""
    if path is None:
        return {}
    try:
        codes = class_codes_from_dict(json.loads(path.read_text()))
        for name, code in codes.items():
            code.validate(name)
    except (OSError, ValueError, ConfigError) as exc:
        raise ConfigError(f"--class-codes {path}: {exc}") from exc
    return codes


def run(args: argparse.Namespace) -> int:
    from retinaedge.export.exporter import export_retinanet
    from retinaedge.export.torchload import checkpoint_source, load_pickled_model, load_state_dict_checkpoint
    from retinaedge.runtime.jsonout import emit

    names = _class_names(args)
    codes = _class_codes(args.class_codes)  # a malformed file: refused before the checkpoint is read
    point = _operating_point(args.operating_point)
    use = read_intended_use(args.intended_use, "--intended-use") if args.intended_use else None
    if args.pickled_model:
        if args.anchor_sizes or args.aspect_ratios:
            raise ConfigError(
                "--anchor-sizes/--aspect-ratios apply to state_dict checkpoints; a pickled "
                "model carries its own anchor generator"
            )
        model = load_pickled_model(args.checkpoint)
        source = checkpoint_source(args.checkpoint, "pickled-model")
        arch = args.arch or "torchvision.RetinaNet (pickled)"
    else:
        if not args.arch:
            raise ConfigError("--arch is required for a state_dict checkpoint")
        model = load_state_dict_checkpoint(
            args.checkpoint,
            args.arch,
            len(names),
            anchor_sizes=args.anchor_sizes,
            aspect_ratios=args.aspect_ratios,
        )
        source = checkpoint_source(args.checkpoint, "state_dict")
        arch = args.arch
    parity_inputs = _dicom_parity_inputs(args)
    result = export_retinanet(
        model,
        args.out,
        input_size=args.input_size,
        class_names=names,
        name=args.name,
        architecture=arch,
        channels=args.channels,
        window=args.window,
        score_thresh=args.score_thresh,
        nms_iou=args.nms_iou,
        topk_candidates=args.topk_candidates,
        detections_per_img=args.detections_per_img,
        plugin_variant=args.trt_plugin,
        synthetic_count=args.synthetic,
        parity_inputs=parity_inputs,
        parity_threshold=args.parity_threshold,
        source=source,
        overwrite=args.force,
        operating_point=point,
        class_codes=codes,
        intended_use=use,
    )
    emit(
        {
            "bundle": str(result.bundle_dir),
            "model_sha256": result.manifest.model_sha256,
            "parity": result.parity["totals"],
            "batch_consistency": result.parity["batch_consistency"]["min_match_rate"],
            "passed": result.parity["passed"],
        }
    )
    return 0
