"""COCO-style average precision of a model on the user's own annotated DICOM frames (pycocotools).

Pure logic, no I/O besides reading the ground-truth file: validate the ground truth, convert it and
the detections to COCO dictionaries, run ``pycocotools.cocoeval.COCOeval`` (bbox IoU) and extract
per-class figures. ``retinaedge eval`` (:mod:`.eval_cli`) runs the model and calls these functions.

Ground-truth file (JSON, UTF-8)::

    {
      "classes": ["glioma", "meningioma", "pituitary"],
      "annotations": [
        {"sop_instance_uid": "1.2.3...", "frame": 0, "label": "glioma",
         "box": [x1, y1, x2, y2], "difficult": false},
        ...
      ]
    }

- ``classes`` (optional): the classes that were annotated, a subset of the bundle's class names.
  Only these are evaluated and reported (default: all of the bundle's classes).
- ``annotations`` (required, may be empty): one object per box, with exactly these keys:
  ``sop_instance_uid`` (non-empty string), ``frame`` (0-based frame index within the instance, the
  ``index`` of the detection results), ``label`` (one of the classes), ``box`` (x1, y1, x2, y2 in the
  original frame's pixel coordinates, column then row; finite numbers, x2 > x1, y2 > y1) and optionally
  ``difficult`` (boolean, default false). Any other key is an error (a misspelt ``difficult`` would
  otherwise silently turn an ignore region into a box that must be found).

Every frame of every evaluated file is an image of the evaluation: a frame without annotations is a
negative, and detections on it are false positives. A ``difficult`` box becomes a COCO crowd region
(``iscrowd=1``): it never counts as ground truth to be found, and a detection that overlaps it (the
intersection is at least the IoU threshold times the detection's own area) and matches no regular box
is neither a true nor a false positive.

Figures follow the COCO definitions: IoU thresholds 0.50:0.05:0.95, 101 recall points, at most 100
detections per frame and class, one area range (all). ``ap50``/``ap75`` are AP at IoU 0.5/0.75,
``ap`` is AP averaged over the ten thresholds, ``ar100`` is recall averaged over them. A class without
(non-difficult) ground truth has no defined AP: its figures are ``None`` (JSON null), never 0.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from retinaedge.runtime.errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)

# Shown by ``retinaedge eval --help`` (keep in step with the module docstring).
GROUND_TRUTH_HELP = """\
ground-truth file (--annotations), JSON:
  {
    "classes": ["glioma", "meningioma", "pituitary"],
    "annotations": [
      {"sop_instance_uid": "1.2.3...", "frame": 0, "label": "glioma",
       "box": [x1, y1, x2, y2], "difficult": false}
    ]
  }
  classes      optional; a subset of the bundle's class names; only these are evaluated
  frame        0-based frame index within the instance ("index" in detect results)
  box          original frame pixel coordinates (column, row); finite, x2 > x1, y2 > y1
  difficult    optional (default false): an ignore region; detections on it are neither
               true nor false positives (COCO iscrowd=1)

Every frame of every given DICOM file is evaluated; frames without annotations are negatives.
Annotations for an SOP Instance UID or frame that is not among the files are an error unless
--allow-missing is given. Figures are COCO bbox AP (pycocotools): IoU 0.50:0.05:0.95, at most 100
detections per frame and class; classes without ground truth report null.
"""

IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
MAX_DETECTIONS: tuple[int, ...] = (1, 10, 100)
ANNOTATION_KEYS = frozenset({"sop_instance_uid", "frame", "label", "box", "difficult"})
TOP_LEVEL_KEYS = frozenset({"classes", "annotations"})
SHOWN = 5  # how many offending annotations an error message lists

Box = tuple[float, float, float, float]


class DetectionLike(Protocol):
    """What evaluation needs of a detection (:class:`.detector.Detection` fits)."""

    class_id: int
    score: float
    box: Box


@dataclass(frozen=True)
class Annotation:
    """One ground-truth box. ``index`` is its position in the file's ``annotations`` list (for messages);
    ``frame`` is 0-based; ``box`` is (x1, y1, x2, y2) in original frame pixels (column, row)."""

    index: int
    sop_instance_uid: str
    frame: int
    label: str
    box: Box
    difficult: bool = False


@dataclass(frozen=True)
class GroundTruth:
    """A parsed ground-truth file. ``classes`` is ``None`` when the file does not declare them."""

    classes: tuple[str, ...] | None
    annotations: tuple[Annotation, ...]


@dataclass(frozen=True)
class EvalFrame:
    """One image of the evaluation: frame ``index`` (0-based) of instance ``sop_instance_uid`` and the
    model's detections on it (boxes in the same pixel coordinates as the annotations).
    ``sop_instance_uid`` may be ``""`` for an instance without one: its frames are negatives."""

    sop_instance_uid: str
    index: int
    detections: Sequence[DetectionLike]


@dataclass(frozen=True)
class ClassFigures:
    """COCO figures of one class (fractions 0..1, ``None`` when the class has no ground truth) and
    the counts behind them: regular and difficult boxes, and all the model's detections of the class."""

    ap50: float | None
    ap: float | None
    ap75: float | None
    ar100: float | None
    ground_truth: int
    difficult: int
    detections: int

    def to_json(self) -> dict[str, Any]:
        return {
            "ap50": _round(self.ap50),
            "ap": _round(self.ap),
            "ap75": _round(self.ap75),
            "ar100": _round(self.ar100),
            "ground_truth": self.ground_truth,
            "difficult": self.difficult,
            "detections": self.detections,
        }


@dataclass(frozen=True)
class Evaluation:
    """Per-class figures (in the bundle's class order) and their means over classes with ground truth
    (``None`` when no class has any)."""

    classes: dict[str, ClassFigures]
    map50: float | None
    map: float | None
    images: int

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "classes": {name: figures.to_json() for name, figures in self.classes.items()},
            "map50": _round(self.map50),
            "map": _round(self.map),
            "iou_thresholds": list(IOU_THRESHOLDS),
            "max_detections": MAX_DETECTIONS[-1],
        }


# ---------------------------------------------------------------------------------------------------
# ground truth


def load_ground_truth(path: Path) -> GroundTruth:
    """Read and structurally validate a ground-truth file; :class:`ConfigError` says what and where."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the annotations file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"annotations file {path} is not UTF-8 text: {exc}") from exc
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise ConfigError(f"annotations file {path} is not valid JSON: {exc}") from exc
    try:
        return parse_ground_truth(doc)
    except ConfigError as exc:
        raise ConfigError(f"annotations file {path}: {exc}") from exc


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_ground_truth(doc: Any) -> GroundTruth:
    """Validate a parsed ground-truth document (see the module docstring) into a :class:`GroundTruth`.

    Labels are not checked against a model here; see :func:`evaluated_classes`.
    """
    if not isinstance(doc, dict):
        raise ConfigError(f"the top level must be a JSON object, got {_json_type(doc)}")
    unknown = sorted(set(doc) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; allowed: {sorted(TOP_LEVEL_KEYS)}")
    if "annotations" not in doc:
        raise ConfigError('the "annotations" list is missing')
    classes: tuple[str, ...] | None = None
    if "classes" in doc:
        raw = doc["classes"]
        if not isinstance(raw, list) or not raw or not all(isinstance(c, str) and c for c in raw):
            raise ConfigError('"classes" must be a non-empty list of class names (strings)')
        duplicated = sorted(name for name, n in Counter(raw).items() if n > 1)
        if duplicated:
            raise ConfigError(f'"classes" lists {duplicated} more than once')
        classes = tuple(raw)
    items = doc["annotations"]
    if not isinstance(items, list):
        raise ConfigError(f'"annotations" must be a list, got {_json_type(items)}')
    return GroundTruth(classes=classes, annotations=tuple(_annotation(i, a) for i, a in enumerate(items)))


def _annotation(index: int, item: Any) -> Annotation:
    """``annotations[index]`` -> :class:`Annotation`, or :class:`ConfigError` naming the index."""
    where = f"annotations[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be an object, got {_json_type(item)}")
    missing = sorted(ANNOTATION_KEYS - {"difficult"} - set(item))
    if missing:
        raise ConfigError(f"{where} lacks {missing}")
    unknown = sorted(set(item) - ANNOTATION_KEYS)
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}; allowed: {sorted(ANNOTATION_KEYS)}")
    uid, frame, label, box = item["sop_instance_uid"], item["frame"], item["label"], item["box"]
    difficult = item.get("difficult", False)
    if not isinstance(uid, str) or not uid:
        raise ConfigError(f"{where}.sop_instance_uid must be a non-empty string")
    if not isinstance(frame, int) or isinstance(frame, bool) or frame < 0:
        raise ConfigError(f"{where}.frame must be an integer >= 0 (0-based frame index), got {frame!r}")
    if not isinstance(label, str) or not label:
        raise ConfigError(f"{where}.label must be a non-empty string, got {label!r}")
    if not isinstance(difficult, bool):
        raise ConfigError(f"{where}.difficult must be true or false, got {difficult!r}")
    if (
        not isinstance(box, list)
        or len(box) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ):
        raise ConfigError(f"{where}.box must be a list of four numbers [x1, y1, x2, y2], got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ConfigError(f"{where}.box must be finite, got {box!r}")
    if not (x2 > x1 and y2 > y1):
        raise ConfigError(f"{where}.box must have x2 > x1 and y2 > y1, got {box!r}")
    return Annotation(index, uid, frame, label, (x1, y1, x2, y2), difficult)


def evaluated_classes(gt: GroundTruth, class_names: Sequence[str]) -> tuple[str, ...]:
    """The classes to evaluate, in the bundle's order: the file's ``classes`` (which must all be bundle
    classes) or all of ``class_names``. Raises :class:`ConfigError` naming unknown classes and labels."""
    if gt.classes is not None:
        foreign = [c for c in gt.classes if c not in class_names]
        if foreign:
            raise ConfigError(
                f'"classes" names {foreign}, which the model does not have (its classes: {list(class_names)})'
            )
    chosen = set(gt.classes) if gt.classes is not None else set(class_names)
    bad = Counter(a.label for a in gt.annotations if a.label not in chosen)
    if bad:
        first = min(a.index for a in gt.annotations if a.label in bad)
        scope = 'the file\'s "classes"' if gt.classes is not None else "the model's classes"
        raise ConfigError(
            f"label(s) {sorted(bad)} are not among {scope} {sorted(chosen, key=list(class_names).index)} "
            f"({sum(bad.values())} annotation(s), the first is annotations[{first}])"
        )
    return tuple(c for c in class_names if c in chosen)


def split_unmatched(
    annotations: Sequence[Annotation], frames_per_instance: Mapping[str, int]
) -> tuple[list[Annotation], list[Annotation]]:
    """``(matched, unmatched)``: an annotation matches when its instance is evaluated (a key of
    ``frames_per_instance``, UID -> number of frames) and its frame index is below that count."""
    matched: list[Annotation] = []
    unmatched: list[Annotation] = []
    for a in annotations:
        ok = a.frame < frames_per_instance.get(a.sop_instance_uid, 0)
        (matched if ok else unmatched).append(a)
    return matched, unmatched


def describe_unmatched(unmatched: Sequence[Annotation], limit: int = SHOWN) -> str:
    """Name up to ``limit`` unmatched annotations by position and frame (never by UID: the message is
    logged, and UIDs are patient data)."""
    shown = ", ".join(f"annotations[{a.index}] (frame {a.frame})" for a in unmatched[:limit])
    more = f" and {len(unmatched) - limit} more" if len(unmatched) > limit else ""
    return (
        f"{len(unmatched)} annotation(s) refer to an SOP Instance UID or frame that is not among the "
        f"evaluated files: {shown}{more}"
    )


# ---------------------------------------------------------------------------------------------------
# COCO conversion and evaluation


def category_id(class_id: int) -> int:
    """COCO category id of bundle class index ``class_id`` (ids start at 1; 0 is avoided)."""
    return class_id + 1


def xyxy_to_xywh(box: Sequence[float]) -> list[float]:
    """(x1, y1, x2, y2) -> COCO ``[x, y, width, height]``, same pixel units."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def to_coco(
    frames: Sequence[EvalFrame],
    annotations: Sequence[Annotation],
    class_names: Sequence[str],
    classes: Sequence[str],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Build the COCO ground-truth dataset and the detection results.

    Image ids are ``1 + position in frames``; category ids are :func:`category_id` of the class's index
    in ``class_names`` (only ``classes`` are included; detections of other classes are dropped).
    Every annotation must refer to one of ``frames`` (see :func:`split_unmatched`).

    Returns ``(dataset, results)``: ``dataset`` has ``images`` ``[{"id"}]``, ``categories``
    ``[{"id", "name"}]`` and ``annotations`` ``[{"id", "image_id", "category_id", "bbox": [x, y, w, h],
    "area": w*h, "iscrowd": 0|1}]``; ``results`` is ``[{"id", "image_id", "category_id", "bbox",
    "score", "area", "iscrowd": 0}]``, in pixels of the original frames.
    """
    image_ids: dict[tuple[str, int], int] = {}
    for number, frame in enumerate(frames, start=1):
        key = (frame.sop_instance_uid, frame.index)
        if frame.sop_instance_uid and key in image_ids:
            raise ConfigError(f"frame {frame.index} of one SOP Instance UID is given twice")
        image_ids[key] = number
    cat_of = {name: category_id(class_names.index(name)) for name in classes}
    evaluated = set(cat_of.values())
    dataset: dict[str, Any] = {
        "images": [{"id": number} for number in range(1, len(frames) + 1)],
        "categories": [{"id": cat_of[name], "name": name} for name in classes],
        "annotations": [],
    }
    for number, a in enumerate(annotations, start=1):
        key = (a.sop_instance_uid, a.frame)
        if key not in image_ids:
            raise ConfigError(f"annotations[{a.index}] refers to a frame that is not evaluated")
        bbox = xyxy_to_xywh(a.box)
        dataset["annotations"].append(
            {
                "id": number,
                "image_id": image_ids[key],
                "category_id": cat_of[a.label],
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": int(a.difficult),
            }
        )
    results: list[dict[str, Any]] = []
    for number, frame in enumerate(frames, start=1):
        for d in frame.detections:
            cat = category_id(int(d.class_id))
            if cat not in evaluated:
                continue
            bbox = xyxy_to_xywh(d.box)
            results.append(
                {
                    "id": len(results) + 1,
                    "image_id": number,
                    "category_id": cat,
                    "bbox": bbox,
                    "score": float(d.score),
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    return dataset, results


def run_cocoeval(dataset: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Run COCOeval (bbox) on in-memory dicts from :func:`to_coco`.

    Returns ``{"precision": (T, R, K, 1, M), "recall": (T, K, 1, M), "cat_ids": [K], "iou_thrs": [T],
    "max_dets": [M]}`` with -1 where a class has no ground truth (T=10 IoU thresholds, R=101 recall
    points, K categories, M=3 detection caps). pycocotools' progress prints are logged at DEBUG.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        err = MissingDependencyError("pycocotools", "eval", "retinaedge eval")
        # pycocotools is a main dependency, not an extra: only a broken installation lacks it.
        err.args = (
            "retinaedge eval needs the Python package 'pycocotools', a dependency of retinaedge that is "
            f"not installed ({exc}): pip install 'pycocotools>=2.0.8'",
        )
        raise err from exc
    if not dataset["images"]:
        raise ConfigError("there are no frames to evaluate")
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        gt = _coco(COCO, dataset)
        # Built directly rather than with gt.loadRes(), which fails on an empty result list; these are
        # the fields loadRes would add for boxes (id, area, iscrowd).
        dt = _coco(
            COCO,
            {"images": dataset["images"], "categories": dataset["categories"], "annotations": results},
        )
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.maxDets = list(MAX_DETECTIONS)
        ev.params.areaRng = [[0.0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    for line in chatter.getvalue().splitlines():
        log.debug("pycocotools: %s", line)
    return {
        "precision": ev.eval["precision"],
        "recall": ev.eval["recall"],
        "cat_ids": [int(c) for c in ev.params.catIds],
        "iou_thrs": [float(t) for t in ev.params.iouThrs],
        "max_dets": [int(m) for m in ev.params.maxDets],
    }


def _coco(coco_cls: Any, dataset: dict[str, Any]) -> Any:
    """A pycocotools ``COCO`` object over an in-memory dataset dict."""
    coco = coco_cls()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _mean_valid(values: np.ndarray) -> float | None:
    """Mean of the entries > -1 (pycocotools' "undefined" marker), or ``None`` if there are none."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def class_figures(
    coco: Mapping[str, Any], cat: int
) -> tuple[float | None, float | None, float | None, float | None]:
    """``(ap50, ap, ap75, ar100)`` of category ``cat`` from :func:`run_cocoeval` output (area "all",
    100 detections per image), each ``None`` when undefined."""
    k = coco["cat_ids"].index(cat)
    m = coco["max_dets"].index(MAX_DETECTIONS[-1])
    thrs = np.asarray(coco["iou_thrs"])
    t50 = int(np.argmin(np.abs(thrs - 0.5)))
    t75 = int(np.argmin(np.abs(thrs - 0.75)))
    precision = coco["precision"][:, :, k, 0, m]  # (T, R)
    return (
        _mean_valid(precision[t50]),
        _mean_valid(precision),
        _mean_valid(precision[t75]),
        _mean_valid(coco["recall"][:, k, 0, m]),
    )


def evaluate(
    frames: Sequence[EvalFrame],
    annotations: Sequence[Annotation],
    class_names: Sequence[str],
    classes: Sequence[str] | None = None,
) -> Evaluation:
    """COCO figures for ``classes`` (default: all of ``class_names``) of ``frames`` against
    ``annotations``, which must all refer to one of the frames (see :func:`split_unmatched`)."""
    classes = tuple(class_names) if classes is None else tuple(classes)
    dataset, results = to_coco(frames, annotations, class_names, classes)
    coco = run_cocoeval(dataset, results)
    regular = Counter(a.label for a in annotations if not a.difficult)
    difficult = Counter(a.label for a in annotations if a.difficult)
    found = Counter(r["category_id"] for r in results)
    figures: dict[str, ClassFigures] = {}
    for name in classes:
        cat = category_id(class_names.index(name))
        ap50, ap, ap75, ar100 = class_figures(coco, cat)
        figures[name] = ClassFigures(
            ap50=ap50,
            ap=ap,
            ap75=ap75,
            ar100=ar100,
            ground_truth=regular[name],
            difficult=difficult[name],
            detections=found[cat],
        )
    return Evaluation(
        classes=figures,
        map50=_mean([f.ap50 for f in figures.values()]),
        map=_mean([f.ap for f in figures.values()]),
        images=len(frames),
    )


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the defined values (classes with ground truth), ``None`` if there are none."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)
