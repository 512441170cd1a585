"""The openvino backend on the committed demo bundle: found by the registry, FP32 pinned and equal to ONNX
Runtime FP32 by the export's parity rule, its compiled-model cache, the precision policy (a CPU without bf16,
simulated through the device-properties hook, never runs bf16) and the gate's comparison.

Nothing here depends on a speed-up or on one CPU's numerics: a reduced precision is only asserted to be
what its gate decided.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from retinaedge.runtime.backends.base import BackendOptions
from retinaedge.runtime.backends.openvino.cpu import CpuFacts, parse_cpuinfo
from retinaedge.runtime.backends.openvino.gate import add_ap50, compare_findings, findings_only
from retinaedge.runtime.backends.openvino.precision import MAX_RECHECK_RATE, decide, offered, to_gate
from retinaedge.runtime.backends.registry import backend_extra, check_available, discovered, open_backend
from retinaedge.runtime.bundle import load_bundle, load_golden
from retinaedge.runtime.detections import ImageDetections, split_outputs
from retinaedge.runtime.detector import Detector
from retinaedge.runtime.discovery import dicom_files
from retinaedge.runtime.errors import ConfigError, MissingDependencyError
from retinaedge.runtime.matching import match_detections
from retinaedge.runtime.operating_point import OperatingPoint
from support.paths import DEMO, EXAMPLES

pytest.importorskip("openvino")

#: The export's parity rule (export/parity.py): same label, IoU >= 0.99, score within 1e-3, every detection.
IOU_MIN, SCORE_TOL = 0.99, 1e-3
NO_BF16 = {"OPTIMIZATION_CAPABILITIES": ["FP32", "FP16", "INT8", "EXPORT_IMPORT"]}


def serves(gate: dict[str, Any]) -> bool:
    """Whether a gated precision serves: its gate passed and its FP32 re-check did not re-run most frames."""
    return bool(gate["passed"]) and (gate.get("recheck_rate") or 0.0) <= MAX_RECHECK_RATE


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openvino-cache")


def _open(cache_dir: Path, **extra: Any) -> Any:
    return open_backend(
        "openvino", load_bundle(DEMO), BackendOptions(threads=2, extra={"cache_dir": cache_dir, **extra})
    )


@pytest.fixture(scope="module")
def fp32(cache_dir: Path) -> Iterator[Any]:
    with _open(cache_dir) as backend:
        yield backend


def test_the_registry_finds_it_and_a_missing_package_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert discovered()["openvino"] == "retinaedge.runtime.backends.openvino"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a)
    )
    with pytest.raises(MissingDependencyError, match=r"retinaedge\[openvino\]"):
        check_available("openvino")


def test_fp32_is_pinned_and_self_tested_with_its_settings_recorded(fp32: Any) -> None:
    facts = fp32.describe()
    assert fp32.name == "openvino" and fp32.precision == "fp32"
    assert facts["inference_precision"] == "f32"  # not the bf16 OpenVINO picks by itself on AMX
    assert facts["performance_hint"] == "latency" and facts["streams"] == 1 and facts["threads"] == 2
    record = json.loads((Path(facts["cache_entry"]) / "record.json").read_text())
    assert record["precision"] == "fp32" and record["settings"]["inference_precision"] == "f32"
    assert all(r["match_rate"] == 1.0 for r in record["self_test"])  # golden self-test, parity rule
    assert record["model_sha256"] == load_bundle(DEMO).manifest.model_sha256
    assert set(record["cpu"]["features"]) >= {"avx2", "avx512f", "amx_bf16", "amx_int8"}


def test_fp32_equals_onnxruntime_by_the_parity_rule_on_the_examples(fp32: Any) -> None:
    bundle = load_bundle(DEMO)
    files = dicom_files([EXAMPLES / "study_01", EXAMPLES / "study_01_multiframe"])
    total = matched = 0
    with Detector.open(DEMO, threads=2) as ort:
        ov = Detector(bundle, fp32, batch_size=4)
        for path in files:
            for a, b in zip(ort.detect(path).frames, ov.detect(path).frames, strict=True):
                ref = ImageDetections.from_arrays(
                    [d.box for d in a.detections],
                    [d.score for d in a.detections],
                    [d.class_id for d in a.detections],
                )
                got = ImageDetections.from_arrays(
                    [d.box for d in b.detections],
                    [d.score for d in b.detections],
                    [d.class_id for d in b.detections],
                )
                report = match_detections(ref, got, iou_min=IOU_MIN, score_tol=SCORE_TOL)
                total += report.reference
                matched += report.matched
                assert report.candidate == report.reference, path
                assert [d.finding for d in a.detections] == [d.finding for d in b.detections]
    assert total > 100 and matched == total


def test_golden_frames_and_batches_match_onnxruntime(fp32: Any) -> None:
    from retinaedge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    images, _expected, _criteria = load_golden(load_bundle(DEMO))
    batch = np.concatenate([images, images[::-1]])
    with OnnxRuntimeBackend(DEMO / "model.onnx", threads=2) as ort:
        ref = split_outputs(ort.infer(batch))
    got = split_outputs(fp32.infer(batch))
    for r, g in zip(ref, got, strict=True):
        assert match_detections(r, g, iou_min=IOU_MIN, score_tol=SCORE_TOL).match_rate == 1.0


def test_a_second_open_uses_the_compiled_model_cache(fp32: Any, cache_dir: Path) -> None:
    with _open(cache_dir) as again:
        assert again.describe()["compiled_from_cache"] is True
        assert again.describe()["cache_entry"] == fp32.describe()["cache_entry"]
    entries = [p for p in cache_dir.iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "ov").is_dir()


def test_throughput_hint_splits_a_batch_over_streams_and_gives_the_same_detections(
    cache_dir: Path, fp32: Any
) -> None:
    images, _e, _c = load_golden(load_bundle(DEMO))
    batch = np.concatenate([images, images])
    with _open(cache_dir, performance_hint="throughput") as tput:
        assert tput.describe()["performance_hint"] == "throughput"
        for r, g in zip(split_outputs(fp32.infer(batch)), split_outputs(tput.infer(batch)), strict=True):
            assert match_detections(r, g, iou_min=IOU_MIN, score_tol=SCORE_TOL).match_rate == 1.0


def test_a_cpu_without_bf16_never_runs_bf16(cache_dir: Path) -> None:
    with _open(cache_dir, precision="bf16", device_properties=NO_BF16) as asked:
        assert asked.precision == "fp32"
        assert (
            "precision bf16 not used" in asked.reason
            and "BF16" in asked.reason
            and "serving fp32" in asked.reason
        )
    with _open(cache_dir, precision="auto", device_properties=NO_BF16) as auto:
        assert auto.precision in ("fp32", "int8")  # the demo bundle has no INT8 model: fp32
        assert "bf16" not in auto.describe()["gates"]


def test_bf16_runs_only_behind_its_gate(cache_dir: Path) -> None:
    with _open(cache_dir, precision="bf16") as backend:
        gates = backend.describe()["gates"]
        if "bf16" not in gates:  # this CPU does not offer bf16: served fp32, saying why
            assert backend.precision == "fp32" and "bf16 not used" in backend.reason
            return
        gate = gates["bf16"]
        assert backend.precision == ("bf16" if serves(gate) else "fp32")
        assert gate["frames"] == 2 and gate["reference_findings"] >= 1
        assert (
            json.loads((Path(backend.describe()["cache_entry"]) / "record.json").read_text())["gate"] == gate
        )


def test_precision_options_are_checked(cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match="precision must be one of"):
        _open(cache_dir, precision="fp16")
    args = argparse.Namespace(backend="onnxruntime", precision="int8")
    with pytest.raises(ConfigError, match="applies to --backend openvino"):
        backend_extra(args)
    assert backend_extra(argparse.Namespace(backend="openvino", precision="auto")) == {"precision": "auto"}


# The policy and the gate, as pure functions.

AMX = CpuFacts("Xeon", ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"))
AVX2 = CpuFacts("EPYC", ("avx2",))


def test_cpuinfo_flags() -> None:
    facts = parse_cpuinfo(
        "processor: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_int8\n"
    )
    assert facts.model == "Some CPU" and facts.vnni and not facts.native_bf16
    assert facts.features == ("avx2", "avx512f", "avx512_vnni", "amx_int8")
    assert facts.fingerprint() != AMX.fingerprint()


def test_offered_precisions() -> None:
    caps = ["FP32", "BF16", "INT8"]
    assert offered(caps, AMX, None) == {"bf16": None, "int8": None}
    avx2 = offered(caps, AVX2, None)  # a device listing BF16 on a CPU without it: still not run
    assert avx2["bf16"] is not None and "emulated" in avx2["bf16"] and avx2["int8"] is None
    assert "no INT8 model" in str(offered(caps, AMX, "no INT8 model")["int8"])
    assert to_gate("auto", offered(["FP32", "INT8"], AMX, None)) == ["int8"]
    assert to_gate("fp32", offered(caps, AMX, None)) == []


def _det(*rows: tuple[int, float, list[float]]) -> ImageDetections:
    return ImageDetections.from_arrays([r[2] for r in rows], [r[1] for r in rows], [r[0] for r in rows])


CLASSES = ("a", "b")
POINT = OperatingPoint({"a": 0.5, "b": 0.3})


def test_the_gate_keeps_findings_and_refuses_lost_and_new_ones() -> None:
    ref = [_det((0, 0.9, [0, 0, 10, 10]), (1, 0.35, [20, 20, 30, 30]), (0, 0.2, [40, 40, 50, 50]))]
    assert len(findings_only(ref[0], CLASSES, POINT)) == 2
    assert len(findings_only(ref[0], CLASSES, None)) == 1  # no operating point: score >= 0.5
    same = [_det((0, 0.88, [0, 0, 10, 11]), (1, 0.31, [20, 20, 30, 30]), (0, 0.45, [40, 40, 50, 50]))]
    result = compare_findings("int8", ref, same, CLASSES, POINT)
    assert result.passed and result.kept == 2 and abs(result.max_score_delta - 0.04) < 1e-6
    lost = [_det((0, 0.9, [0, 0, 10, 10]), (1, 0.29, [20, 20, 30, 30]))]  # fell below its threshold
    assert compare_findings("int8", ref, lost, CLASSES, POINT).reasons == ["1 of 2 FP32 findings lost"]
    moved = [_det((0, 0.9, [5, 5, 15, 15]), (1, 0.35, [20, 20, 30, 30]))]  # IoU 0.14: lost and new
    failed = compare_findings("bf16", ref, moved, CLASSES, POINT)
    assert not failed.passed and len(failed.lost) == 1 and len(failed.new) == 1
    relabelled = [_det((1, 0.9, [0, 0, 10, 10]), (1, 0.35, [20, 20, 30, 30]))]
    assert not compare_findings("int8", ref, relabelled, CLASSES, POINT).passed
    add_ap50(result, 0.91, 0.905)
    assert result.passed and result.map50 == {"fp32": 0.91, "candidate": 0.905, "drop": 0.005}
    add_ap50(result, 0.91, 0.89)
    assert not result.passed and "AP50 dropped by 0.02" in result.reasons[0]


def test_auto_serves_the_fastest_that_passed_and_a_failed_request_says_why() -> None:
    ref = [_det((0, 0.9, [0, 0, 10, 10]))]
    good = compare_findings("int8", ref, ref, CLASSES, POINT)
    good.ms_per_frame = 3.0
    bad = compare_findings("bf16", ref, [ImageDetections.empty()], CLASSES, POINT)
    bad.ms_per_frame = 1.0
    both = {"bf16": None, "int8": None}
    auto = decide("auto", both, {"int8": good, "bf16": bad}, 10.0)
    assert auto.precision == "int8" and "bf16" in auto.reason and "failed" in auto.reason
    slow = compare_findings("int8", ref, ref, CLASSES, POINT)
    slow.ms_per_frame = 20.0
    assert decide("auto", both, {"int8": slow}, 10.0).precision == "fp32"
    asked = decide("bf16", both, {"bf16": bad}, 10.0)
    assert asked.precision == "fp32" and asked.fallback and "gate failed" in asked.reason


def test_detect_and_eval_run_on_openvino(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from retinaedge.runtime.cli import main

    monkeypatch.setenv("RETINAEDGE_OPENVINO_CACHE_DIR", str(tmp_path / "cache"))
    study = EXAMPLES / "study_01"
    assert main(["detect", "--model", str(DEMO), "--backend", "openvino", str(study / "IM0014.dcm")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["frames"]
    files = [str(study / f"IM{n:04d}.dcm") for n in (14, 15, 16)]
    argv = ["eval", "--model", str(DEMO), "--backend", "openvino", "--precision", "auto", "--allow-missing"]
    assert main([*argv, "--annotations", str(EXAMPLES / "ground_truth.json"), *files]) == 0
    assert "map50" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
