"""``export_retinanet``: a torchvision RetinaNet -> a verified model bundle (docs/models.md).

Stages: validate options -> anchors from the model's own generator -> trace the dense network ->
fuse post-processing (ONNX NMS) -> check -> parity against torchvision -> golden input -> optional
EfficientNMS_TRT variant -> atomically publish the bundle directory.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from retinaedge.export import assemble
from retinaedge.export.dense import OPSET, compute_anchors, export_dense_onnx, make_dense_module
from retinaedge.export.nms_reference import emulate_efficient_nms
from retinaedge.export.parity import ParityInput, batch_consistency, compare
from retinaedge.export.plugin_check import validate_plugin_model
from retinaedge.export.postgraph import PLUGIN_MAX_CANDIDATES, plugin_semantics
from retinaedge.export.reference import reference_model, torchvision_detections
from retinaedge.export.synthetic import synthetic_images_u8, to_float
from retinaedge.export.torchload import require_torch, state_dict_sha256
from retinaedge.runtime import __version__
from retinaedge.runtime.backends.onnxruntime import OnnxRuntimeBackend
from retinaedge.runtime.bundle import (
    MANIFEST_FILE,
    MODEL_FILE,
    PARITY_FILE,
    PLUGIN_MODEL_FILE,
    write_golden,
)
from retinaedge.runtime.detections import split_outputs
from retinaedge.runtime.errors import ConfigError, ParityError
from retinaedge.runtime.hashing import sha256_file
from retinaedge.runtime.intended_use import IntendedUse
from retinaedge.runtime.manifest import (
    ClassCode,
    InputSpec,
    Manifest,
    PostprocessSpec,
    Preprocessing,
    WindowPolicy,
)
from retinaedge.runtime.operating_point import OperatingPoint

log = logging.getLogger(__name__)

DEFAULT_PARITY_THRESHOLD = 0.995


@dataclass(frozen=True)
class ExportResult:
    """Where the bundle went, its manifest and the parity summary."""

    bundle_dir: Path
    manifest: Manifest
    parity: dict[str, Any]


def _versions() -> dict[str, str]:
    import onnxruntime

    torch, torchvision = require_torch()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "opset": str(OPSET),
    }


def _postprocess_spec(model: Any, overrides: dict[str, float | int | None]) -> PostprocessSpec:
    """The model's own post-processing parameters (torchvision defaults) with explicit overrides."""
    coder = model.box_coder

    def pick(key: str, attr: str) -> Any:
        value = overrides.get(key)
        return getattr(model, attr) if value is None else value

    spec = PostprocessSpec(
        score_thresh=float(pick("score_thresh", "score_thresh")),
        nms_iou=float(pick("nms_iou", "nms_thresh")),
        topk_candidates=int(pick("topk_candidates", "topk_candidates")),
        detections_per_img=int(pick("detections_per_img", "detections_per_img")),
        box_coder_weights=tuple(float(w) for w in coder.weights),  # type: ignore[arg-type]
        bbox_xform_clip=float(coder.bbox_xform_clip),
    )
    spec.validate()
    return spec


def _validate_request(
    model: Any, class_names: Sequence[str], inp: InputSpec, spec: PostprocessSpec, plugin: bool
) -> None:
    from torchvision.models.detection.retinanet import RetinaNet

    if not isinstance(model, RetinaNet):
        raise ConfigError(f"expected a torchvision.models.detection.RetinaNet, got {type(model).__name__}")
    inp.validate()
    num_classes = int(model.head.classification_head.num_classes)
    if len(class_names) != num_classes:
        raise ConfigError(
            f"{len(class_names)} class names given but the model's classification head has "
            f"{num_classes} classes"
        )
    if len(model.transform.image_mean) != 3:
        raise ConfigError("the model's transform must normalise 3 channels")
    if plugin and spec.detections_per_img > PLUGIN_MAX_CANDIDATES:
        raise ConfigError(
            f"the EfficientNMS_TRT variant cannot output {spec.detections_per_img} detections per image "
            f"(it keeps at most {PLUGIN_MAX_CANDIDATES} candidates)"
        )


def check_output_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse (:class:`ConfigError`) an existing ``out`` unless ``overwrite``. An empty directory (such as
    a fresh ``tempfile.TemporaryDirectory()``) holds nothing to protect: the bundle is written there."""
    if overwrite or not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    raise ConfigError(
        f"output {out} already exists and is not an empty directory (pass overwrite=True / --force to "
        "replace it)"
    )


def export_retinanet(
    model: Any,
    out_dir: str | Path,
    *,
    input_size: tuple[int, int],
    class_names: Sequence[str],
    name: str | None = None,
    architecture: str = "torchvision.RetinaNet",
    channels: int = 3,
    window: WindowPolicy | None = None,
    score_thresh: float | None = None,
    nms_iou: float | None = None,
    topk_candidates: int | None = None,
    detections_per_img: int | None = None,
    plugin_variant: bool = False,
    parity_inputs: Sequence[ParityInput] = (),
    synthetic_count: int = 4,
    parity_threshold: float = DEFAULT_PARITY_THRESHOLD,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
    operating_point: OperatingPoint | None = None,
    class_codes: Mapping[str, ClassCode] | None = None,
    intended_use: IntendedUse | None = None,
) -> ExportResult:
    """Export ``model`` (any constructed torchvision RetinaNet) to a bundle in ``out_dir``.

    ``input_size`` is (height, width) in pixels, multiples of 32. ``parity_inputs`` are extra images
    (e.g. preprocessed DICOM frames) checked besides ``synthetic_count`` synthetic ones. Raises
    :class:`ParityError` when fewer than ``parity_threshold`` of PyTorch's detections are reproduced; the
    rejected bundle is then left in ``<out_dir>.rejected`` for inspection. ``operating_point``: the
    score threshold per class at which the model is read (:mod:`retinaedge.runtime.operating_point`;
    None: every detection is a finding until ``retinaedge eval --choose-operating-point`` sets one).
    ``class_codes``: a standard code per class (SNOMED CT, RadLex, DICOM) that result documents name it
    by; a class without one is named by the private scheme ``99RETINAEDGE``. ``intended_use``: the
    images the model is made for (:mod:`retinaedge.runtime.intended_use`; None: every image).
    """
    torch, _ = require_torch()
    height, width = (int(v) for v in input_size)
    out = Path(out_dir)
    check_output_dir(out, overwrite=overwrite)
    if synthetic_count < 1:
        raise ConfigError("at least one synthetic parity image is needed (it becomes the golden input)")
    if not 0.0 < parity_threshold <= 1.0:
        raise ConfigError(f"parity threshold must be within (0, 1], got {parity_threshold}")
    inp = InputSpec(height=height, width=width, channels=channels)
    work = copy.deepcopy(model).eval()
    spec = _postprocess_spec(
        work,
        {
            "score_thresh": score_thresh,
            "nms_iou": nms_iou,
            "topk_candidates": topk_candidates,
            "detections_per_img": detections_per_img,
        },
    )
    _validate_request(work, class_names, inp, spec, plugin_variant)
    pre = Preprocessing(window=window or WindowPolicy())
    pre.validate()
    for item in parity_inputs:
        if item.image.shape != (channels, height, width):
            raise ConfigError(
                f"parity input {item.source} has shape {item.image.shape}, expected "
                f"{(channels, height, width)}"
            )
    # The reference must use the same post-processing parameters as the fused graph.
    work.score_thresh, work.nms_thresh = spec.score_thresh, spec.nms_iou
    work.topk_candidates, work.detections_per_img = spec.topk_candidates, spec.detections_per_img
    num_classes = len(class_names)
    t0 = time.perf_counter()

    anchors, anchor_spec = compute_anchors(work, height, width)
    manifest = Manifest(
        name=name or f"{architecture}-{num_classes}c-{height}x{width}",
        architecture=architecture,
        class_names=tuple(class_names),
        input=inp,
        normalization={
            "mean": [float(m) for m in work.transform.image_mean],
            "std": [float(s) for s in work.transform.image_std],
        },
        preprocessing=pre,
        postprocess=spec,
        anchors=anchor_spec,
        outputs=assemble.OUTPUTS_SPEC,
        source=source or {"kind": "in-memory", "sha256": state_dict_sha256(work)},
        exporter={"name": "retinaedge", "version": __version__},
        versions=_versions(),
        operating_point=operating_point,
        class_codes=dict(class_codes or {}),
        intended_use=intended_use,
    )
    manifest.validate()

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        dense_path = stage / "dense.onnx"
        with torch.no_grad():
            export_dense_onnx(make_dense_module(work, channels), dense_path, channels, height, width)
        dense = onnx.load(str(dense_path))
        dense_path.unlink()
        fused = assemble.fuse(
            dense, anchors, anchor_spec.anchors_per_level, num_classes, spec, (height, width), channels
        )
        assemble.embed_manifest(fused, manifest)
        assemble.check(fused)
        model_path = stage / MODEL_FILE
        onnx.save(fused, str(model_path))
        manifest = manifest.with_model_sha256(sha256_file(model_path))
        (stage / MANIFEST_FILE).write_text(manifest.to_json())
        log.info(
            "model.onnx written (%.1f MB) in %.1f s",
            model_path.stat().st_size / 1e6,
            time.perf_counter() - t0,
        )

        synth_u8 = synthetic_images_u8(synthetic_count, channels, height, width, seed=0)
        inputs = [ParityInput(img, f"synthetic:{i}") for i, img in enumerate(to_float(synth_u8))]
        inputs += list(parity_inputs)
        images = np.stack([p.image for p in inputs]).astype(np.float32)
        ref_model = reference_model(work, height, width)
        reference = torchvision_detections(ref_model, images)
        with OnnxRuntimeBackend(model_path) as backend:
            candidate = [split_outputs(backend.infer(images[i : i + 1]))[0] for i in range(len(inputs))]
            consistency = batch_consistency(backend, images[:synthetic_count])
        parity: dict[str, Any] = {
            "reference": "torchvision RetinaNet.forward in PyTorch (transform at scale 1.0, "
            "postprocess_detections)",
            "candidate": "model.onnx in onnxruntime (CPUExecutionProvider), batch 1 per image",
            "criteria": {"iou_min": 0.99, "score_tol": 1e-3, "min_match_rate": parity_threshold},
            **compare([p.source for p in inputs], reference.detections, candidate, reference.pre_cap_counts),
            "batch_consistency": consistency,
            "model_sha256": manifest.model_sha256,
        }
        _write_golden(
            stage, ref_model, synth_u8[0], inputs[synthetic_count:], reference.detections[synthetic_count:]
        )

        if plugin_variant:
            parity["efficientnms_trt"] = _plugin_variant(
                stage,
                dense,
                anchors,
                anchor_spec.anchors_per_level,
                num_classes,
                spec,
                (height, width),
                channels,
                manifest,
                images,
                [p.source for p in inputs],
                reference.detections,
            )
        rate = parity["totals"]["match_rate"]
        parity["passed"] = bool(
            rate >= parity_threshold and consistency["min_match_rate"] >= parity_threshold
        )
        parity["export_seconds"] = round(time.perf_counter() - t0, 2)
        (stage / PARITY_FILE).write_text(json.dumps(parity, indent=2))
        if not parity["passed"]:
            rejected = out.with_name(out.name + ".rejected")
            shutil.rmtree(rejected, ignore_errors=True)
            os.replace(stage, rejected)
            raise ParityError(
                f"parity {rate:.2%} of {parity['totals']['reference']} PyTorch detections matched "
                f"(batch consistency {consistency['min_match_rate']:.2%}); need {parity_threshold:.2%}. "
                f"Report: {rejected / PARITY_FILE}"
            )
        if out.exists():
            if overwrite:
                shutil.rmtree(out)
            else:
                out.rmdir()  # the empty directory accepted at the start (OSError if written into since)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info(
        "bundle %s ready: parity %.4f over %d detections",
        out,
        parity["totals"]["match_rate"],
        parity["totals"]["reference"],
    )
    return ExportResult(bundle_dir=out, manifest=manifest, parity=parity)


def _write_golden(
    stage: Path,
    ref_model: Any,
    synthetic_u8: np.ndarray,
    extra: Sequence[ParityInput],
    extra_detections: Sequence[Any],
) -> None:
    """The golden input the runtime self-tests with: the first synthetic image and, when parity inputs
    were given (e.g. DICOM frames), the one on which PyTorch found the most detections, so the self-test
    checks real detections. Stored as uint8 (input = u8 / 255); the reference detections are recomputed
    on the quantised images so that they are exactly what the stored input should give."""
    images_u8 = [synthetic_u8]
    sources = ["synthetic:0"]
    if extra:
        best = max(range(len(extra)), key=lambda i: len(extra_detections[i].scores))
        if len(extra_detections[best].scores):
            images_u8.append(np.clip(np.rint(extra[best].image * 255.0), 0, 255).astype(np.uint8))
            sources.append(extra[best].source)
    golden_u8 = np.stack(images_u8)
    golden = torchvision_detections(ref_model, to_float(golden_u8))
    write_golden(stage, golden_u8, golden.detections, "torchvision (PyTorch) on " + ", ".join(sources))


def _plugin_variant(
    stage: Path,
    dense: onnx.ModelProto,
    anchors: np.ndarray,
    per_level: tuple[int, ...],
    num_classes: int,
    spec: PostprocessSpec,
    image_hw: tuple[int, int],
    channels: int,
    manifest: Manifest,
    images: np.ndarray,
    sources: list[str],
    reference: list[Any],
) -> dict[str, Any]:
    """Write the EfficientNMS_TRT model, validate it, and measure its emulated semantics."""
    plugin = assemble.fuse(dense, anchors, per_level, num_classes, spec, image_hw, channels, plugin=True)
    plugin_manifest = Manifest.from_dict(
        manifest.to_dict() | {"nms": "efficientnms_trt", "model_sha256": None}
    )
    assemble.embed_manifest(plugin, plugin_manifest)
    inferred = assemble.check(plugin)
    cand_model, count = assemble.candidates_model(dense, anchors, per_level, num_classes, spec, image_hw)
    structure = validate_plugin_model(inferred, spec, num_classes, count)
    path = stage / PLUGIN_MODEL_FILE
    onnx.save(plugin, str(path))
    assemble.check(cand_model)
    import onnxruntime as ort

    session = ort.InferenceSession(cand_model.SerializeToString(), providers=["CPUExecutionProvider"])
    emulated = []
    for i in range(images.shape[0]):
        boxes, scores, labels = session.run(None, {"images": images[i : i + 1]})
        emulated.append(
            emulate_efficient_nms(
                boxes[0],
                scores[0],
                labels[0],
                score_threshold=spec.score_thresh,
                iou_threshold=spec.nms_iou,
                max_output_boxes=spec.detections_per_img,
            )
        )
    measured = compare(sources, reference, emulated)
    return {
        "file": PLUGIN_MODEL_FILE,
        "sha256": sha256_file(path),
        "structure": structure,
        "semantics": plugin_semantics(spec, count),
        "emulated_parity": {
            "method": "pre-NMS candidates from this graph in onnxruntime, then the plugin's documented "
            "algorithm in numpy (threshold, sort, best 4096, class-wise NMS, best K)",
            "totals": measured["totals"],
        },
    }
