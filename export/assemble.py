"""Join the traced dense network and the hand-written post-processing into one ONNX model.

The result has the contract I/O (docs/architecture.md, contracts):
    input  ``images``          float32 ``[N, C, H, W]``, values 0..1
    output ``num_detections``  int32   ``[N]``
           ``boxes``           float32 ``[N, K, 4]``  x1, y1, x2, y2 in input pixels
           ``scores``          float32 ``[N, K]``
           ``labels``          int32   ``[N, K]``      torchvision label index, -1 in padding rows
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper
from retinaedge.export.graphbuilder import GraphBuilder
from retinaedge.export.postgraph import PLUGIN_DOMAIN, build_candidates, build_onnx_nms, build_plugin_nms
from retinaedge.runtime.manifest import METADATA_KEY, Manifest, PostprocessSpec

OUTPUTS_SPEC: dict[str, dict[str, Any]] = {
    "num_detections": {"dtype": "int32", "shape": ["N"]},
    "boxes": {"dtype": "float32", "shape": ["N", "K", 4], "format": "x1y1x2y2, input pixels"},
    "scores": {"dtype": "float32", "shape": ["N", "K"]},
    "labels": {"dtype": "int32", "shape": ["N", "K"], "padding": -1},
}


def _output_infos(k: int) -> list[onnx.ValueInfoProto]:
    return [
        helper.make_tensor_value_info("num_detections", TensorProto.INT32, ["N"]),
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", k, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", k]),
        helper.make_tensor_value_info("labels", TensorProto.INT32, ["N", k]),
    ]


def fuse(
    dense: onnx.ModelProto,
    anchors: np.ndarray,
    anchors_per_level: tuple[int, ...],
    num_classes: int,
    spec: PostprocessSpec,
    image_hw: tuple[int, int],
    channels: int,
    *,
    plugin: bool = False,
) -> onnx.ModelProto:
    """Return a new model: ``dense`` followed by post-processing (ONNX NMS, or EfficientNMS_TRT)."""
    model = copy.deepcopy(dense)
    graph = model.graph
    height, width = image_hw
    b = GraphBuilder("post/")
    cand = build_candidates(
        b, "cls_logits", "bbox_regression", anchors, anchors_per_level, num_classes, spec, image_hw
    )
    if plugin:
        build_plugin_nms(b, cand, num_classes, spec)
    else:
        build_onnx_nms(b, cand, num_classes, spec)
    b.attach(graph)
    del graph.output[:]
    graph.output.extend(_output_infos(spec.detections_per_img))
    del graph.input[:]
    graph.input.append(
        helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", channels, height, width])
    )
    # Drop stale intermediate shape annotations from the tracer; shape inference recomputes them.
    del graph.value_info[:]
    if plugin and not any(o.domain == PLUGIN_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
    graph.name = "retinaedge_retinanet_plugin_nms" if plugin else "retinaedge_retinanet"
    return model


def candidates_model(
    dense: onnx.ModelProto,
    anchors: np.ndarray,
    anchors_per_level: tuple[int, ...],
    num_classes: int,
    spec: PostprocessSpec,
    image_hw: tuple[int, int],
) -> tuple[onnx.ModelProto, int]:
    """``dense`` plus the pre-NMS stage only: outputs ``cand_boxes (N, M, 4)``, ``cand_scores (N, M)``,
    ``cand_labels (N, M)`` int64 -- exactly what the NMS (ONNX op or plugin) receives. Returns (model, M).
    """
    model = copy.deepcopy(dense)
    b = GraphBuilder("post/")
    cand = build_candidates(
        b, "cls_logits", "bbox_regression", anchors, anchors_per_level, num_classes, spec, image_hw
    )
    b.op("Identity", [cand.boxes], outputs=["cand_boxes"])
    b.op("Identity", [cand.scores], outputs=["cand_scores"])
    b.op("Identity", [cand.labels], outputs=["cand_labels"])
    b.attach(model.graph)
    del model.graph.output[:]
    del model.graph.value_info[:]
    model.graph.output.extend(
        [
            helper.make_tensor_value_info("cand_boxes", TensorProto.FLOAT, ["N", cand.count, 4]),
            helper.make_tensor_value_info("cand_scores", TensorProto.FLOAT, ["N", cand.count]),
            helper.make_tensor_value_info("cand_labels", TensorProto.INT64, ["N", cand.count]),
        ]
    )
    return model, cand.count


def postprocess_only(
    anchors: np.ndarray,
    anchors_per_level: tuple[int, ...],
    num_classes: int,
    spec: PostprocessSpec,
    image_hw: tuple[int, int],
    opset: int,
) -> onnx.ModelProto:
    """The post-processing alone: inputs ``cls_logits (N, A, C)``, ``bbox_regression (N, A, 4)``.

    Used to time the in-graph post-processing and to test it without torch.
    """
    total = int(anchors.shape[0])
    b = GraphBuilder("post/")
    cand = build_candidates(
        b, "cls_logits", "bbox_regression", anchors, anchors_per_level, num_classes, spec, image_hw
    )
    build_onnx_nms(b, cand, num_classes, spec)
    graph = helper.make_graph(
        b.nodes,
        "retinaedge_postprocess",
        [
            helper.make_tensor_value_info("cls_logits", TensorProto.FLOAT, ["N", total, num_classes]),
            helper.make_tensor_value_info("bbox_regression", TensorProto.FLOAT, ["N", total, 4]),
        ],
        _output_infos(spec.detections_per_img),
        initializer=b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    return model


def embed_manifest(
    model: onnx.ModelProto, manifest: Manifest, *, producer_name: str | None = "retinaedge"
) -> None:
    """Store the manifest (without ``model_sha256``, which would be circular) in ``metadata_props``,
    replacing any earlier one, and set ``producer_name`` (``None``: leave it as it is, e.g. the
    quantizer's)."""
    for prop in list(model.metadata_props):
        if prop.key == METADATA_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = manifest.with_model_sha256(None).to_json()
    if producer_name is not None:
        model.producer_name = producer_name
    model.producer_version = str(manifest.exporter.get("version", ""))
    model.doc_string = (
        f"{manifest.architecture} RetinaNet, {manifest.num_classes} classes, input "
        f"{manifest.input.channels}x{manifest.input.height}x{manifest.input.width}, NMS fused ({manifest.nms})"
    )


def check(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.checker`` (full, with strict shape inference); return the shape-inferred model."""
    onnx.checker.check_model(model, full_check=False)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False)
    onnx.checker.check_model(inferred, full_check=False)
    return inferred
