"""Import torch lazily, build torchvision RetinaNets by architecture name and load checkpoints.

torch and torchvision are the ``export`` extra: nothing else in retinaedge imports them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaedge.runtime.errors import (
    CheckpointMismatchError,
    ConfigError,
    ExportError,
    MissingDependencyError,
)
from retinaedge.runtime.hashing import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """A RetinaNet layout: ResNet ``depth``, which ResNet stages feed the FPN, FPN width, v2 or not.

    The FPN has ``len(returned_layers) + 2`` levels (P6/P7 added on top). The v2 layout is
    retinanet_resnet50_fpn_v2: P6/P7 from C5 (2048 channels) and GroupNorm(32) in the heads.
    """

    depth: str
    v2: bool = False
    returned_layers: tuple[int, ...] = (2, 3, 4)
    fpn_channels: int = 256
    anchor_base: tuple[int, ...] = (32, 64, 128, 256, 512)

    @property
    def levels(self) -> int:
        return len(self.returned_layers) + 2


ARCHITECTURES: dict[str, ArchSpec] = {
    "retinanet_resnet50_fpn": ArchSpec("resnet50"),
    "retinanet_resnet50_fpn_v2": ArchSpec("resnet50", v2=True),
    "resnet18_fpn": ArchSpec("resnet18"),
    "resnet34_fpn": ArchSpec("resnet34"),
    "resnet50_fpn": ArchSpec("resnet50"),
    "resnet101_fpn": ArchSpec("resnet101"),
    # Compact (about 3.9 M parameters): ResNet-18 up to C4, a 96-channel FPN, 4 levels at strides
    # 8-64 with anchors from 8 px.
    "resnet18_c4_fpn96": ArchSpec(
        "resnet18", returned_layers=(2, 3), fpn_channels=96, anchor_base=(8, 16, 32, 64)
    ),
    # Compact for CPUs: MobileNetV3-Large features at strides 8, 16, 32 (blocks 6, 12, 16), a 64-channel
    # FPN, 5 levels at strides 8-128 with anchors from 8 px. The demo model's layout (models/demo).
    "mobilenet_v3_fpn64": ArchSpec(
        "mobilenet_v3_large", returned_layers=(6, 12, 16), fpn_channels=64, anchor_base=(8, 16, 32, 64, 128)
    ),
}


def require_torch() -> tuple[Any, Any]:
    """Return ``(torch, torchvision)`` or raise :class:`MissingDependencyError` naming the extra."""
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("torch", "export", "Exporting a RetinaNet") from exc
    try:
        import torchvision
    except ImportError as exc:
        raise MissingDependencyError("torchvision", "export", "Exporting a RetinaNet") from exc
    return torch, torchvision


def default_anchor_params(
    base: Sequence[int] = (32, 64, 128, 256, 512),
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]]:
    """torchvision's RetinaNet anchors: 3 sizes per octave per level from ``base``, aspect ratios 0.5, 1, 2."""
    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in base)
    return sizes, ((0.5, 1.0, 2.0),) * len(sizes)


def build_retinanet(
    architecture: str,
    num_classes: int,
    *,
    anchor_sizes: Sequence[Sequence[float]] | None = None,
    aspect_ratios: Sequence[Sequence[float]] | None = None,
    frozen_bn: bool = True,
) -> Any:
    """An untrained ``torchvision.models.detection.RetinaNet`` laid out like torchvision's builders.

    ``frozen_bn`` selects ``FrozenBatchNorm2d`` (what torchvision uses when training from a pretrained
    backbone) or ``BatchNorm2d`` (training from scratch, and always for v2) in the ResNet body.
    """
    torch, torchvision = require_torch()
    from functools import partial

    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
    from torchvision.ops import misc as misc_ops
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if architecture not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    arch = ARCHITECTURES[architecture]
    depth, v2 = arch.depth, arch.v2
    default_sizes, default_ratios = default_anchor_params(arch.anchor_base)
    sizes = tuple(tuple(s) for s in (anchor_sizes or default_sizes))
    ratios = tuple(tuple(r) for r in (aspect_ratios or default_ratios))
    if len(ratios) == 1 and len(sizes) > 1:
        ratios = ratios * len(sizes)
    if len(sizes) != arch.levels or len(ratios) != arch.levels:
        raise ConfigError(
            f"{architecture} has {arch.levels} FPN levels: got {len(sizes)} anchor size groups and "
            f"{len(ratios)} aspect-ratio groups"
        )
    per_loc = {len(s) * len(r) for s, r in zip(sizes, ratios, strict=True)}
    if len(per_loc) != 1:
        raise ConfigError(
            "every level must have the same number of anchors per location (sizes x ratios); "
            f"got {sorted(per_loc)}"
        )
    anchor_gen = AnchorGenerator(sizes, ratios)
    norm = misc_ops.FrozenBatchNorm2d if frozen_bn else torch.nn.BatchNorm2d
    width = arch.fpn_channels
    extra = LastLevelP6P7(2048, width) if v2 else LastLevelP6P7(width, width)
    backbone = _resnet_fpn(torchvision, depth, norm, list(arch.returned_layers), extra, width)
    head = None
    if v2:
        head = RetinaNetHead(
            backbone.out_channels,
            anchor_gen.num_anchors_per_location()[0],
            num_classes,
            norm_layer=partial(torch.nn.GroupNorm, 32),
        )
        head.regression_head._loss_type = "giou"
    else:
        head = RetinaNetHead(backbone.out_channels, anchor_gen.num_anchors_per_location()[0], num_classes)
    return RetinaNet(backbone, num_classes, anchor_generator=anchor_gen, head=head).eval()


def _resnet_fpn(torchvision: Any, depth: str, norm: Any, returned: list[int], extra: Any, width: int) -> Any:
    """torchvision's ResNet+FPN feature extractor as ``resnet_fpn_backbone`` builds it (same module
    names), all layers trainable, no pretrained weights, any FPN ``width``."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    if depth.startswith("mobilenet"):
        features = getattr(torchvision.models, depth)(weights=None, norm_layer=norm).features
        return BackboneWithFPN(
            features,
            return_layers={str(k): str(v) for v, k in enumerate(returned)},
            in_channels_list=[_out_channels(features[k]) for k in returned],
            out_channels=width,
            extra_blocks=extra,
        )
    body = getattr(torchvision.models, depth)(weights=None, norm_layer=norm)
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(v) for v, k in enumerate(returned)},
        in_channels_list=[(body.inplanes // 8) * 2 ** (k - 1) for k in returned],
        out_channels=width,
        extra_blocks=extra,
    )


def _out_channels(block: Any) -> int:
    """Output channels of a torchvision feature block (its last convolution's)."""
    convs = [m for m in block.modules() if hasattr(m, "out_channels")]
    return int(convs[-1].out_channels)


def _extract_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    """A raw state_dict, or the ``model``/``state_dict`` entry of a training-script checkpoint."""
    torch, _ = require_torch()
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    else:
        raise CheckpointMismatchError(
            f"{path.name}: not a state_dict (expected a dict of tensors, or a checkpoint dict with a "
            "'model' or 'state_dict' entry as torchvision's training scripts save it)"
        )
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _summarise(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_checkpoint(
    path: str | Path,
    architecture: str,
    num_classes: int,
    *,
    anchor_sizes: Sequence[Sequence[float]] | None = None,
    aspect_ratios: Sequence[Sequence[float]] | None = None,
) -> Any:
    """Build ``architecture`` and load a state_dict checkpoint into it (``weights_only=True``).

    Raises :class:`CheckpointMismatchError` naming missing, unexpected and wrongly shaped keys.
    """
    torch, _ = require_torch()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable/unsafe files
        raise CheckpointMismatchError(
            f"{path.name}: cannot be read as a weights-only checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). A whole pickled model needs --pickled-model."
        ) from exc
    state = _extract_state_dict(obj, path)
    frozen = not any(k.endswith("num_batches_tracked") for k in state if k.startswith("backbone.body."))
    model = build_retinanet(
        architecture, num_classes, anchor_sizes=anchor_sizes, aspect_ratios=aspect_ratios, frozen_bn=frozen
    )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        parts = [f"{path.name} does not fit {architecture} with {num_classes} classes:"]
        if wrong:
            parts.append(f"shape mismatch: {_summarise(wrong)}")
        if missing:
            parts.append(f"missing keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summarise(unexpected)}")
        raise CheckpointMismatchError("; ".join(parts))
    model.load_state_dict(state, strict=True)
    log.info("loaded state_dict %s (%d tensors) into %s", path.name, len(state), architecture)
    return model.eval()


def load_pickled_model(path: str | Path) -> Any:
    """Unpickle a whole model (runs code from the file: only behind an explicit option)."""
    torch, _ = require_torch()
    from torchvision.models.detection.retinanet import RetinaNet

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ExportError(f"{path.name}: cannot be unpickled ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, RetinaNet):
        raise CheckpointMismatchError(
            f"{path.name}: the pickled object is a {type(obj).__name__}, not a "
            "torchvision.models.detection.RetinaNet"
        )
    return obj.eval()


def checkpoint_source(path: str | Path, kind: str) -> dict[str, Any]:
    """The manifest's ``source`` entry for a checkpoint file."""
    p = Path(path)
    return {"kind": kind, "file": p.name, "sha256": sha256_file(p)}


def state_dict_sha256(model: Any) -> str:
    """sha256 over a model's state_dict (names, dtypes, shapes, bytes) in key order."""
    import hashlib

    torch, _ = require_torch()
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:
            t = t.float()
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()
