"""The torch side of export: the dense network (normalise, backbone, FPN, heads) and its anchors.

The dense part is traced with ``torch.onnx.export``; post-processing is written as plain ONNX by
:mod:`.postgraph`, so the fused graph is exactly the ops we chose.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.export.torchload import require_torch
from retinaedge.runtime.manifest import AnchorSpec

log = logging.getLogger(__name__)

OPSET = 18


def make_dense_module(model: Any, channels: int) -> Any:
    """Wrap a RetinaNet as ``images (N, channels, H, W) in 0..1 -> (cls_logits (N, A, C), bbox (N, A, 4))``.

    Normalisation uses the model's own ``transform.image_mean``/``image_std``; a 1-channel input is
    replicated to the 3 channels the backbone expects.
    """
    torch, _ = require_torch()

    # torch is imported lazily (the export extra), so the base class is only known at run time.
    class DenseRetinaNet(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.backbone = model.backbone
            self.head = model.head
            mean = torch.tensor(model.transform.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(model.transform.image_std, dtype=torch.float32).view(1, -1, 1, 1)
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

        def forward(self, images: Any) -> tuple[Any, Any]:
            if channels == 1:
                images = images.expand(-1, 3, -1, -1)  # (N, 1, H, W) -> (N, 3, H, W)
            x = (images - self.mean) / self.std
            features = list(self.backbone(x).values())  # P3..P7, each (N, 256, H_l, W_l)
            out = self.head(features)
            return out["cls_logits"], out["bbox_regression"]  # (N, HWA, C), (N, HWA, 4)

    return DenseRetinaNet().eval()


def compute_anchors(model: Any, height: int, width: int) -> tuple[np.ndarray, AnchorSpec]:
    """Anchors ``(A, 4)`` float32 from the model's own anchor generator for an ``height x width`` input."""
    torch, _ = require_torch()
    from torchvision.models.detection.image_list import ImageList

    with torch.no_grad():
        dummy = torch.zeros(1, 3, height, width)
        features = list(model.backbone(dummy).values())
        image_list = ImageList(dummy, [(height, width)])
        anchors = model.anchor_generator(image_list, features)[0]  # (A, 4)
    gen = model.anchor_generator
    per_loc = gen.num_anchors_per_location()
    fm = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in features)
    spec = AnchorSpec(
        sizes=tuple(tuple(float(s) for s in g) for g in gen.sizes),
        aspect_ratios=tuple(tuple(float(r) for r in g) for g in gen.aspect_ratios),
        feature_map_sizes=fm,
        strides=tuple((height // h, width // w) for h, w in fm),
        anchors_per_level=tuple(h * w * a for (h, w), a in zip(fm, per_loc, strict=True)),
    )
    arr = anchors.detach().cpu().numpy().astype(np.float32)
    if arr.shape[0] != sum(spec.anchors_per_level):
        raise RuntimeError(f"anchor count {arr.shape[0]} != {sum(spec.anchors_per_level)}")
    return arr, spec


def export_dense_onnx(dense: Any, path: Path, channels: int, height: int, width: int) -> None:
    """Trace the dense module to ONNX (opset :data:`OPSET`, dynamic batch ``N``, weights embedded)."""
    torch, _ = require_torch()
    example = torch.rand(2, channels, height, width)
    batch = torch.export.Dim("N", min=1, max=256)
    torch.onnx.export(
        dense,
        (example,),
        str(path),
        dynamo=True,
        opset_version=OPSET,
        input_names=["images"],
        output_names=["cls_logits", "bbox_regression"],
        dynamic_shapes={"images": {0: batch}},
        external_data=False,
        verbose=False,
    )
    log.info("traced dense network to %s", path.name)
