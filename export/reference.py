"""PyTorch reference detections: the source RetinaNet run by torchvision itself.

``model(images)`` runs torchvision's ``GeneralizedRCNNTransform`` (configured so that its resize is the
identity at the export size), the backbone, the heads and ``postprocess_detections``. Hooks capture
the head outputs and anchors so the number of detections *before* the ``detections_per_img`` cap can be
counted with torchvision's own post-processing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
from retinaedge.export.torchload import require_torch
from retinaedge.runtime.detections import ImageDetections


@dataclass(frozen=True)
class ReferenceResult:
    """Per image: torchvision's detections, and how many survived NMS before the K cap."""

    detections: list[ImageDetections]
    pre_cap_counts: list[int]


def reference_model(model: Any, height: int, width: int) -> Any:
    """A copy of ``model`` whose transform keeps ``height x width`` inputs at scale 1.0."""
    ref = copy.deepcopy(model).eval()
    ref.transform.min_size = (min(height, width),)
    ref.transform.max_size = max(height, width)
    ref.transform.fixed_size = None
    return ref


def torchvision_detections(ref: Any, images: np.ndarray, *, count_pre_cap: bool = True) -> ReferenceResult:
    """Run ``ref`` (see :func:`reference_model`) on ``images`` float32 ``(N, C, H, W)`` in 0..1."""
    torch, _ = require_torch()
    n, c, h, w = images.shape
    captured: dict[str, Any] = {}

    def head_hook(_module: Any, _inputs: Any, output: Any) -> None:
        captured["head"] = output

    def anchor_hook(_module: Any, inputs: Any, output: Any) -> None:
        captured["anchors"] = output
        captured["features"] = inputs[1]
        captured["image_sizes"] = inputs[0].image_sizes

    hooks = [
        ref.head.register_forward_hook(head_hook),
        ref.anchor_generator.register_forward_hook(anchor_hook),
    ]
    try:
        with torch.no_grad():
            tensors = [torch.from_numpy(np.ascontiguousarray(img)).expand(3, h, w) for img in images]
            outputs = ref(tensors)
            if any(tuple(s) != (h, w) for s in captured["image_sizes"]):
                raise RuntimeError(
                    f"torchvision resized the input to {captured['image_sizes']}, expected {(h, w)}"
                )
            pre_cap = _pre_cap_counts(ref, captured) if count_pre_cap else [-1] * n
    finally:
        for hook in hooks:
            hook.remove()
    dets = [
        ImageDetections.from_arrays(o["boxes"].numpy(), o["scores"].numpy(), o["labels"].numpy())
        for o in outputs
    ]
    return ReferenceResult(detections=dets, pre_cap_counts=pre_cap)


def _pre_cap_counts(ref: Any, captured: dict[str, Any]) -> list[int]:
    """Re-run torchvision's ``postprocess_detections`` on the captured heads with the cap lifted."""
    head = captured["head"]
    anchors = captured["anchors"]
    features = captured["features"]
    hw = [f.size(2) * f.size(3) for f in features]
    per_loc = head["cls_logits"].size(1) // sum(hw)
    split = [x * per_loc for x in hw]
    split_head = {k: list(v.split(split, dim=1)) for k, v in head.items()}
    split_anchors = [list(a.split(split)) for a in anchors]
    saved = ref.detections_per_img
    ref.detections_per_img = 10**9
    try:
        dets = ref.postprocess_detections(split_head, split_anchors, captured["image_sizes"])
    finally:
        ref.detections_per_img = saved
    return [int(d["scores"].shape[0]) for d in dets]
