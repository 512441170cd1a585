"""retinaedge export: torchvision RetinaNet -> self-describing ONNX bundle with NMS in the graph.

Exporting needs the ``export`` extra (torch, torchvision); importing this package does not import torch.
INT8 quantization (:mod:`.quantize`, the ``quantize`` verb) needs only onnx and onnxruntime.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_retinanet"]


def export_retinanet(model: Any, out_dir: Any, **kwargs: Any) -> Any:
    """See :func:`retinaedge.export.exporter.export_retinanet`."""
    from retinaedge.export.exporter import export_retinanet as _export

    return _export(model, out_dir, **kwargs)
