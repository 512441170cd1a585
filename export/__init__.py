"""retinaedge export: torchvision RetinaNet -> self-describing ONNX bundle with NMS in the graph.

Needs the ``export`` extra (torch, torchvision); importing this package does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_retinanet"]


def export_retinanet(model: Any, out_dir: Any, **kwargs: Any) -> Any:
    """See :func:`retinaedge.export.exporter.export_retinanet`."""
    from .exporter import export_retinanet as _export

    return _export(model, out_dir, **kwargs)
