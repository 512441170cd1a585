"""The model manifest: everything a runtime needs to use ``model.onnx`` correctly.

The manifest is written as ``manifest.json`` in the bundle and embedded (without its own
``model_sha256``, which would be circular) in the ONNX ``metadata_props`` under
:data:`METADATA_KEY`, so ``model.onnx`` alone is enough to run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from retinaedge.runtime.errors import BundleError, ConfigError
from retinaedge.runtime.intended_use import IntendedUse
from retinaedge.runtime.operating_point import OperatingPoint

FORMAT_VERSION = 1
METADATA_KEY = "retinaedge.manifest"
WINDOW_POLICIES = ("file", "fixed", "minmax")


@dataclass(frozen=True)
class InputSpec:
    """The graph input ``images``: float32 ``[N, channels, height, width]``, values 0..1."""

    height: int
    width: int
    channels: int = 3
    name: str = "images"
    value_range: tuple[float, float] = (0.0, 1.0)

    def validate(self) -> None:
        if self.height < 32 or self.width < 32:
            raise ConfigError(f"input size {self.height}x{self.width} is too small (minimum 32x32)")
        if self.height % 32 or self.width % 32:
            raise ConfigError(
                f"input size {self.height}x{self.width} must be a multiple of 32 in both dimensions "
                "(the FPN downsamples by 2^5; torchvision pads to a multiple of 32)"
            )
        if self.channels not in (1, 3):
            raise ConfigError(f"input channels must be 1 or 3, got {self.channels}")


@dataclass(frozen=True)
class WindowPolicy:
    """How a DICOM frame becomes 0..1 values (applied after the modality LUT).

    ``file``: the file's own VOI LUT / window, falling back to ``fallback`` when it has none.
    ``fixed``: ``center``/``width`` in modality units (e.g. a brain window 40/80 HU).
    ``minmax``: robust min-max between the ``percentiles`` of the frame's values.
    """

    policy: str = "file"
    center: float | None = None
    width: float | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    fallback: str = "minmax"

    def validate(self) -> None:
        if self.policy not in WINDOW_POLICIES:
            raise ConfigError(f"window policy must be one of {WINDOW_POLICIES}, got {self.policy!r}")
        if self.policy == "fixed":
            if self.center is None or self.width is None:
                raise ConfigError("window policy 'fixed' needs both a center and a width")
            if not self.width > 0:
                raise ConfigError(f"window width must be > 0, got {self.width}")
        elif self.center is not None or self.width is not None:
            raise ConfigError(f"window center/width only apply to policy 'fixed', not {self.policy!r}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ConfigError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if self.fallback not in ("minmax",):
            raise ConfigError(f"window fallback must be 'minmax', got {self.fallback!r}")


@dataclass(frozen=True)
class Preprocessing:
    """Frame -> model input. ``letterbox``: keep aspect ratio, place top-left, pad with ``pad_value``."""

    window: WindowPolicy = field(default_factory=WindowPolicy)
    resize: str = "letterbox"
    pad_value: float = 0.0

    def validate(self) -> None:
        self.window.validate()
        if self.resize != "letterbox":
            raise ConfigError(f"resize must be 'letterbox', got {self.resize!r}")
        if not 0.0 <= self.pad_value <= 1.0:
            raise ConfigError(f"pad_value must be within 0..1, got {self.pad_value}")


@dataclass(frozen=True)
class PostprocessSpec:
    """torchvision ``RetinaNet.postprocess_detections`` parameters, as fused into the graph."""

    score_thresh: float = 0.05
    nms_iou: float = 0.5
    topk_candidates: int = 1000
    detections_per_img: int = 300
    box_coder_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    bbox_xform_clip: float = math.log(1000.0 / 16)

    def validate(self) -> None:
        if not 0.0 <= self.score_thresh < 1.0:
            raise ConfigError(f"score threshold must be within [0, 1), got {self.score_thresh}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ConfigError(f"NMS IoU threshold must be within (0, 1], got {self.nms_iou}")
        if self.topk_candidates < 1:
            raise ConfigError(f"top-k candidates per level must be >= 1, got {self.topk_candidates}")
        if self.detections_per_img < 1:
            raise ConfigError(f"detections per image must be >= 1, got {self.detections_per_img}")
        if any(w <= 0 for w in self.box_coder_weights):
            raise ConfigError(f"box coder weights must be > 0, got {self.box_coder_weights}")


@dataclass(frozen=True)
class AnchorSpec:
    """Anchors as the model's own anchor generator produced them for the export input size."""

    sizes: tuple[tuple[float, ...], ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    feature_map_sizes: tuple[tuple[int, int], ...]
    strides: tuple[tuple[int, int], ...]
    anchors_per_level: tuple[int, ...]


@dataclass(frozen=True)
class ClassCode:
    """A standard code for a model class (SNOMED CT ``SCT``, RadLex ``RADLEX``, DICOM ``DCM``): what a
    result document names the class with instead of the model's private one (``value``: the code,
    ``scheme``: the coding scheme designator, ``meaning``: its code meaning, at most 64 characters)."""

    value: str
    scheme: str
    meaning: str

    def validate(self, name: str) -> None:
        if not (self.value and self.scheme and self.meaning):
            raise ConfigError(f"class_codes[{name!r}] needs a value, a scheme and a meaning")
        if len(self.meaning) > 64 or len(self.scheme) > 16 or len(self.value) > 64:
            raise ConfigError(
                f"class_codes[{name!r}]: DICOM limits a code meaning to 64, a scheme designator to 16 "
                "and a code value to 64 characters"
            )


def class_codes_from_dict(data: Any) -> dict[str, ClassCode]:
    """``{class: {"value", "scheme", "meaning"}}`` (the manifest's ``class_codes``, or a file holding it)
    -> codes; raises ConfigError naming what is malformed (each code is validated with the manifest)."""
    if not isinstance(data, dict):
        raise ConfigError('class codes are an object {class: {"value", "scheme", "meaning"}}')
    out: dict[str, ClassCode] = {}
    for name, code in data.items():
        if not isinstance(code, dict) or set(code) != {"value", "scheme", "meaning"}:
            raise ConfigError(
                f'class_codes[{name!r}] must be an object with exactly "value", "scheme", "meaning"'
            )
        out[str(name)] = ClassCode(str(code["value"]), str(code["scheme"]), str(code["meaning"]))
    return out


@dataclass(frozen=True)
class Manifest:
    """What ``model.onnx`` is and how to feed it. Serialised as JSON (see :meth:`to_json`)."""

    name: str
    architecture: str
    class_names: tuple[str, ...]
    input: InputSpec
    normalization: dict[str, list[float]]
    preprocessing: Preprocessing
    postprocess: PostprocessSpec
    anchors: AnchorSpec
    outputs: dict[str, dict[str, Any]]
    source: dict[str, Any]
    exporter: dict[str, Any]
    versions: dict[str, str]
    nms: str = "onnx-nonmaxsuppression"
    model_sha256: str | None = None
    format_version: int = FORMAT_VERSION
    #: Score thresholds per class at which the model is read (:mod:`retinaedge.runtime.operating_point`);
    #: None: every detection is a finding.
    operating_point: OperatingPoint | None = None
    #: Standard codes of the classes that have one (class name -> code); the others keep the private
    #: coding scheme in result documents.
    class_codes: dict[str, ClassCode] = field(default_factory=dict)
    #: The images the model was made for (:mod:`retinaedge.runtime.intended_use`); None: every image.
    intended_use: IntendedUse | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on any inconsistent field."""
        self.input.validate()
        self.preprocessing.validate()
        self.postprocess.validate()
        if not self.class_names:
            raise ConfigError("class_names must not be empty")
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"class names must be unique, got {list(self.class_names)}")
        if self.operating_point is not None:
            self.operating_point.validate(self.class_names)
        foreign = [c for c in self.class_codes if c not in self.class_names]
        if foreign:
            raise ConfigError(f"class_codes name {foreign}, which are not classes of the model")
        for name, code in self.class_codes.items():
            code.validate(name)

    def with_model_sha256(self, sha: str | None) -> Manifest:
        return replace(self, model_sha256=sha)

    def with_operating_point(self, point: OperatingPoint | None) -> Manifest:
        return replace(self, operating_point=point)

    def with_intended_use(self, use: IntendedUse | None) -> Manifest:
        return replace(self, intended_use=use)

    def to_dict(self) -> dict[str, Any]:
        data = _lists(asdict(self))
        if self.operating_point is None:
            del data["operating_point"]  # a manifest without one reads as it did before there was one
        else:
            data["operating_point"] = self.operating_point.to_dict()
        if not self.class_codes:
            del data["class_codes"]
        if self.intended_use is None:
            del data["intended_use"]  # likewise: every image
        else:
            data["intended_use"] = self.intended_use.to_dict()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Build from a parsed JSON object; raise :class:`BundleError` naming what is wrong."""
        try:
            version = int(data.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise BundleError(
                    f"manifest format_version {version} is not supported (this runtime reads {FORMAT_VERSION})"
                )
            window = WindowPolicy(**_tuples(data["preprocessing"]["window"]))
            pre = dict(data["preprocessing"], window=window)
            manifest = cls(
                name=str(data["name"]),
                architecture=str(data["architecture"]),
                class_names=tuple(str(c) for c in data["class_names"]),
                input=InputSpec(**_tuples(data["input"])),
                normalization={k: [float(x) for x in v] for k, v in data["normalization"].items()},
                preprocessing=Preprocessing(**pre),
                postprocess=PostprocessSpec(**_tuples(data["postprocess"])),
                anchors=AnchorSpec(**_tuples(data["anchors"])),
                outputs=dict(data["outputs"]),
                source=dict(data["source"]),
                exporter=dict(data["exporter"]),
                versions=dict(data["versions"]),
                nms=str(data.get("nms", "onnx-nonmaxsuppression")),
                model_sha256=data.get("model_sha256"),
                format_version=version,
                class_codes=class_codes_from_dict(data.get("class_codes") or {}),
                operating_point=(
                    OperatingPoint.from_dict(data["operating_point"])
                    if data.get("operating_point") is not None
                    else None
                ),
                intended_use=(
                    IntendedUse.from_dict(data["intended_use"])
                    if data.get("intended_use") is not None
                    else None
                ),
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise BundleError(f"manifest is invalid: {type(exc).__name__}: {exc}") from exc
        try:
            manifest.validate()
        except ConfigError as exc:
            raise BundleError(f"manifest is invalid: {exc}") from exc
        return manifest

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise BundleError("manifest must be a JSON object")
        return cls.from_dict(data)


def _lists(obj: Any) -> Any:
    """Tuples -> lists recursively, so JSON round trips compare equal."""
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_lists(v) for v in obj]
    return obj


def _tuples(obj: Any) -> Any:
    """Lists -> tuples recursively (the inverse of :func:`_lists` for frozen dataclasses)."""
    if isinstance(obj, dict):
        return {k: _tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_tuples(v) for v in obj)
    return obj
