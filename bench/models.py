"""Benchmark configurations: the model sizes users bring, exported reproducibly when no checkpoint is given.

``python -m retinaedge.bench.models NAME --cache DIR [--checkpoint FILE]`` prints the bundle
directory on stdout (one line); ``retinaedge benchmark --config NAME`` runs it in its own process (torch
stays out of the benchmark's process) and benchmarks that bundle.

Without ``--checkpoint`` the weights are random but reproducible: ``torch.manual_seed(seed)`` before the
torchvision model is built, then the classification head's last convolution drawn again with a small
weight spread and a negative bias (sigmoid(-2) = 0.12 > the 0.05 score threshold), so nearly every
anchor and class is a candidate: the per-level top-k, the decoding and the class-wise NMS all have real
work, as with a trained model on a busy image. The checkpoint is saved beside the bundle
(``<cache>/<NAME>/<NAME>.pt``, a ``state_dict``) with its sha256 in the manifest's ``source``, as a real
export records it, so the torchvision eager baseline finds it.

The cache (``<cache>/<NAME>/``) is reused while ``config.json`` there equals what this run would write
(the configuration, the checkpoint's sha256 when one is given, the torch/torchvision/retinaedge versions)
and the bundle loads; otherwise it is exported again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaedge.runtime.errors import ConfigError, RetinaEdgeError

log = logging.getLogger(__name__)

BUNDLE_DIR = "bundle"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class BenchModel:
    """A benchmark model: torchvision layout, input size (pixels), classes and the random-weight recipe."""

    architecture: str
    input_size: int
    num_classes: int
    channels: int = 1  # grey DICOM frames, replicated to 3 channels in the graph
    window: str = "minmax"
    seed: int = 0
    cls_weight_std: float = 0.05
    cls_bias: float = -2.0
    description: str = ""


CONFIGS: dict[str, BenchModel] = {
    "r50-fpn-512": BenchModel(
        architecture="retinanet_resnet50_fpn",
        input_size=512,
        num_classes=3,
        description="torchvision RetinaNet ResNet-50-FPN (v1 layout, 5 levels, 9 anchors per location), "
        "512 x 512, 3 classes, random weights with a classification bias of -2",
    ),
}


def config(name: str) -> BenchModel:
    """The configuration called ``name`` (:class:`ConfigError` naming the known ones otherwise)."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown benchmark configuration {name!r}; choose one of {sorted(CONFIGS)}")
    return CONFIGS[name]


def random_model(cfg: BenchModel) -> Any:
    """The seeded random-weight RetinaNet of ``cfg`` (BatchNorm2d in the body: eval-mode statistics 0/1)."""
    from retinaedge.export.torchload import build_retinanet, require_torch

    torch, _ = require_torch()
    torch.manual_seed(cfg.seed)
    model = build_retinanet(cfg.architecture, cfg.num_classes, frozen_bn=False)
    with torch.no_grad():
        cls = model.head.classification_head.cls_logits
        cls.weight.normal_(0.0, cfg.cls_weight_std)
        cls.bias.fill_(cfg.cls_bias)
    return model.eval()


def checkpoint_classes(path: Path, cfg: BenchModel) -> int:
    """Classes of a state_dict checkpoint for ``cfg``'s layout, from its classification head's shape."""
    from retinaedge.export.torchload import require_torch

    torch, _ = require_torch()
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
    key = "head.classification_head.cls_logits.weight"
    if not isinstance(state, dict) or key not in state:
        raise ConfigError(f"{path.name} has no {key}: not a {cfg.architecture} state_dict")
    per_location = 9  # 3 sizes x 3 aspect ratios, torchvision's RetinaNet anchors
    return int(state[key].shape[0]) // per_location


def wanted_config(name: str, cfg: BenchModel, checkpoint: Path | None) -> dict[str, Any]:
    """What ``config.json`` records: the recipe, the checkpoint's sha256 (when given) and the versions."""
    from importlib.metadata import version

    from retinaedge.runtime.hashing import sha256_file

    return {
        "name": name,
        "config": dataclasses.asdict(cfg),
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
        "versions": {d: version(d) for d in ("retinaedge", "torch", "torchvision", "onnx")},
    }


def cached_bundle(folder: Path, wanted: dict[str, Any]) -> Path | None:
    """The bundle in ``folder`` when its ``config.json`` equals ``wanted`` and it loads, else None."""
    from retinaedge.runtime.bundle import load_bundle

    try:
        recorded = json.loads((folder / CONFIG_FILE).read_text())
        if recorded != wanted:
            return None
        load_bundle(folder / BUNDLE_DIR)
    except (OSError, ValueError, RetinaEdgeError):
        return None
    return folder / BUNDLE_DIR


def ensure_bundle(name: str, cache: Path, checkpoint: Path | None = None) -> Path:
    """The bundle of configuration ``name`` under ``cache``, exported first when not cached."""
    from retinaedge.export.exporter import export_retinanet
    from retinaedge.export.torchload import checkpoint_source, load_state_dict_checkpoint, require_torch
    from retinaedge.runtime.manifest import WindowPolicy

    cfg = config(name)
    if checkpoint is not None and not checkpoint.is_file():
        raise ConfigError(f"--checkpoint {checkpoint} does not exist")
    folder = cache.resolve() / name
    wanted = wanted_config(name, cfg, checkpoint)
    found = cached_bundle(folder, wanted)
    if found is not None:
        log.info("benchmark model %s: cached in %s", name, found)
        return found
    torch, _ = require_torch()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if checkpoint is None:
        model = random_model(cfg)
        checkpoint = folder / f"{name}.pt"
        torch.save(model.state_dict(), checkpoint)
        classes = cfg.num_classes
        kind = f"state_dict (random weights, seed {cfg.seed}, classification bias {cfg.cls_bias:g})"
    else:
        classes = checkpoint_classes(checkpoint, cfg)
        model = load_state_dict_checkpoint(checkpoint, cfg.architecture, classes)
        shutil.copy2(checkpoint, folder / checkpoint.name)  # beside the bundle, for the eager baseline
        checkpoint = folder / checkpoint.name
        kind = "state_dict"
    source = checkpoint_source(checkpoint, "state_dict") | {"recipe": kind}
    log.info("benchmark model %s: exporting %s to %s (takes minutes)", name, cfg.architecture, folder)
    export_retinanet(
        model,
        folder / BUNDLE_DIR,
        input_size=(cfg.input_size, cfg.input_size),
        class_names=[f"class_{i}" for i in range(classes)],
        name=f"bench-{name}",
        architecture=cfg.architecture,
        channels=cfg.channels,
        window=WindowPolicy(policy=cfg.window),
        source=source,
    )
    (folder / CONFIG_FILE).write_text(json.dumps(wanted, indent=2) + "\n")
    return folder / BUNDLE_DIR


def main(argv: list[str] | None = None) -> int:
    """``NAME --cache DIR [--checkpoint FILE]``: print the bundle directory (exported when not cached)."""
    p = argparse.ArgumentParser(prog="python -m retinaedge.bench.models", description=__doc__)
    p.add_argument("name", help=f"one of {sorted(CONFIGS)}")
    p.add_argument("--cache", type=Path, required=True, help="cache directory")
    p.add_argument("--checkpoint", type=Path, help="a state_dict of the configuration's layout")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("onnxscript", "onnx_ir", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        bundle = ensure_bundle(args.name, args.cache, args.checkpoint)
    except RetinaEdgeError as exc:
        log.error("%s", exc)
        return 2
    sys.stdout.write(f"{bundle}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
