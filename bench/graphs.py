"""Sub-models cut out of a bundle's ``model.onnx`` (no torch, no re-export).

The fused graph is the traced dense network (``images -> cls_logits, bbox_regression``) followed by the
hand-written post-processing (``cls_logits, bbox_regression -> num_detections, boxes, scores, labels``);
export keeps those two tensor names at the seam. ``onnx.utils.Extractor`` cuts along them:

- heads only: input ``images (N, C, H, W)``, outputs ``cls_logits (N, A, K)``, ``bbox_regression (N, A, 4)``;
- post-processing only: inputs the two head tensors, outputs the contract outputs (docs/architecture.md).

Both are exactly the operators of ``model.onnx``, so the fused pipeline equals heads then post-processing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retinaedge.runtime.detections import OUTPUT_NAMES
from retinaedge.runtime.errors import BundleError

HEAD_OUTPUTS: tuple[str, str] = ("cls_logits", "bbox_regression")
INPUT_NAME = "images"


def _extractor(model_path: Path, anchors: int, classes: int) -> Any:
    """An ``onnx.utils.Extractor`` over ``model_path`` whose seam tensors have declared types and shapes
    (export drops intermediate value infos, and the extractor needs them for the new inputs/outputs)."""
    import onnx
    from onnx import TensorProto, helper
    from onnx.utils import Extractor

    model = onnx.load(str(model_path))
    names = {o for node in model.graph.node for o in node.output}
    missing = [n for n in HEAD_OUTPUTS if n not in names]
    if missing:
        raise BundleError(
            f"{model_path.name} has no intermediate tensor(s) {missing}: it was not made by retinaedge export, "
            "so the heads cannot be separated from the post-processing"
        )
    known = {v.name for v in model.graph.value_info}
    shapes: dict[str, list[str | int | None]] = {
        "cls_logits": ["N", anchors, classes],
        "bbox_regression": ["N", anchors, 4],
    }
    for name in HEAD_OUTPUTS:
        if name not in known:
            model.graph.value_info.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name])
            )
    return Extractor(model)


def write_heads_and_post(
    model_path: str | Path, out_dir: str | Path, *, anchors: int, classes: int
) -> tuple[Path, Path]:
    """Write ``heads.onnx`` and ``post.onnx`` cut from ``model_path`` into ``out_dir``; return their paths.

    ``anchors`` (A, all levels) and ``classes`` (K) are the manifest's; they shape the seam tensors.
    """
    import onnx

    model_path = Path(model_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extractor = _extractor(model_path, anchors, classes)
    heads = extractor.extract_model([INPUT_NAME], list(HEAD_OUTPUTS))
    post = extractor.extract_model(list(HEAD_OUTPUTS), list(OUTPUT_NAMES))
    heads_path, post_path = out / "heads.onnx", out / "post.onnx"
    onnx.save(heads, str(heads_path))
    onnx.save(post, str(post_path))
    return heads_path, post_path
