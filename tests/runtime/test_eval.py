"""``retinaedge eval``: COCO AP with pycocotools against ground truth built from the model's own output."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from retinaedge.runtime.cli import main
from retinaedge.runtime.detector import Detector
from retinaedge.runtime.errors import ConfigError, MalformedDicomError
from retinaedge.runtime.eval_runs import InputRejected, detect_all
from retinaedge.runtime.evaluate import (
    Annotation,
    EvalFrame,
    describe_unmatched,
    evaluate,
    evaluated_classes,
    parse_ground_truth,
    split_unmatched,
    to_coco,
    xyxy_to_xywh,
)
from retinaedge.runtime.instance_result import Detection, FrameResult, InstanceResult
from support.dicomgen import mr_instance, to_bytes, write

CLASSES = ("glioma", "meningioma", "pituitary")
GT_CLASSES = ("glioma", "pituitary")  # meningioma gets no ground truth
PER_CLASS = 8  # ground-truth boxes per class: the model's best-scoring detections


@dataclass
class Corpus:
    """Three annotated 2-frame instances in ``root`` (with non-DICOM clutter) and their detections."""

    root: Path
    files: list[Path]
    results: list[InstanceResult]
    bundle: Path


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, size=(2, 96, 128), dtype=np.uint16)


@pytest.fixture(scope="module")
def corpus(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("eval-data")
    files = [write(mr_instance(_pixels(i), window=(2048, 4096)), root / f"im{i}.dcm") for i in range(3)]
    (root / "README.md").write_text("notes, not DICOM\n")
    (root / "preview.png").write_bytes(b"\x89PNG not really")
    with Detector.open(small_bundle) as det:
        results = [det.detect(p) for p in files]
    return Corpus(root, files, results, small_bundle)


def frames_of(results: list[InstanceResult]) -> list[EvalFrame]:
    return [EvalFrame(r.sop_instance_uid, f.index, f.detections) for r in results for f in r.frames]


def ranked(results: list[InstanceResult], label: str) -> list[tuple[str, int, Detection]]:
    """All detections of ``label`` as (uid, frame, detection), best score first."""
    out = [
        (r.sop_instance_uid, f.index, d)
        for r in results
        for f in r.frames
        for d in f.detections
        if d.label == label
    ]
    return sorted(out, key=lambda t: -t[2].score)


def gt_doc(
    results: list[InstanceResult], *, shift: float = 0.0, skip_first: bool = False, **extra: Any
) -> dict[str, Any]:
    """Ground truth = the ``PER_CLASS`` best detections of each of ``GT_CLASSES`` (a global score
    threshold per class, so every detection above it is a true positive), boxes shifted by ``shift``."""
    annotations = []
    for label in GT_CLASSES:
        best = ranked(results, label)[: PER_CLASS + 1]
        for number, (uid, frame, d) in enumerate(best[:PER_CLASS] if not skip_first else best[1:]):
            item = {
                "sop_instance_uid": uid,
                "frame": frame,
                "label": label,
                "box": [v + shift for v in d.box],
            }
            if skip_first and number == 0:
                item["difficult"] = False  # the explicit default is accepted
            annotations.append(item)
    return {"annotations": annotations, **extra}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    status = main(["--log-level", "WARNING", "eval", *argv])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines  # exactly one JSON object: pycocotools' prints must not leak
    return status, json.loads(lines[0])


def write_gt(path: Path, doc: Any) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


# --------------------------------------------------------------------------------------------------
# pure logic


def test_to_coco_conversion() -> None:
    det = Detection("pituitary", 2, 0.9, (10.0, 20.0, 40.0, 60.0))
    other = Detection("meningioma", 1, 0.8, (0.0, 0.0, 5.0, 5.0))  # class not evaluated: dropped
    frames = [EvalFrame("1.2.3", 0, []), EvalFrame("1.2.3", 1, [det, other]), EvalFrame("1.2.4", 0, [])]
    anns = [
        Annotation(0, "1.2.4", 0, "glioma", (1.0, 2.0, 4.0, 8.0)),
        Annotation(1, "1.2.3", 1, "pituitary", (10.0, 20.0, 40.0, 60.0), difficult=True),
    ]
    dataset, results = to_coco(frames, anns, CLASSES, ("glioma", "pituitary"))
    assert dataset["images"] == [{"id": 1}, {"id": 2}, {"id": 3}]
    assert dataset["categories"] == [{"id": 1, "name": "glioma"}, {"id": 3, "name": "pituitary"}]
    assert dataset["annotations"] == [
        {"id": 1, "image_id": 3, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 6.0], "area": 18.0, "iscrowd": 0},
        {
            "id": 2,
            "image_id": 2,
            "category_id": 3,
            "bbox": [10.0, 20.0, 30.0, 40.0],
            "area": 1200.0,
            "iscrowd": 1,
        },
    ]
    assert results == [
        {
            "id": 1,
            "image_id": 2,
            "category_id": 3,
            "bbox": [10.0, 20.0, 30.0, 40.0],
            "score": 0.9,
            "area": 1200.0,
            "iscrowd": 0,
        }
    ]
    assert xyxy_to_xywh((0.5, 1.5, 2.0, 4.0)) == [0.5, 1.5, 1.5, 2.5]
    with pytest.raises(ConfigError, match=r"annotations\[7\]"):
        to_coco(frames, [Annotation(7, "9.9", 0, "glioma", (0, 0, 1, 1))], CLASSES, CLASSES)


def test_known_values_without_a_model() -> None:
    """One box; a higher-scoring false positive first, then the hit: precision 1/2 at full recall."""
    gt = [Annotation(0, "1.2", 0, "glioma", (10.0, 10.0, 30.0, 30.0))]
    dets = [
        Detection("glioma", 0, 0.9, (60.0, 60.0, 80.0, 80.0)),
        Detection("glioma", 0, 0.5, (10.0, 10.0, 30.0, 30.0)),
    ]
    ev = evaluate([EvalFrame("1.2", 0, dets)], gt, CLASSES)
    assert ev.classes["glioma"].ap50 == pytest.approx(0.5)
    assert ev.classes["glioma"].ar100 == pytest.approx(1.0)
    assert ev.classes["meningioma"].ap50 is None and ev.classes["meningioma"].ar100 is None
    assert ev.map50 == pytest.approx(0.5)
    # no detections at all: AP 0 for the class with ground truth, null for the others
    ev = evaluate([EvalFrame("1.2", 0, []), EvalFrame("1.2", 1, [])], gt, CLASSES)
    assert ev.classes["glioma"].ap50 == 0.0 and ev.classes["glioma"].ap == 0.0
    assert ev.classes["pituitary"].ap50 is None
    assert ev.to_json()["map50"] == 0.0 and ev.to_json()["images"] == 2
    # a difficult box only: the class has no ground truth to find, and the hit is not a false positive
    hard = [Annotation(0, "1.2", 0, "glioma", (10.0, 10.0, 30.0, 30.0), difficult=True)]
    ev = evaluate([EvalFrame("1.2", 0, dets[1:])], hard, CLASSES)
    figures = ev.classes["glioma"]
    assert (figures.ap50, figures.ground_truth, figures.difficult, figures.detections) == (None, 0, 1, 1)
    assert ev.map50 is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "top level must be a JSON object"),
        ({"classes": ["glioma"]}, '"annotations" list is missing'),
        ({"annotations": {}}, '"annotations" must be a list'),
        ({"annotations": [], "extra": 1}, "unknown top-level key"),
        ({"annotations": [], "classes": []}, '"classes" must be a non-empty list'),
        ({"annotations": [], "classes": ["a", "a"]}, "more than once"),
        ({"annotations": [5]}, r"annotations\[0\] must be an object"),
        ({"annotations": [{"frame": 0, "label": "glioma", "box": [0, 0, 1, 1]}]}, "lacks"),
        (
            {"annotations": [{"sop_instance_uid": "1", "frame": 0, "label": "g", "box": [2, 0, 1, 1]}]},
            r"annotations\[0\]\.box must have x2 > x1",
        ),
        (
            {"annotations": [{"sop_instance_uid": "1", "frame": 0, "label": "g", "box": [0, 0, 1]}]},
            "four numbers",
        ),
        (
            {"annotations": [{"sop_instance_uid": "1", "frame": True, "label": "g", "box": [0, 0, 1, 1]}]},
            r"\.frame must be an integer",
        ),
        (
            {"annotations": [{"sop_instance_uid": "1", "frame": -1, "label": "g", "box": [0, 0, 1, 1]}]},
            r"\.frame must be an integer",
        ),
        (
            {
                "annotations": [
                    {"sop_instance_uid": "1", "frame": 0, "label": "g", "box": [0, 0, 1, 1], "dificult": True}
                ]
            },
            "unknown key",
        ),
        (
            {
                "annotations": [
                    {"sop_instance_uid": "1", "frame": 0, "label": "g", "box": [0, 0, 1, 1], "difficult": 1}
                ]
            },
            r"\.difficult must be true or false",
        ),
        (
            {"annotations": [{"sop_instance_uid": "", "frame": 0, "label": "g", "box": [0, 0, 1, 1]}]},
            "sop_instance_uid must be a non-empty string",
        ),
    ],
)
def test_malformed_ground_truth(doc: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_ground_truth(doc)


def test_labels_classes_and_unmatched() -> None:
    def ann(i: int, uid: str, frame: int, label: str) -> dict[str, Any]:
        return {"sop_instance_uid": uid, "frame": frame, "label": label, "box": [0, 0, 1, 1]}

    gt = parse_ground_truth({"annotations": [ann(0, "1.1", 0, "glioma"), ann(1, "1.1", 0, "lipoma")]})
    with pytest.raises(ConfigError, match=r"\['lipoma'\].*annotations\[1\]"):
        evaluated_classes(gt, CLASSES)
    gt = parse_ground_truth({"classes": ["glioma", "lipoma"], "annotations": []})
    with pytest.raises(ConfigError, match=r"\['lipoma'\], which the model does not have"):
        evaluated_classes(gt, CLASSES)
    gt = parse_ground_truth({"classes": ["pituitary", "glioma"], "annotations": [ann(0, "1.1", 0, "glioma")]})
    assert evaluated_classes(gt, CLASSES) == ("glioma", "pituitary")  # in the bundle's order
    gt = parse_ground_truth({"classes": ["glioma"], "annotations": [ann(0, "1.1", 0, "pituitary")]})
    with pytest.raises(ConfigError, match="not among the file's"):
        evaluated_classes(gt, CLASSES)
    anns = parse_ground_truth(
        {"annotations": [ann(0, "1.1", 0, "glioma"), ann(1, "1.1", 2, "glioma"), ann(2, "7.7", 0, "glioma")]}
    ).annotations
    matched, unmatched = split_unmatched(anns, {"1.1": 2})
    assert [a.index for a in matched] == [0] and [a.index for a in unmatched] == [1, 2]
    text = describe_unmatched(unmatched * 4)
    assert "annotations[1] (frame 2)" in text and "and 3 more" in text and "7.7" not in text


def test_detect_all_outcomes(tmp_path: Path) -> None:
    """Same instance twice is refused; a rejected file stops the run or, when skipped, is counted."""

    class Stub:
        limits = None

        def __init__(self, uids: dict[str, str]) -> None:
            self.uids = uids

        def detect(self, path: Path) -> InstanceResult:
            uid = self.uids[path.name]
            if uid == "bad":
                raise MalformedDicomError("not a DICOM Part 10 file")
            frames = [FrameResult(0, []), FrameResult(1, [])]
            return InstanceResult(uid, "m", "0" * 64, frames, {})

    files = [tmp_path / n for n in ("a.dcm", "b.dcm", "c.dcm")]
    with pytest.raises(ConfigError, match=r"a\.dcm and .*c\.dcm are the same instance"):
        detect_all(Stub({"a.dcm": "1.1", "b.dcm": "1.2", "c.dcm": "1.1"}), files, skip_rejected=False)
    stub = Stub({"a.dcm": "1.1", "b.dcm": "bad", "c.dcm": ""})
    with pytest.raises(InputRejected) as info:
        detect_all(stub, files, skip_rejected=False)
    assert info.value.path == files[1] and info.value.error["type"] == "malformed-dicom"
    got = detect_all(stub, files, skip_rejected=True)
    assert (got.instances, got.rejected, len(got.frames)) == (2, 1, 4)
    assert got.frames_per_instance == {"1.1": 2}  # the instance without a UID: negatives only
    assert [(f.sop_instance_uid, f.index) for f in got.frames] == [("1.1", 0), ("1.1", 1), ("", 0), ("", 1)]


# --------------------------------------------------------------------------------------------------
# with the model


def test_own_detections_as_ground_truth_score_perfectly(
    corpus: Corpus, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    gt = write_gt(corpus.root / "gt.json", gt_doc(corpus.results))  # inside the data directory
    out = tmp_path / "report.json"
    status, report = run_cli(
        capsys,
        "--model",
        str(corpus.bundle),
        "--annotations",
        str(gt),
        str(corpus.root),
        "--min-map50",
        "0.99",
        "--out",
        str(out),
    )
    print(json.dumps(report, indent=2))
    assert status == 0
    assert json.loads(out.read_text()) == report
    assert (report["images"], report["instances"]) == (6, 3)  # gt.json, README.md, preview.png skipped
    assert report["model"]["sha256"] == corpus.results[0].model_sha256
    assert report["backend"]["name"] == "onnxruntime"
    assert list(report["classes"]) == list(CLASSES)
    for label in GT_CLASSES:
        figures = report["classes"][label]
        assert figures["ap50"] == figures["ap"] == figures["ap75"] == figures["ar100"] == 1.0
        assert (figures["ground_truth"], figures["difficult"]) == (PER_CLASS, 0)
        assert figures["detections"] == len(ranked(corpus.results, label))
    menin = report["classes"]["meningioma"]
    assert menin["ap50"] is menin["ap"] is menin["ap75"] is menin["ar100"] is None
    assert menin["ground_truth"] == 0 and menin["detections"] == len(ranked(corpus.results, "meningioma"))
    assert report["map50"] == report["map"] == 1.0
    assert report["iou_thresholds"] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    assert report["max_detections"] == 100
    assert (report["rejected_files"], report["unmatched_annotations"]) == (0, 0)
    assert report["gate"] == {"min_map50": 0.99, "passed": True}


def test_shifted_boxes_score_zero_and_fail_the_gate(
    corpus: Corpus, capsys: pytest.CaptureFixture[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gt = write_gt(tmp_path / "gt.json", gt_doc(corpus.results[:1], shift=1000.0))
    with caplog.at_level(logging.ERROR):
        status, report = run_cli(
            capsys,
            "--model",
            str(corpus.bundle),
            "--annotations",
            str(gt),
            "--min-map50",
            "0.5",
            str(corpus.files[0]),
        )
    assert status == 1
    for label in GT_CLASSES:
        assert report["classes"][label]["ap50"] == 0.0 and report["classes"][label]["ar100"] == 0.0
    assert report["map50"] == 0.0
    assert report["gate"] == {"min_map50": 0.5, "passed": False}
    assert "mAP@0.5 is 0.0000, required 0.5000" in caplog.text


def test_difficult_boxes_are_neither_true_nor_false_positives(corpus: Corpus) -> None:
    frames = frames_of(corpus.results)
    best = ranked(corpus.results, "glioma")[: PER_CLASS + 1]

    def boxes(difficult_first: bool | None) -> list[Annotation]:
        chosen = best if difficult_first is not None else best[1:]
        return [
            Annotation(i, uid, frame, "glioma", d.box, difficult=bool(difficult_first) and i == 0)
            for i, (uid, frame, d) in enumerate(chosen)
        ]

    # the best detection unannotated: a false positive ranked above every hit
    plain = evaluate(frames, boxes(None), CLASSES).classes["glioma"]
    assert plain.ap50 is not None and plain.ap50 < 0.95
    # the same box marked difficult: ignored, so every remaining hit is ranked first again
    ignored = evaluate(frames, boxes(True), CLASSES).classes["glioma"]
    assert ignored.ap50 == ignored.ap == 1.0
    assert (ignored.ground_truth, ignored.difficult) == (PER_CLASS, 1)
    # and as a regular box it is simply found
    assert evaluate(frames, boxes(False), CLASSES).classes["glioma"].ap50 == 1.0


def test_unannotated_file_adds_false_positives(corpus: Corpus, tmp_path: Path) -> None:
    """A copy of an annotated instance under a new UID and no annotations: its detections (the same
    scores as the annotated ones) are all false positives, so precision drops."""
    copy = write(mr_instance(_pixels(0), window=(2048, 4096)), tmp_path / "copy.dcm")
    with Detector.open(corpus.bundle) as det:
        extra = det.detect(copy)
    anns = [
        Annotation(i, uid, frame, label, d.box)
        for label in GT_CLASSES
        for i, (uid, frame, d) in enumerate(ranked(corpus.results, label)[:PER_CLASS])
    ]
    alone = evaluate(frames_of(corpus.results), anns, CLASSES)
    diluted = evaluate(frames_of([*corpus.results, extra]), anns, CLASSES)
    assert alone.map50 == 1.0
    assert diluted.map50 is not None and diluted.map50 < 0.9
    assert diluted.images == alone.images + 2


def test_ground_truth_errors_through_the_cli(
    corpus: Corpus, capsys: pytest.CaptureFixture[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = [str(corpus.files[0])]  # runs that get as far as detection: one file is enough
    model = ["--model", str(corpus.bundle)]

    def fails(doc: Any, *message: str) -> None:
        gt = write_gt(tmp_path / "gt.json", doc)
        status, line = run_cli(capsys, *model, "--annotations", str(gt), *files)
        assert status == 2 and line["error"]["type"] == "invalid-configuration", line
        for m in message:
            assert m in line["error"]["message"], line

    fails("{not json", "is not valid JSON")
    fails({"classes": list(CLASSES)}, '"annotations" list is missing')
    doc = gt_doc(corpus.results)
    doc["annotations"][3]["box"] = [50, 10, 40, 20]
    fails(doc, "annotations[3].box must have x2 > x1")
    doc = gt_doc(corpus.results)
    doc["annotations"][2]["label"] = "astrocytoma"
    fails(doc, "['astrocytoma']", "annotations[2]")

    stranger = "1.2.826.0.1.3680043.99.424242"
    doc = gt_doc(corpus.results[:1])
    last = len(doc["annotations"])
    doc["annotations"].append({**doc["annotations"][0], "sop_instance_uid": stranger})
    with caplog.at_level(logging.DEBUG):
        fails(
            doc,
            "1 annotation(s) refer to",
            f"annotations[{last}] (frame {doc['annotations'][0]['frame']})",
            "--allow-missing",
        )
    assert stranger not in caplog.text  # no UIDs in log lines
    # a frame the instance does not have: found after detection
    doc["annotations"][last] = {**doc["annotations"][0], "frame": 7}
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        fails(doc, f"annotations[{last}] (frame 7)")
    assert not any(r.sop_instance_uid in caplog.text for r in corpus.results)
    doc["annotations"].append({**doc["annotations"][0], "sop_instance_uid": stranger})
    others = gt_doc(corpus.results)["annotations"]  # also boxes on the two files not given
    others = [a for a in others if a["sop_instance_uid"] != corpus.results[0].sop_instance_uid]
    doc["annotations"] += others
    write_gt(tmp_path / "gt.json", doc)
    status, report = run_cli(
        capsys, *model, "--annotations", str(tmp_path / "gt.json"), "--allow-missing", *files
    )
    assert status == 0 and report["unmatched_annotations"] == 2 + len(others) > 2
    assert (report["instances"], report["images"]) == (1, 2)
    assert report["map50"] == 1.0  # the left-out boxes count neither way

    status, line = run_cli(
        capsys, *model, "--annotations", str(tmp_path / "gt.json"), "--min-map50", "2", *files
    )
    assert status == 2 and "--min-map50 must be within 0..1" in line["error"]["message"]


def test_rejected_files(corpus: Corpus, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not a DICOM file " * 20)
    # big enough frames that the pixel data is read lazily: the header stays readable when cut
    big = mr_instance(np.random.default_rng(9).integers(0, 4096, size=(1, 256, 256), dtype=np.uint16))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(to_bytes(big)[:-5000])
    doc = gt_doc(corpus.results[:1])
    doc["annotations"].append(
        {"sop_instance_uid": big.SOPInstanceUID, "frame": 0, "label": "glioma", "box": [1, 2, 30, 40]}
    )
    gt = write_gt(tmp_path / "gt.json", doc)
    args = ["--model", str(corpus.bundle), "--annotations", str(gt), str(garbage)]

    status, line = run_cli(capsys, *args, str(corpus.files[0]))  # stops at the first file
    assert status == 1
    assert line["file"] == str(garbage) and line["error"]["type"] == "malformed-dicom"

    status, report = run_cli(capsys, *args, str(cut), str(corpus.files[0]), "--skip-rejected")
    assert status == 0, report
    # the cut file's header is readable: its annotation is left out without --allow-missing
    assert (report["rejected_files"], report["unmatched_annotations"]) == (2, 1)
    assert (report["instances"], report["images"]) == (1, 2)
    assert report["map50"] == 1.0
