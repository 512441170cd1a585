"""Structural validation of the EfficientNMS_TRT variant (it cannot run without TensorRT)."""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper
from retinaedge.export.postgraph import PLUGIN_DOMAIN, PLUGIN_OP
from retinaedge.runtime.errors import ExportError
from retinaedge.runtime.manifest import PostprocessSpec

_INT_ATTRS = ("background_class", "max_output_boxes", "score_activation", "class_agnostic", "box_coding")
_FLOAT_ATTRS = ("score_threshold", "iou_threshold")


def _dims(info: onnx.ValueInfoProto) -> list[Any]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in info.type.tensor_type.shape.dim]


def validate_plugin_model(
    model: onnx.ModelProto, spec: PostprocessSpec, num_classes: int, candidates: int
) -> dict[str, Any]:
    """Check the plugin node, its attributes, its input shapes and the output wiring; return a summary.

    ``model`` must be shape-inferred. Raises :class:`ExportError` on the first problem found.
    """
    if not any(o.domain == PLUGIN_DOMAIN and o.version == 1 for o in model.opset_import):
        raise ExportError(f"plugin model does not import the {PLUGIN_DOMAIN!r} opset")
    nodes = [n for n in model.graph.node if n.op_type == PLUGIN_OP]
    if len(nodes) != 1:
        raise ExportError(f"expected exactly one {PLUGIN_OP} node, found {len(nodes)}")
    node = nodes[0]
    if node.domain != PLUGIN_DOMAIN:
        raise ExportError(f"{PLUGIN_OP} node is in domain {node.domain!r}, expected {PLUGIN_DOMAIN!r}")
    if any(n.op_type == "NonMaxSuppression" for n in model.graph.node):
        raise ExportError("plugin model still contains an ONNX NonMaxSuppression node")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    expected: dict[str, Any] = {
        "background_class": -1,
        "max_output_boxes": spec.detections_per_img,
        "score_activation": 0,
        "class_agnostic": 0,
        "box_coding": 0,
        "score_threshold": spec.score_thresh,
        "iou_threshold": spec.nms_iou,
        "plugin_version": b"1",
    }
    for name, want in expected.items():
        if name not in attrs:
            raise ExportError(f"{PLUGIN_OP} lacks attribute {name!r}")
        got = attrs[name]
        if name in _INT_ATTRS and (not isinstance(got, int) or got != want):
            raise ExportError(f"{PLUGIN_OP}.{name} = {got!r}, expected int {want!r}")
        if name in _FLOAT_ATTRS and (not isinstance(got, float) or abs(got - want) > 1e-6):
            raise ExportError(f"{PLUGIN_OP}.{name} = {got!r}, expected float {want!r}")
        if name == "plugin_version" and got != want:
            raise ExportError(f"{PLUGIN_OP}.plugin_version = {got!r}, expected {want!r}")
    if len(node.input) != 2 or len(node.output) != 4:
        raise ExportError(f"{PLUGIN_OP} must have 2 inputs (boxes, scores) and 4 outputs")
    infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    shapes = {}
    for role, name, want_shape in (
        ("boxes", node.input[0], ["N", candidates, 4]),
        ("scores", node.input[1], ["N", candidates, num_classes]),
    ):
        if name not in infos:
            raise ExportError(f"no inferred shape for the plugin's {role} input {name!r}")
        dims = _dims(infos[name])
        if len(dims) != 3 or dims[1:] != want_shape[1:]:
            raise ExportError(
                f"plugin {role} input has shape {dims}, expected [N, {want_shape[1]}, {want_shape[2]}]"
            )
        if infos[name].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise ExportError(f"plugin {role} input must be float32")
        shapes[role] = dims
    outputs = [o.name for o in model.graph.output]
    if outputs != ["num_detections", "boxes", "scores", "labels"]:
        raise ExportError(f"plugin model outputs {outputs} do not follow the contract")
    return {
        "node": node.name,
        "attributes": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()},
        "input_shapes": shapes,
    }
