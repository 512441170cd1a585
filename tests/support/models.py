"""Torchvision RetinaNets for exports (needs the export extra: torch, torchvision)."""

from __future__ import annotations

from typing import Any


def biased_retinanet(arch: str, num_classes: int, seed: int = 0, *, frozen_bn: bool = False) -> Any:
    """A randomly initialised RetinaNet whose classification head is biased so every image yields
    hundreds of candidates above the 0.05 threshold (NMS and the K cap then have real work)."""
    import torch
    from retinaedge.export.torchload import build_retinanet

    torch.manual_seed(seed)
    model = build_retinanet(arch, num_classes, frozen_bn=frozen_bn)
    with torch.no_grad():
        cls = model.head.classification_head.cls_logits
        cls.weight.normal_(0.0, 0.05)
        cls.bias.fill_(-2.0)
    return model.eval()
