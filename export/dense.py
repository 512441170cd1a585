"""The torch side of export: the dense network (normalise, backbone, FPN, heads) and its anchors.

The dense part is traced with ``torch.onnx.export``; post-processing is written as plain ONNX by
:mod:`.postgraph`, so the fused graph is exactly the ops we chose.

Tracing is most of an export's time (10-20 s for the demo model on two cores) and depends on the dense
network alone, not on the post-processing parameters (score threshold, detections per image), the name or
the intended use. A process that exports one checkpoint several times (a threshold sweep through the
Python API, the test suite's versions of one model) traces it once: :func:`export_dense_onnx` keeps the
last traces of this process, keyed by :func:`dense_fingerprint`. A wrong reuse could not go unnoticed:
every export then measures parity of the fused graph against the PyTorch model itself.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from retinaedge.export.torchload import require_torch
from retinaedge.runtime.manifest import AnchorSpec

log = logging.getLogger(__name__)

OPSET = 18
#: The traces this process keeps (ONNX bytes by :func:`dense_fingerprint`), newest last, at most this
#: many bytes together (the R50-FPN's trace is about 150 MB).
TRACE_MEMO_BYTES = 320 * 2**20
_traces: OrderedDict[str, bytes] = OrderedDict()


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


def dense_fingerprint(dense: Any, channels: int, height: int, width: int) -> str:
    """sha256 of everything the trace of ``dense`` depends on: torch's version, the opset, the input
    (``channels``, ``height`` x ``width``), every submodule's class and plain attributes (strides, eps,
    flags such as the FPN's ``use_P5``) and every parameter and buffer (name, dtype, shape, bytes)."""
    torch, _ = require_torch()
    h = hashlib.sha256(f"{torch.__version__}|{OPSET}|{channels}|{height}|{width}".encode())
    plain = (bool, int, float, str, tuple, type(None))
    for name, module in dense.named_modules():
        attrs = sorted((k, repr(v)) for k, v in vars(module).items() if isinstance(v, plain))
        h.update(f"{name}|{type(module).__module__}.{type(module).__qualname__}|{attrs}".encode())
    for name, tensor in sorted(dense.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_dense_onnx(dense: Any, path: Path, channels: int, height: int, width: int) -> None:
    """Trace the dense module to ONNX (opset :data:`OPSET`, dynamic batch ``N``, weights embedded), or
    write this process's trace of the same network again (module docstring)."""
    key = dense_fingerprint(dense, channels, height, width)
    if key in _traces:
        _traces.move_to_end(key)
        path.write_bytes(_traces[key])
        log.info("dense network as traced before in this process (fingerprint %s) to %s", key[:12], path.name)
        return
    _trace(dense, path, channels, height, width)
    data = path.read_bytes()
    if len(data) <= TRACE_MEMO_BYTES:
        _traces[key] = data
        while sum(len(v) for v in _traces.values()) > TRACE_MEMO_BYTES:
            _traces.popitem(last=False)


def _trace(dense: Any, path: Path, channels: int, height: int, width: int) -> None:
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
